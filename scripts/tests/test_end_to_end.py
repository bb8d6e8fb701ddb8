"""The whole chain on the real stack: raw ticks in, bars in ClickHouse and Redis out.

A generated stream with known properties (several intervals, trades out of order inside the
allowed lateness and late beyond it, duplicates, malformed records, unknown and inactive
instruments) runs through the four services as separate processes, on topics, a PostgreSQL
database, a chDB folder and instrument ids of this test alone. The final bars read back from
ClickHouse (`FINAL`, through aggregation's read API) and from Redis must equal the bars of the naive
reference computation, dead letters must match by reason, and every record must be accounted for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from confluent_kafka import Producer
from dataproc_shared import avro
from dataproc_shared.records import InRecord
from dptools.deploytools import PrometheusServer, overview_queries, write_local_config
from dptools.pipeline import CHAIN_INPUTS, SERVICES, Pipeline, chain_snapshot, http_get, wait_committed
from dptools.reference import Arrival, RefBar, arrivals_from_raw, compute, diff_bars
from dptools.ticks import GeneratorConfig, Instrument, RawTick, Tag, generate

pytestmark = pytest.mark.integration

PARTITIONS = 3
INTERVALS = ("1m", "5m", "1h")
LATENESS_MS = 5_000
IDLE_MS = 15_000

INSTRUMENTS = [
    # venue, venue symbol, asset class, currency, tick size
    ("XNYS", "IBM", "equity", "USD", 0.01),
    ("XNYS", "BAC", "equity", "USD", 0.01),
    ("XCEC", "GCZ3", "future", "USD", 0.1),
    ("BINANCE", "BTCUSDT", "crypto", "USD", 0.01),
    ("EPEX", "DE-BASE", "power", "EUR", 0.01),
    ("OANDA", "EURUSD", "fx", "USD", 0.00001),
]
INACTIVE = ("XNYS", "OLDCO", "equity", "USD", 0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def load_reference(dsn: str, prefix: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for mic in sorted({i[0] for i in [*INSTRUMENTS, INACTIVE]}):
            await conn.execute("INSERT INTO venues (mic, name, timezone) VALUES ($1, $1, 'UTC') "
                               "ON CONFLICT DO NOTHING", mic)
        for venue, sym, asset, ccy, tick in [*INSTRUMENTS, INACTIVE]:
            await conn.execute(
                "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency, "
                "tick_size, multiplier, active) VALUES ($1, $2, $3, $3, $4, $5, $6, 1, $7)",
                f"{prefix}.{venue}.{sym}", venue, sym, asset, ccy, tick, sym != INACTIVE[1])
    finally:
        await conn.close()


@pytest.fixture
def chain(topic_factory: Callable[..., str], kafka_bootstrap: str, pg_database: str, tmp_path: Path,
          redis_url: str) -> Iterator[dict[str, Any]]:
    prefix = "E2E" + uuid.uuid4().hex[:8].upper()
    asyncio.run(load_reference(pg_database, prefix))
    compacted = {"cleanup.policy": "compact"}
    topics = {
        "RAW": topic_factory("raw", PARTITIONS),
        "NORMALIZED": topic_factory("norm", PARTITIONS),
        "ENRICHED": topic_factory("enr", PARTITIONS),
        "BARS": topic_factory("bars", PARTITIONS),
        "DEADLETTER": topic_factory("dlq", 1),
        "NORMALIZATION_DEDUP_CHANGELOG": topic_factory("dedup-cl", PARTITIONS, compacted),
        "AGGREGATION_WINDOWS_CHANGELOG": topic_factory("win-cl", PARTITIONS, compacted),
    }
    audit_topic = topic_factory("audit", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
    env.update({
        "DATA_PROC_ENV": "local",
        "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DATA_PROC_POSTGRES_DSN": pg_database,
        "DATA_PROC_REDIS_URL": redis_url,
        "DATA_PROC_CLICKHOUSE_URL": str(tmp_path / "chdb"),
        "DATA_PROC_AUDIT_KAFKA_TOPIC": audit_topic,
        "DATA_PROC_TOPICS__PARTITIONS": str(PARTITIONS),
        "DATA_PROC_AGGREGATION__INTERVALS": ",".join(INTERVALS),
        "DATA_PROC_AGGREGATION__ALLOWED_LATENESS_MS": str(LATENESS_MS),
        "DATA_PROC_AGGREGATION__IDLE_TIMEOUT_MS": str(IDLE_MS),
        "DATA_PROC_LOOP__TICK_INTERVAL_MS": "200",
        # INFO: rebalances, restores, idle closes, producer and consumer replacements (a few lines a run)
        "DATA_PROC_LOG_LEVEL": "INFO",
    })
    env.update({f"DATA_PROC_TOPICS__{name}": topic for name, topic in topics.items()})
    pipe = Pipeline(env=env, ports={s: free_port() for s in ("normalization", "enrichment", "aggregation",
                                                              "projection")},
                    run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    per_service = {s: {"DATA_PROC_KAFKA__GROUP_ID": f"{prefix}-{s}", "DATA_PROC_INSTANCE_ID": f"{prefix}-{s}"}
                   for s in pipe.services}
    cleanup: list[Callable[[], None]] = []
    yield {"prefix": prefix, "topics": topics, "pipe": pipe, "per_service": per_service,
           "redis_url": redis_url, "bootstrap": kafka_bootstrap, "tmp": tmp_path, "cleanup": cleanup,
           "phases": Phases()}
    for step in cleanup:
        step()
    pipe.stop_all()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"md:*{prefix}*", count=1000):
        client.delete(key)


def produce(bootstrap: str, topic: str, ticks: list[RawTick]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                         "enable.idempotence": True, "linger.ms": 10})
    for tick in ticks:
        producer.produce(topic, key=tick.key, value=tick.value)
        producer.poll(0)
    assert producer.flush(30) == 0


def expected_arrivals(ticks: list[RawTick], prefix: str) -> list[Arrival]:
    """What aggregation must see: valid ticks of active, known instruments, per partition in order."""
    return arrivals_from_raw(ticks, {(v, s) for v, s, *_ in INSTRUMENTS}, PARTITIONS,
                             lambda venue, symbol: f"{prefix}.{venue}.{symbol}")


def wait_until(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what()}")


class Phases:
    """When each phase of the run ended (seconds since the start), for the evidence of a failure."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.ended: list[tuple[str, float]] = []

    def done(self, name: str) -> None:
        self.ended.append((name, time.monotonic() - self.start))

    def __str__(self) -> str:
        return ", ".join(f"{name} {at:.1f}s" for name, at in self.ended) or "(none)"


