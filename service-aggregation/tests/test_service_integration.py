"""`python -m aggregation` as a real process on the real broker and an embedded ClickHouse folder.

Also: start-up against a ClickHouse server that refuses connections (a real process), and a
ClickHouse lost while running (`serve` in-process, the real engine behind a fault switch).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aggregation.app import AggregationProcessor
from aggregation.service import build_processor
from aggregation.settings import AggregationSettings
from aggregation.sink import BarSink
from confluent_kafka import Consumer, Producer, TopicPartition
from dataproc_shared import avro
from dataproc_shared.clickhouse import ChdbClickHouse, ClickHouseError, QueryResult
from dataproc_shared.config import kafka_common_config, load_settings
from dataproc_shared.deadletter import decode_dead_letter
from dataproc_shared.migrate import clickhouse_values, migrate_clickhouse
from dataproc_shared.records import InRecord
from dataproc_shared.service import ServiceContext, serve
from dataproc_shared.state import ChangelogStore
from dataproc_shared.testing import unique_name

pytestmark = pytest.mark.integration

NS = 1_000_000_000
BASE = 1_763_900_000 * NS  # 2025-11-23, a minute boundary
INTERVALS = {"1m": 60 * NS, "5m": 300 * NS}
INSTRUMENTS = [("XNYM", "CLZ6", 0), ("XNYM", "NGZ6", 1), ("XCME", "ESZ6", 0)]


@dataclass(frozen=True)
class Sent:
    instrument_id: str
    venue: str
    venue_symbol: str
    ts_ns: int
    price: float
    size: float
    partition: int
    offset: int


def tick_value(venue: str, vsym: str, ts_ns: int, price: float | None, size: float | None,
               kind: str = "TRADE") -> bytes:
    return avro.encode("enriched_tick", {
        "instrument_id": f"{vsym}.{venue}", "venue": venue, "venue_symbol": vsym, "symbol": vsym[:2],
        "asset_class": "future", "currency": "USD", "tick_size": 0.01, "multiplier": None,
        "venue_timezone": "UTC", "kind": kind, "ts_ns": ts_ns, "seq": None, "trade_id": None,
        "price": price, "size": size, "bid": None if kind == "TRADE" else 1.0,
        "ask": None if kind == "TRADE" else 1.1, "bid_size": None, "ask_size": None,
        "ingest_ns": ts_ns, "source_partition": 0, "source_offset": 0,
    })


class Feed:
    """Produces enriched ticks partition by partition and remembers the trades (with their offsets)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        self.topic = topic
        self.next_offset = {0: 0, 1: 0}
        self.trades: list[Sent] = []

    def send(self, venue: str, vsym: str, partition: int, ts_ns: int, price: float | None = None,
             size: float | None = None, kind: str = "TRADE") -> int:
        self.producer.produce(self.topic, key=f"{venue}:{vsym}".encode(),
                              value=tick_value(venue, vsym, ts_ns, price, size, kind), partition=partition)
        offset = self.next_offset[partition]
        self.next_offset[partition] += 1
        if kind == "TRADE":
            assert price is not None
            assert size is not None
            self.trades.append(Sent(f"{vsym}.{venue}", venue, vsym, ts_ns, price, size, partition, offset))
        return offset

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def expected_finals(trades: list[Sent]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Naive bars from trades that all arrive on time (ascending event time per partition)."""
    groups: dict[tuple[str, str, int], list[Sent]] = {}
    for t in trades:
        for name, length in INTERVALS.items():
            groups.setdefault((t.instrument_id, name, t.ts_ns // length * length // 1_000_000), []).append(t)
    out = {}
    for key, ts in groups.items():
        volume = 0.0
        pv = 0.0
        for t in ts:
            volume += t.size
            pv += t.price * t.size
        first = min(ts, key=lambda t: (t.ts_ns, t.offset))
        last = max(ts, key=lambda t: (t.ts_ns, t.offset))
        out[key] = {"open": first.price, "high": max(t.price for t in ts), "low": min(t.price for t in ts),
                    "close": last.price, "volume": volume, "vwap": pv / volume, "trade_count": len(ts),
                    "version": len(ts) + 1, "source_partition": first.partition,
                    "offset_from": min(t.offset for t in ts), "offset_to": max(t.offset for t in ts)}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "aggregation"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def get_or_none(self, path: str) -> tuple[int, Any] | None:
        """`get`, or None while nothing listens on the port yet."""
        try:
            return self.get(path)
        except OSError:
            return None

    def get(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.env['DATA_PROC_HTTP__PORT']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()


@pytest.fixture
def setup(topic_factory: Callable[..., str], kafka_bootstrap: str, tmp_path: Path
          ) -> Iterator[tuple[Service, Feed, dict[str, str]]]:
    enriched = topic_factory("agg-in", partitions=2)
    topics = {
        "enriched": enriched,
        "bars": topic_factory("agg-bars", partitions=2),
        "deadletter": topic_factory("agg-dl", partitions=1),
        "changelog": topic_factory("agg-cl", partitions=2, config={"cleanup.policy": "compact"}),
        "audit": topic_factory("agg-audit", partitions=1),
    }
    env = {
        **os.environ,
        "DATA_PROC_ENV": "local",
        "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DATA_PROC_CLICKHOUSE_URL": str(tmp_path / "chdb"),
        "DATA_PROC_HTTP__PORT": str(free_port()),
        "DATA_PROC_INSTANCE_ID": unique_name("agg"),
        "DATA_PROC_KAFKA__GROUP_ID": unique_name("agg-group"),
        "DATA_PROC_TOPICS__ENRICHED": topics["enriched"],
        "DATA_PROC_TOPICS__BARS": topics["bars"],
        "DATA_PROC_TOPICS__DEADLETTER": topics["deadletter"],
        "DATA_PROC_TOPICS__AGGREGATION_WINDOWS_CHANGELOG": topics["changelog"],
        "DATA_PROC_AUDIT_KAFKA_TOPIC": topics["audit"],
        "DATA_PROC_AGGREGATION__INTERVALS": "1m,5m",
        "DATA_PROC_AGGREGATION__ALLOWED_LATENESS_MS": "2000",
        "DATA_PROC_AGGREGATION__IDLE_TIMEOUT_MS": "3600000",
        "DATA_PROC_AGGREGATION__UPDATE_INTERVAL_MS": "200",
        "DATA_PROC_LOOP__TICK_INTERVAL_MS": "200",
        "DATA_PROC_LOG_LEVEL": "WARNING",
    }
    service = Service(env, tmp_path / "aggregation.log")
    feed = Feed(kafka_bootstrap, enriched)
    try:
        yield service, feed, topics
    finally:
        service.stop()


def send_trades(feed: Feed, n: int, start_ns: int) -> int:
    """`n` trades spread over the instruments with rising event time; returns the last event time."""
    ts = start_ns
    for i in range(n):
        venue, vsym, p = INSTRUMENTS[i % len(INSTRUMENTS)]
        ts += 997_000_000 + (i % 7) * 1_000_000  # just under a second apart
        feed.send(venue, vsym, p, ts, price=100.0 + (i * 37 % 101) / 4, size=float(1 + i % 5))
        if i % 10 == 3:
            feed.send(venue, vsym, p, ts, kind="QUOTE")
    return ts


def close_everything(feed: Feed, after_ns: int) -> None:
    """A quote per partition far after the data: the watermark passes every window."""
    for venue, vsym, p in INSTRUMENTS[:2]:
        feed.send(venue, vsym, p, after_ns + 3600 * NS, kind="QUOTE")


def bars_on_topic(consume_all: Callable[..., list[InRecord]], topic: str) -> list[dict[str, Any]]:
    return [avro.decode(r.value or b"", "bar") | {"_key": r.key, "_partition": r.partition}
            for r in consume_all([topic], read_committed=True, timeout=60)]


def wait_for_finals(consume_all: Callable[..., list[InRecord]], topic: str, n: int,
                    service: Service, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        bars = bars_on_topic(consume_all, topic)
        finals = [b for b in bars if b["is_final"]]
        if len(finals) >= n:
            return bars
        assert service.proc is not None
        assert service.proc.poll() is None, service.log_path.read_text()[-3000:]
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(finals)} of {n} final bars after {timeout}s")
        time.sleep(1)


def check_finals(bars: list[dict[str, Any]], expected: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    finals = [b for b in bars if b["is_final"]]
    keys = [(b["instrument_id"], b["interval"], b["window_start_ms"]) for b in finals]
    assert len(keys) == len(set(keys)), "a final bar appeared twice on the topic"
    assert set(keys) == set(expected)
    for b in finals:
        exp = expected[(b["instrument_id"], b["interval"], b["window_start_ms"])]
        assert {k: b[k] for k in exp} == exp
        assert b["_partition"] == b["source_partition"]
        assert b["_key"] == f"{b['venue']}:{b['instrument_id'].split('.')[0]}".encode()
    for b in bars:
        if not b["is_final"]:
            exp = expected[(b["instrument_id"], b["interval"], b["window_start_ms"])]
            assert b["version"] == b["trade_count"] < exp["version"]


def test_known_ticks_make_exact_bars_on_the_topic_and_in_clickhouse(
    setup: tuple[Service, Feed, dict[str, str]], consume_all: Callable[..., list[InRecord]],
) -> None:
    service, feed, topics = setup
    last = send_trades(feed, 240, BASE)
    feed.flush()
    service.start()
    # a trade for a window long closed on partition 0
    late_offset = feed.send("XNYM", "CLZ6", 0, BASE + 2 * NS, price=1.0, size=1.0)
    feed.trades.pop()
    close_everything(feed, last)
    feed.flush()
    expected = expected_finals(feed.trades)
    bars = wait_for_finals(consume_all, topics["bars"], len(expected), service)
    check_finals(bars, expected)

    dead = [decode_dead_letter(r.value or b"") for r in consume_all([topics["deadletter"]], timeout=30)]
    assert [(d["reason"], d["source_offset"]) for d in dead] == [("late_trade", late_offset)]

    # the read API serves the same final bars from ClickHouse FINAL
    instrument = "CLZ6.XNYM"
    status, body = service.get(f"/api/v1/bars?instrument={instrument}&interval=1m")
    assert status == 200
    want = sorted((k[2], v) for k, v in expected.items() if k[0] == instrument and k[1] == "1m")
    assert [b["window_start_ms"] for b in body["bars"]] == [w for w, _ in want]
    for got, (_, exp) in zip(body["bars"], want, strict=True):
        assert {k: got[k] for k in exp} == exp
        assert got["is_final"] is True
    status, csv_text = service.get(f"/api/v1/bars?instrument={instrument}&interval=5m&format=csv")
    assert status == 200
    assert csv_text.count("\n") == 1 + sum(1 for k in expected if k[0] == instrument and k[1] == "5m")
    status, latest = service.get(f"/api/v1/bars/latest?instrument={instrument}&interval=5m&final=true")
    assert status == 200
    assert latest["window_start_ms"] == max(k[2] for k in expected if k[0] == instrument and k[1] == "5m")
    status, summary = service.get("/api/v1/summary")
    assert status == 200
    assert summary["instruments"] == 3
    by_interval = {r["interval"]: r for r in summary["intervals"]}
    assert by_interval["1m"]["final_bars"] == sum(1 for k in expected if k[1] == "1m")
    assert (by_interval["1m"]["open_bars"], by_interval["1m"]["first_open_end_ms"]) == (0, None)
    for bad in ("/api/v1/bars?interval=1m", "/api/v1/bars?instrument=X&interval=7q",
                "/api/v1/bars?instrument=X&interval=1m&from=yesterday",
                "/api/v1/bars?instrument=X&interval=1m&limit=0",
                "/api/v1/bars?instrument=X&interval=1m&final=maybe"):
        status, err = service.get(bad)
        assert status == 400, bad
        assert err["error"]
    # the audit loader brought the late trade's dead-letter event into ClickHouse
    deadline = time.monotonic() + 60
    while True:
        status, audit = service.get("/api/v1/audit?event_type=dead_letter&reason=late_trade")
        if status == 200 and audit["events"]:
            break
        assert time.monotonic() < deadline, (status, audit)
        time.sleep(1)
    assert audit["events"][0]["offset_from"] == late_offset


def count_finals(consume_all: Callable[..., list[InRecord]], topic: str) -> int:
    return sum(1 for b in bars_on_topic(consume_all, topic) if b["is_final"])


def wait_until(cond: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_at_several_points_gives_identical_final_bars(
    setup: tuple[Service, Feed, dict[str, str]], consume_all: Callable[..., list[InRecord]],
) -> None:
    service, feed, topics = setup
    # The input keeps arriving while the service is killed: a producer thread feeds 3,000 trades over
    # about 25 seconds.
    done = threading.Event()
    last_ts: list[int] = []

    def produce() -> None:
        ts = BASE
        for _ in range(100):
            ts = send_trades(feed, 30, ts)
            feed.flush()
            time.sleep(0.25)
        last_ts.append(ts)
        done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    service.start()
    kills = []
    seen = 0
    for pause in (0.2, 0.7, 0.4):
        before = seen
        # progress, or the input has ended (on a loaded machine a restart can outlast the feed)
        wait_until(lambda before=before: count_finals(consume_all, topics["bars"]) > before  # type: ignore[misc]
                   or (done.is_set() and len(kills) >= 2), 120,
                   lambda: f"no progress after {kills}: " + service.log_path.read_text()[-4000:])
        if count_finals(consume_all, topics["bars"]) == before:
            break  # nothing left to interrupt: the remaining finals need the closing trades below
        time.sleep(pause)
        service.kill9()
        seen = count_finals(consume_all, topics["bars"])
        kills.append(seen)
        service.start()
    producer.join(60)
    assert done.is_set()
    close_everything(feed, last_ts[0])
    feed.flush()
    expected = expected_finals(feed.trades)
    # killed mid-stream: each kill saw some but not all of the final bars
    assert len(kills) >= 2, kills
    assert all(0 < k < len(expected) for k in kills), kills
    bars = wait_for_finals(consume_all, topics["bars"], len(expected), service)
    check_finals(bars, expected)
    wait_until(lambda: service.get("/health")[0] in (200, 503), 60, "http server")
    status, body = service.get("/api/v1/summary")
    assert status == 200
    by_interval = {r["interval"]: r for r in body["intervals"]}
    assert by_interval["1m"]["final_bars"] == sum(1 for k in expected if k[1] == "1m")
    assert by_interval["5m"]["final_bars"] == sum(1 for k in expected if k[1] == "5m")
    status, body = service.get("/api/v1/bars?instrument=NGZ6.XNYM&interval=1m&limit=10000")
    want = {k[2]: v for k, v in expected.items() if k[0] == "NGZ6.XNYM" and k[1] == "1m"}
    assert {b["window_start_ms"]: {k: b[k] for k in want[b["window_start_ms"]]} for b in body["bars"]} == want


def test_an_unreachable_clickhouse_server_at_start_is_waited_for(
    setup: tuple[Service, Feed, dict[str, str]], consume_all: Callable[..., list[InRecord]],
) -> None:
    """Configured for a ClickHouse server on a port that refuses connections, the service waits.

    It serves its health routes (unhealthy, `clickhouse` down naming the server, not ready, live),
    retries with a doubling delay capped at `loop.startup_backoff_max_s`, consumes nothing
    meanwhile, and a SIGTERM while it waits stops it cleanly.
    """
    service, feed, topics = setup
    refused = free_port()  # nothing listens there: every connection is refused
    service.env.update({"DATA_PROC_CLICKHOUSE_URL": f"http://127.0.0.1:{refused}",
                        "DATA_PROC_LOOP__STARTUP_BACKOFF_MAX_S": "1", "DATA_PROC_LOG_LEVEL": "INFO"})
    send_trades(feed, 30, BASE)
    feed.flush()
    service.start()
    wait_until(lambda: service.get_or_none("/health") is not None, 60,
               lambda: service.log_path.read_text()[-3000:])
    # at least four attempts: 0.5 s, then 1 s apart (the cap)
    wait_until(lambda: service.log_path.read_text().count("waiting for clickhouse") >= 4, 60,
               lambda: service.log_path.read_text()[-3000:])
    status, health = service.get("/health")
    assert status == 503
    assert health["status"] == "unhealthy"
    clickhouse = health["dependencies"]["clickhouse"]
    assert clickhouse["status"] == "down"
    assert f"127.0.0.1:{refused}" in clickhouse["last_error"]
    assert service.get("/ready")[0] == 503
    assert service.get("/live")[0] == 200
    log = service.log_path.read_text()
    waits = [line for line in log.splitlines() if "waiting for clickhouse" in line]
    attempts = [int(re.search(r"attempt=(\d+)", line).group(1)) for line in waits]  # type: ignore[union-attr]
    delays = [float(re.search(r"retry_in_s=([\d.]+)", line).group(1)) for line in waits]  # type: ignore[union-attr]
    assert attempts == list(range(1, len(waits) + 1))
    assert delays[:3] == [0.5, 1.0, 1.0]
    assert "service starting" not in log
    assert bars_on_topic(consume_all, topics["bars"]) == []  # nothing consumed while it waits
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0
    assert "service stopped while waiting for clickhouse" in service.log_path.read_text()


class LosableClickHouse:
    """A real embedded engine behind a switch: while `lost` is set every call fails like a lost server.

    Fault injection in front of the real engine (the rows that do get through are stored by chDB).
    """

    backend = "chdb"
    address = "engine behind a fault switch"

    def __init__(self, inner: ChdbClickHouse) -> None:
        self.inner = inner
        self.lost = threading.Event()
        self.refused = 0

    def _gate(self) -> None:
        if self.lost.is_set():
            self.refused += 1
            raise ClickHouseError("connection refused (server lost)")

    def command(self, sql: str, parameters: Any = None) -> None:
        self._gate()
        self.inner.command(sql, parameters)

    def query(self, sql: str, parameters: Any = None) -> QueryResult:
        self._gate()
        return self.inner.query(sql, parameters)

    def insert(self, table: str, rows: Any, column_names: Any, dedup_token: str | None = None) -> int:
        self._gate()
        return self.inner.insert(table, rows, column_names, dedup_token)

    def close(self) -> None:
        self.inner.close()


def inprocess_settings(topic_factory: Callable[..., str], kafka_bootstrap: str, clickhouse_url: str,
                       http_port: int) -> AggregationSettings:
    """Settings of an in-process aggregation on fresh topics (two partitions), 1m and 5m bars."""
    return load_settings(
        AggregationSettings, service="aggregation", instance_id=unique_name("agg"),
        kafka_bootstrap=kafka_bootstrap, clickhouse_url=clickhouse_url,
        http={"host": "127.0.0.1", "port": http_port}, kafka={"group_id": unique_name("agg-group")},
        loop={"tick_interval_ms": 200, "startup_backoff_max_s": 1},
        topics={"enriched": topic_factory("agg-in", 2), "bars": topic_factory("agg-bars", 2),
                "deadletter": topic_factory("agg-dl", 1),
                "aggregation_windows_changelog": topic_factory("agg-cl", 2, {"cleanup.policy": "compact"})},
        aggregation={"intervals": "1m,5m", "allowed_lateness_ms": 2000, "idle_timeout_ms": 3_600_000,
                     "update_interval_ms": 200},
    )


async def wait_for_finals_in(task: asyncio.Task[Any], consume_all: Callable[..., list[InRecord]], topic: str,
                             n: int, timeout: float = 120) -> list[dict[str, Any]]:
    """The bars on `topic` once `n` finals are there; fails if the in-process service `task` ends."""
    deadline = time.monotonic() + timeout
    while True:
        bars = await asyncio.to_thread(bars_on_topic, consume_all, topic)
        if sum(1 for b in bars if b["is_final"]) >= n:
            return bars
        assert not task.done(), task
        assert time.monotonic() < deadline, f"{len(bars)} bars, {n} finals expected"
        await asyncio.sleep(1)


def check_finals_in_clickhouse(engine: ChdbClickHouse, expected: dict[tuple[str, str, int], dict[str, Any]]
                               ) -> None:
    """The final bars in `FINAL` are exactly the expected ones, with the expected values."""
    fields = ("open", "high", "low", "close", "volume", "trade_count", "version")
    rows = engine.query(
        "SELECT instrument_id, interval, toUnixTimestamp64Milli(window_start) AS ws, open, high, low, "
        "close, volume, trade_count, version FROM market_data.bars FINAL WHERE is_final = 1").dicts()
    assert len(rows) == len(expected)
    for row in rows:
        exp = expected[(row["instrument_id"], row["interval"], row["ws"])]
        assert {k: row[k] for k in fields} == {k: exp[k] for k in fields}


async def test_a_clickhouse_lost_while_running_rolls_cycles_back_and_loses_no_bar(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every cycle whose bars cannot be inserted is rolled back (nothing reaches the bars topic) and
    retried; once ClickHouse answers again the same final bars are on the topic and in `FINAL`."""
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    settings = inprocess_settings(topic_factory, kafka_bootstrap, str(tmp_path / "unused"), 0)
    enriched, bars_topic = settings.topics.enriched, settings.topics.bars
    engine = ChdbClickHouse(str(tmp_path / "chdb"))
    migrate_clickhouse(engine, values=clickhouse_values())
    client = LosableClickHouse(engine)
    client.lost.set()

    def factory(ctx: ServiceContext) -> AggregationProcessor:
        store = ChangelogStore(topic=settings.topics.changelog("aggregation", "windows"),
                               kafka_config=kafka_common_config(settings), codec="bytes")
        return AggregationProcessor(config=settings.aggregation.window_config(), input_topic=enriched,
                                    bars_topic=bars_topic, store=store,
                                    sink=BarSink(client, ctx.metrics), metrics=ctx.metrics)

    feed = Feed(kafka_bootstrap, enriched)
    close_everything(feed, send_trades(feed, 120, BASE))
    feed.flush()
    expected = expected_finals(feed.trades)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, factory, input_topics=[enriched], stop=stop))
    try:
        deadline = time.monotonic() + 120
        while client.refused < 4:  # four cycles in a row rolled back
            assert not task.done(), task
            assert time.monotonic() < deadline, client.refused
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(bars_on_topic, consume_all, bars_topic) == []
        assert engine.query("SELECT count() FROM market_data.bars").scalar() == 0
        client.lost.clear()
        check_finals(await wait_for_finals_in(task, consume_all, bars_topic, len(expected)), expected)
        check_finals_in_clickhouse(engine, expected)
    finally:
        stop.set()
        code, timed_out = await asyncio.wait_for(task, 60)
        engine.close()
    assert (code, timed_out) == (0, False)