def evidence(chain: dict[str, Any]) -> str:
    """What explains a failed run: phase timings, where every input partition stands, the services'
    lag, transactions, rebalances and health, and the tails of their logs. Also written to
    `evidence.txt` beside the whole logs (`logs/`) in the test's temporary folder."""
    pipe: Pipeline = chain["pipe"]
    parts = [f"phases: {chain['phases']}; load average {os.getloadavg()}"]
    groups = {s: chain["per_service"][s]["DATA_PROC_KAFKA__GROUP_ID"] for s in SERVICES}
    try:
        parts.append(chain_snapshot(chain["bootstrap"], pipe, groups, chain["topics"]))
    except Exception as exc:
        parts.append(f"chain snapshot failed: {exc!r}")
    for service in pipe.services:
        proc = pipe.procs.get(service)
        code = None if proc is None else proc.poll()
        state = "running" if proc is not None and code is None else f"exited with {code}"
        parts.append(f"--- {service} ({state}), last lines of {pipe.log_dir / (service + '.log')}\n"
                     f"{pipe.log_tail(service, 60)}")
    text = "\n".join(parts)
    (chain["tmp"] / "evidence.txt").write_text(text + "\n")
    return text


@contextlib.contextmanager
def evidence_on_failure(chain: dict[str, Any]) -> Iterator[None]:
    """Print `evidence` when the block fails (pytest shows it with the failure), services still running."""
    try:
        yield
    except (Exception, pytest.fail.Exception):
        print(evidence(chain), flush=True)
        raise


def largest_gaps(records: list[InRecord]) -> dict[str, float]:
    """`topic[partition]` -> the longest time (s, record timestamps) between two consecutive records."""
    stamps: dict[str, list[int]] = {}
    for rec in records:
        stamps.setdefault(f"{rec.topic}[{rec.partition}]", []).append(rec.timestamp_ms)
    return {tp: max(b - a for a, b in itertools.pairwise(ts)) / 1000
            for tp, ts in sorted(stamps.items()) if len(ts) > 1}


def final_bars_on_topic(records: list[InRecord]) -> list[dict[str, Any]]:
    bars = [avro.decode(r.value, "bar") for r in records if r.value]
    return [b for b in bars if b["is_final"]]