async def test_a_clickhouse_unreachable_at_start_is_waited_for_then_the_service_starts(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole start of `python -m aggregation`'s `serve` with a ClickHouse server that is away, then back.

    The server's client is replaced (at `dataproc_shared.service.connect`) by the real embedded
    engine behind a fault switch, closed while `serve` waits: it waits (health: `clickhouse` down,
    not ready), then migrates, consumes and writes the bars.
    """
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    port = free_port()
    settings = inprocess_settings(topic_factory, kafka_bootstrap, "http://127.0.0.1:9/", port)
    engine = ChdbClickHouse(str(tmp_path / "chdb"))
    client = LosableClickHouse(engine)
    client.lost.set()
    urls: list[str] = []

    def connect(url: str, **_options: Any) -> LosableClickHouse:
        urls.append(url)
        return client

    monkeypatch.setattr("dataproc_shared.service.connect", connect)
    feed = Feed(kafka_bootstrap, settings.topics.enriched)
    close_everything(feed, send_trades(feed, 60, BASE))
    feed.flush()
    expected = expected_finals(feed.trades)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, build_processor, input_topics=[settings.topics.enriched],
                                     clickhouse_owner=True, stop=stop))
    http = Service({"DATA_PROC_HTTP__PORT": str(port)}, tmp_path / "unused.log")
    try:
        deadline = time.monotonic() + 60
        while client.refused < 3:  # three attempts: 0.5 s, then 1 s apart
            assert not task.done(), task
            assert time.monotonic() < deadline, client.refused
            await asyncio.sleep(0.1)
        status, health = await asyncio.to_thread(http.get, "/health")
        assert (status, health["status"], health["dependencies"]["clickhouse"]["status"]) == \
            (503, "unhealthy", "down")
        assert "engine behind a fault switch" in health["dependencies"]["clickhouse"]["last_error"]
        assert (await asyncio.to_thread(http.get, "/ready"))[0] == 503
        assert await asyncio.to_thread(bars_on_topic, consume_all, settings.topics.bars) == []
        client.lost.clear()
        bars = await wait_for_finals_in(task, consume_all, settings.topics.bars, len(expected))
        check_finals(bars, expected)
        check_finals_in_clickhouse(engine, expected)
        assert (await asyncio.to_thread(http.get, "/ready"))[0] == 200
        assert urls == ["http://127.0.0.1:9/"]
    finally:
        stop.set()
        code, timed_out = await asyncio.wait_for(task, 60)
        engine.close()
    assert (code, timed_out) == (0, False)


def live_changelog_keys(consume_all: Callable[..., list[InRecord]], topic: str) -> dict[bytes, bytes]:
    """Latest value per key of the changelog (committed records; tombstones remove the key)."""
    latest: dict[bytes, bytes | None] = {}
    for r in consume_all([topic], read_committed=True, timeout=60):
        assert r.key is not None
        latest[r.key] = r.value
    return {k: v for k, v in latest.items() if v is not None}


def test_a_changelog_of_the_previous_format_restores_after_an_upgrade(
    setup: tuple[Service, Feed, dict[str, str]], consume_all: Callable[..., list[InRecord]],
) -> None:
    """Window state written one entry per window (the format before) restores into the service that
    writes one entry per instrument; it converts the changelog and makes the same final bars."""
    service, feed, topics = setup
    service.env["DATA_PROC_AGGREGATION__CHANGELOG_FORMAT"] = "window"
    last = send_trades(feed, 150, BASE)
    feed.flush()
    first_half = len(feed.trades)
    service.start()
    # part of the first half committed: open windows of every instrument in the changelog
    wait_until(lambda: sum(1 for k in live_changelog_keys(consume_all, topics["changelog"])
                           if k.startswith(b"w|")) >= 2 * len(INSTRUMENTS)
               and count_finals(consume_all, topics["bars"]) >= 2 * 150 // 60 - 2, 120,
               lambda: service.log_path.read_text()[-3000:])
    old = live_changelog_keys(consume_all, topics["changelog"])
    assert old
    assert all(k.startswith(b"w|") or k == b"meta" for k in old), sorted(old)
    service.kill9()

    service.env["DATA_PROC_AGGREGATION__CHANGELOG_FORMAT"] = "instrument"
    service.start()
    last = send_trades(feed, 150, last)
    feed.flush()
    assert len(feed.trades) == 2 * first_half
    # converted: the previous format's keys are tombstoned, the instruments' entries written
    wait_until(lambda: not any(k.startswith(b"w|")
                               for k in live_changelog_keys(consume_all, topics["changelog"])),
               120, lambda: service.log_path.read_text()[-3000:])
    live = live_changelog_keys(consume_all, topics["changelog"])
    instruments = {f"i|{vsym}.{venue}".encode() for venue, vsym, _ in INSTRUMENTS}
    assert {k for k in live if k != b"meta"} <= instruments
    assert any(k.startswith(b"i|") for k in live)
    close_everything(feed, last)
    feed.flush()
    expected = expected_finals(feed.trades)
    bars = wait_for_finals(consume_all, topics["bars"], len(expected), service)
    check_finals(bars, expected)
    # every window closed: nothing of the window state stays alive in the compacted topic
    assert set(live_changelog_keys(consume_all, topics["changelog"])) == {b"meta"}


def committed_offset(bootstrap: str, group: str, topic: str, partition: int) -> int:
    """The group's committed offset of one partition (-1001 when none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        [tp] = consumer.committed([TopicPartition(topic, partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


def test_final_bar_commits_with_the_record_that_moves_the_watermark_past_the_close(
    setup: tuple[Service, Feed, dict[str, str]], consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    """The final bar is decided per record: it commits in the same transaction as the input offset of
    the record whose event time passes `window_end + allowed_lateness` - no later cycle, timer or
    idle close is needed (the idle timeout here is an hour)."""
    service, feed, topics = setup
    group = service.env["DATA_PROC_KAFKA__GROUP_ID"]
    lateness = 2 * NS
    start = (BASE // (300 * NS) + 1) * 300 * NS  # the first minute of a 5-minute window
    service.start()
    # trades in the minute [start, start + 60 s) on partition 0 (two instruments) and partition 1
    for i in range(6):
        feed.send("XNYM", "CLZ6", 0, start + (1 + 9 * i) * NS, price=70.0 + i, size=1.0)
        feed.send("XCME", "ESZ6", 0, start + (2 + 9 * i) * NS, price=5000.0 - i, size=2.0)
        feed.send("XNYM", "NGZ6", 1, start + (3 + 9 * i) * NS, price=3.0 + i / 10, size=5.0)
    # the watermark reaches the close (window end + lateness) but does not pass it
    at_close = feed.send("XNYM", "CLZ6", 0, start + 60 * NS + lateness, kind="QUOTE")
    feed.flush()
    wait_until(lambda: committed_offset(kafka_bootstrap, group, topics["enriched"], 0) > at_close, 120,
               lambda: "input not committed: " + service.log_path.read_text()[-3000:])
    assert count_finals(consume_all, topics["bars"]) == 0

    closing = feed.send("XNYM", "CLZ6", 0, start + 60 * NS + lateness + 1, kind="QUOTE")
    feed.flush()
    wait_until(lambda: committed_offset(kafka_bootstrap, group, topics["enriched"], 0) > closing, 120,
               lambda: "closing record not committed: " + service.log_path.read_text()[-3000:])
    # read_committed right after the offset commit: the final bars of partition 0's minute are there
    finals = [b for b in bars_on_topic(consume_all, topics["bars"]) if b["is_final"]]
    assert sorted((b["instrument_id"], b["interval"], b["window_start_ms"]) for b in finals) == [
        ("CLZ6.XNYM", "1m", start // 1_000_000), ("ESZ6.XCME", "1m", start // 1_000_000)]
    assert {b["trade_count"] for b in finals} == {6}
    # partition 1's watermark did not move: its minute stays open; the 5-minute windows too
    assert service.proc is not None
    assert service.proc.poll() is None


def test_an_idle_live_partition_closes_its_ended_windows_and_keeps_the_current_hour_open(
    setup: tuple[Service, Feed, dict[str, str]], consume_all: Callable[..., list[InRecord]],
) -> None:
    """The idle timer finalizes a window only once the wall clock has passed its close (window end +
    lateness): a replayed backlog at once, a live feed's short window at its close, never the hour
    that is still running; a later trade of that hour is on time, also after a kill -9 and restart."""
    service, feed, topics = setup
    lateness = 2 * NS
    service.env.update({"DATA_PROC_AGGREGATION__INTERVALS": "10s,1h",
                        "DATA_PROC_AGGREGATION__IDLE_TIMEOUT_MS": "1500"})
    if (time.time_ns() // (3600 * NS) + 1) * 3600 * NS - time.time_ns() < 90 * NS:
        time.sleep(95)  # the current hour ends before the test would: take the next one
    service.start()
    # partition 1: a backlog three hours old; partition 0: a live trade, event time = now
    feed.send("XNYM", "NGZ6", 1, BASE + 7 * NS, price=3.0, size=5.0)
    live_ts = time.time_ns()
    feed.send("XNYM", "CLZ6", 0, live_ts, price=70.0, size=1.0)
    feed.flush()
    ten_s = live_ts // (10 * NS) * (10 * NS)
    hour = live_ts // (3600 * NS) * (3600 * NS)
    bars = wait_for_finals(consume_all, topics["bars"], 3, service, timeout=120)
    records = consume_all([topics["bars"]], read_committed=True, timeout=60)
    finals = {(b["instrument_id"], b["interval"], b["window_start_ms"]): r.timestamp_ms
              for r in records if (b := avro.decode(r.value or b"", "bar"))["is_final"]}
    assert set(finals) == {("NGZ6.XNYM", "10s", (BASE + 7 * NS) // (10 * NS) * 10_000),
                           ("NGZ6.XNYM", "1h", BASE // (3600 * NS) * 3_600_000),
                           ("CLZ6.XNYM", "10s", ten_s // 1_000_000)}, bars
    # the live 10 s window's final bar was produced only after its close on the wall clock
    assert finals[("CLZ6.XNYM", "10s", ten_s // 1_000_000)] >= (ten_s + 10 * NS + lateness) // 1_000_000
    time.sleep(2)  # some more timer runs: the hour stays open
    assert count_finals(consume_all, topics["bars"]) == 3
    hour_end_ms = (hour + 3600 * NS) // 1_000_000

    def hour_open_in_clickhouse() -> bool:
        status, summary = service.get("/api/v1/summary")
        row = {r["interval"]: r for r in summary["intervals"]}.get("1h") if status == 200 else None
        return row is not None and (row["open_bars"], row["first_open_end_ms"], row["last_open_end_ms"]) == (
            1, hour_end_ms, hour_end_ms)

    wait_until(hour_open_in_clickhouse, 60, lambda: f"summary: {service.get('/api/v1/summary')}")

    # a restart from the changelog: the closed window stays closed, the hour open
    service.kill9()
    service.start()
    # for the idle-closed 10 s window (the watermark has not passed it): late for 10s, on time for 1h
    late = feed.send("XNYM", "CLZ6", 0, ten_s + 5 * NS, price=72.0, size=1.0)
    feed.send("XNYM", "CLZ6", 0, time.time_ns(), price=71.0, size=2.0)  # a later window of the hour
    feed.flush()

    def hour_updated() -> bool:
        return any(b["interval"] == "1h" and b["instrument_id"] == "CLZ6.XNYM" and b["trade_count"] == 3
                   for b in bars_on_topic(consume_all, topics["bars"]))

    wait_until(hour_updated, 120, lambda: "no hour update with all three trades: "
               + service.log_path.read_text()[-3000:])
    dead = [decode_dead_letter(r.value or b"") for r in consume_all([topics["deadletter"]], timeout=30)]
    assert [(d["reason"], d["source_offset"]) for d in dead] == [("late_trade", late)]
    assert "10s" in dead[0]["detail"]
    assert "1h" not in dead[0]["detail"]
    bars = bars_on_topic(consume_all, topics["bars"])
    finals_now = [(b["instrument_id"], b["interval"], b["window_start_ms"]) for b in bars if b["is_final"]]
    assert len(finals_now) == len(set(finals_now)), "a final bar appeared twice"
    assert ("CLZ6.XNYM", "1h", hour // 1_000_000) not in finals_now