def test_generated_stream_through_the_whole_chain(chain: dict[str, Any],
                                                  consume_all: Callable[..., list[InRecord]]) -> None:
    with evidence_on_failure(chain):
        _whole_chain(chain, consume_all)
    print(f"phases: {chain['phases']}")


def _whole_chain(chain: dict[str, Any], consume_all: Callable[..., list[InRecord]]) -> None:
    prefix, topics, pipe, phases = chain["prefix"], chain["topics"], chain["pipe"], chain["phases"]
    # event times over 10 minutes ending 65 minutes ago, so in an hour that has ended: the idle timer
    # finalizes only windows whose close has passed on the wall clock, and this run waits for all
    cfg = GeneratorConfig(
        count=4000, seed=11, start_ns=(time.time_ns() // 10**9 - 4500) * 10**9, step_ns=150 * 10**6,
        malformed_share=0.02, duplicate_share=0.02, out_of_order_share=0.03, late_share=0.01,
        unknown_share=0.01, extra_unknown=(Instrument("XNYS", "NOSUCH", "equity"),
                                           Instrument(*INACTIVE[:3])),
    )
    instruments = [Instrument(v, s, a, t) for v, s, a, _c, t in INSTRUMENTS]
    ticks = list(generate(instruments, cfg))
    tags = Counter(t.tag for t in ticks)
    inactive_sent = sum(1 for t in ticks if t.tag is Tag.UNKNOWN and t.symbol == INACTIVE[1])
    produce(chain["bootstrap"], topics["RAW"], ticks)
    phases.done("produced")

    for service in pipe.services:
        pipe.start(service, chain["per_service"][service])
    for service in pipe.services:
        pipe.wait_ready(service, 180)
    phases.done("ready")
    # a real Prometheus scrapes the four services during the run (the overview dashboard's queries)
    prometheus = PrometheusServer(write_local_config(chain["tmp"], dict(pipe.ports)))
    prometheus.start()
    chain["cleanup"].append(prometheus.stop)

    reference = compute(expected_arrivals(ticks, prefix), INTERVALS, LATENESS_MS * 10**6)
    expected_finals = len(reference.bars)
    assert expected_finals > 20, "the data set must exercise several windows"
    assert reference.late, "the data set must exercise late trades"

    # every window closes: the watermark passes most of them, the idle timer the rest
    seen: list[int] = [0]

    def finals_seen() -> bool:
        seen[0] = len(final_bars_on_topic(consume_all([topics["BARS"]], timeout=30)))
        return seen[0] >= expected_finals

    wait_until(finals_seen, 240, lambda: f"{expected_finals} final bars on the bars topic (saw {seen[0]})")
    phases.done("finals seen")
    pipe.wait_drained(timeout=120)
    phases.done("drained")
    # drained above is consumed with zero lag; the checks below need every cycle committed (projection
    # writes Redis before its commit): the groups' committed offsets reach the end of their inputs
    wait_committed(chain["bootstrap"], {chain["per_service"][s]["DATA_PROC_KAFKA__GROUP_ID"]:
                                        [topics[name] for name in CHAIN_INPUTS[s]] for s in pipe.services},
                   timeout=120)
    phases.done("committed")
    normalized_records = consume_all([topics["NORMALIZED"]], timeout=30)
    enriched_records = consume_all([topics["ENRICHED"]], timeout=30)
    # a partition that goes without records for the idle timeout has its windows closed early (and
    # its later trades come out late): how close the run came to that, for a failure's message
    gaps = (f"largest gap between consecutive records per partition: "
            f"{largest_gaps(normalized_records + enriched_records)} (idle timeout {IDLE_MS / 1000:.0f}s)")
    print(gaps)

    # 1. the bars topic: every final bar exactly once, equal to the reference
    finals = final_bars_on_topic(consume_all([topics["BARS"]], timeout=30))
    keys = [(b["instrument_id"], b["interval"], b["window_start_ms"]) for b in finals]
    assert len(keys) == len(set(keys)), "a final bar appeared twice on the bars topic"
    assert diff_bars(reference.bars, {k: b for k, b in zip(keys, finals, strict=True)}) == [], gaps

    # 2. ClickHouse FINAL through aggregation's read API
    from_ch: dict[tuple[str, str, int], dict[str, Any]] = {}
    for venue, sym, *_ in INSTRUMENTS:
        for interval in INTERVALS:
            query = urllib.parse.urlencode({"instrument": f"{prefix}.{venue}.{sym}", "interval": interval,
                                            "final": "true", "limit": 10000})
            status, body = http_get(pipe.url("aggregation", f"/api/v1/bars?{query}"), timeout=30)
            assert status == 200, body
            payload = json.loads(body)
            rows = payload["bars"] if isinstance(payload, dict) else payload
            for row in rows:
                from_ch[(row["instrument_id"], row["interval"], int(row["window_start_ms"]))] = row
    assert diff_bars(reference.bars, from_ch) == [], gaps

    # 3. Redis: the history of final bars and the latest bar of every instrument and interval
    client = redis.Redis.from_url(chain["redis_url"], decode_responses=True)
    from_redis: dict[tuple[str, str, int], dict[str, Any]] = {}
    latest: dict[tuple[str, str], RefBar] = {}
    for bar in reference.bars.values():
        k = (bar.instrument_id, bar.interval)
        if k not in latest or latest[k].window_start_ms < bar.window_start_ms:
            latest[k] = bar
    for (inst, interval), bar in latest.items():
        for member in client.zrange(f"md:bars:{inst}:{interval}", 0, -1):
            row = json.loads(member)
            from_redis[(inst, interval, int(row["window_start"]))] = row
        head = client.hgetall(f"md:bar:{inst}:{interval}")
        assert int(head["window_start"]) == bar.window_start_ms
        assert head["is_final"] in ("1", "true", "True")
        assert float(head["close"]) == bar.close
    assert diff_bars(reference.bars, from_redis) == [], gaps
    tick_hash = client.hgetall(f"md:tick:{prefix}.XNYS.IBM")
    assert tick_hash, "no latest-tick hash for an active instrument"

    # 4. dead letters by reason, and every record accounted for
    dead = [json.loads(r.value) for r in consume_all([topics["DEADLETTER"]], timeout=30) if r.value]
    by_reason = Counter((d["service"], d["reason"]) for d in dead)
    assert sum(n for (svc, _), n in by_reason.items() if svc == "normalization") == tags[Tag.MALFORMED]
    assert by_reason[("enrichment", "unknown_instrument")] == tags[Tag.UNKNOWN] - inactive_sent
    assert by_reason[("enrichment", "inactive_instrument")] == inactive_sent
    late_trades = len({idx for idx, _ in reference.late})
    assert by_reason[("aggregation", "late_trade")] == late_trades, gaps
    for letter in dead:
        assert letter["payload_b64"]
        assert letter["source_topic"] in topics.values()

    normalized, enriched = len(normalized_records), len(enriched_records)
    duplicates = _metric_sum(pipe, "normalization", "dp_duplicates_total")
    normalization_dead = sum(n for (svc, _), n in by_reason.items() if svc == "normalization")
    assert duplicates == tags[Tag.DUPLICATE]
    assert normalized + normalization_dead + duplicates == len(ticks)
    assert enriched + by_reason[("enrichment", "unknown_instrument")] + inactive_sent == normalized

    # 5. the overview dashboard's main queries return data for every stage from a real Prometheus
    prometheus.wait_for_targets(up=4)
    queries = overview_queries(window="2m")
    for title in ("Input per stage (records in/s)", "Throughput per stage (records out/s)", "Stages up",
                  "Consumer lag", "Dependency health"):
        services = {sample.labels.get("service", "") for sample in prometheus.query(queries[title])}
        # projection writes to Redis, not to a topic: it has no Kafka output to show
        expected = set(pipe.services) - ({"projection"} if "out/s" in title else set())
        assert expected <= services, f"{title}: only {services}; {scrape_health(prometheus)}"
    phases.done("checked")
    print(scrape_health(prometheus))


def scrape_health(prometheus: PrometheusServer) -> str:
    """Failed scrapes and the slowest scrape per service during the run (a failed scrape marks the
    target's series stale: instant queries then miss that service until the next good scrape)."""
    failed = prometheus.query('sum by (service) (count_over_time(up{job="data-processing"}[15m])'
                              ' - sum_over_time(up{job="data-processing"}[15m]))')
    slowest = prometheus.query('max by (service) (max_over_time('
                               'scrape_duration_seconds{job="data-processing"}[15m]))')
    return ("scrapes failed " + ", ".join(f"{s.labels.get('service')}={s.value:.0f}" for s in failed)
            + "; slowest scrape " + ", ".join(f"{s.labels.get('service')}={s.value:.3f}s" for s in slowest))


def _metric_sum(pipe: Pipeline, service: str, name: str) -> int:
    # one request, not a poll: a loaded machine gets more than http_get's default 2 s to answer
    status, body = http_get(pipe.url(service, "/metrics"), timeout=30)
    assert status == 200, f"{service} /metrics: {status}"
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
