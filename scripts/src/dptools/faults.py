"""Fault-injection suite: the whole chain under crashes, outages and network faults, every record checked.

    uv run python -m dptools.faults --profile short            # a few minutes (also in the test suite)
    uv run python -m dptools.faults --profile long --seed 7    # the report run (docs/reliability.md)

One run brings up a PRIVATE stack (own Kafka, PostgreSQL cluster and Redis on free ports, see
`dptools.privstack`; the shared stack is never touched), loads reference data, starts the four
services as processes and feeds a seeded generated stream (trades, quotes, duplicates, malformed,
unknown and inactive instruments, out-of-order and late trades) at a steady rate. While it runs, the
faults of the profile are injected one after another at random moments (seeded):

- `kill9`: kill -9 of a service, restarted at once;
- `second_instance`: a second instance of a service joins the group mid-stream and leaves again
  (partitions move to it and back);
- `zombie`: with a second instance running, the first is SIGSTOPped for longer than the transaction
  timeout and the session timeout, then SIGCONTed: it must be fenced and write nothing;
- `broker_hard` / `broker_clean`: the broker is killed -9 / stopped cleanly, then started again;
- `postgres_down` / `redis_down`: the dependency is stopped for a while, then started again;
- `aggregation_restart`: clean restart of the process that owns the ClickHouse engine;
- `net_blackhole`, `net_reset`, `net_latency`: through TCP proxies in front of PostgreSQL
  (enrichment) and Redis (projection).

A supervisor restarts any service process that exits on its own (what an orchestrator does); such
exits are reported, they are not manual steps. At the end one quote per partition far ahead in event
time (the "watermark pusher", accounted for in the reference) closes every window; then the checks:

1. final bars in ClickHouse (`FINAL`, via aggregation's read API) and in Redis equal the reference;
2. no final bar twice on the bars topic (read_committed);
3. every raw record accounted for by identity (raw partition + offset): exactly once in normalized,
   or in the dead letters, or as a duplicate-dropped audit event; every normalized record exactly once
   in enriched or dead-lettered by enrichment; late trades dead-lettered as the reference says.

The report (faults, counts, mismatches) is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from dptools.netproxy import NetProxy
from dptools.pipeline import REPO, Pipeline, chain_snapshot, http_get
from dptools.privstack import PrivateStack, free_port
from dptools.reference import Arrival, RefBar, arrivals_from_raw, compute, diff_bars
from dptools.ticks import GeneratorConfig, Instrument, RawTick, Tag, generate

log = structlog.get_logger("dptools.faults")

PARTITIONS = 3
INTERVALS = ("1m", "5m", "1h")
LATENESS_MS = 5_000
TX_TIMEOUT_MS = 10_000
SESSION_TIMEOUT_MS = 10_000
#: /live answers 503 when the loop has not ticked for this long; the supervisor restarts after the grace
LIVE_STALL_S = 30
LIVENESS_GRACE_S = 30.0
SERVICES = ("normalization", "enrichment", "aggregation", "projection")
INSTRUMENTS = [
    ("XNYS", "IBM", "equity", "USD", 0.01),
    ("XNYS", "BAC", "equity", "USD", 0.01),
    ("XCEC", "GCZ3", "future", "USD", 0.1),
    ("BINANCE", "BTCUSDT", "crypto", "USD", 0.01),
    ("EPEX", "DE-BASE", "power", "EUR", 0.01),
    ("OANDA", "EURUSD", "fx", "USD", 0.00001),
]
INACTIVE = ("XNYS", "OLDCO", "equity", "USD", 0.01)
NS_PER_S = 10**9


@dataclass(frozen=True)
class Profile:
    """How much data and which faults one run injects."""

    name: str
    count: int
    #: faults in the order of the plan before shuffling: (kind, target, seconds)
    faults: tuple[tuple[str, str, float], ...]
    gap_s: tuple[float, float] = (2.0, 6.0)
    #: how long the final bars may take to appear once the feed is done
    drain_timeout_s: float = 420.0


def _kills(times: int) -> tuple[tuple[str, str, float], ...]:
    return tuple(("kill9", s, 0.0) for _ in range(times) for s in SERVICES)


PROFILES = {
    "short": Profile(
        name="short", count=3_000, gap_s=(1.0, 4.0),
        faults=(*_kills(1),
                ("second_instance", "normalization", 12.0),
                ("zombie", "enrichment", (TX_TIMEOUT_MS + SESSION_TIMEOUT_MS) / 1000 + 6),
                ("redis_down", "redis", 10.0), ("postgres_down", "postgres", 10.0),
                ("net_reset", "postgres", 0.0)),
    ),
    # broker restarts alone over a short stream (see docs/reliability.md, open findings)
    "broker": Profile(
        name="broker", count=2_000, gap_s=(3.0, 6.0),
        faults=(("broker_hard", "kafka", 3.0), ("broker_clean", "kafka", 3.0),
                ("broker_hard", "kafka", 3.0)),
    ),
    "long": Profile(
        name="long", count=24_000, gap_s=(2.0, 8.0),
        faults=(*_kills(4),
                ("second_instance", "normalization", 25.0), ("second_instance", "enrichment", 25.0),
                ("second_instance", "projection", 25.0),
                ("zombie", "enrichment", (TX_TIMEOUT_MS + SESSION_TIMEOUT_MS) / 1000 + 8),
                ("zombie", "normalization", (TX_TIMEOUT_MS + SESSION_TIMEOUT_MS) / 1000 + 8),
                ("broker_hard", "kafka", 5.0), ("broker_clean", "kafka", 5.0),
                ("postgres_down", "postgres", 30.0), ("redis_down", "redis", 30.0),
                ("aggregation_restart", "aggregation", 0.0),
                ("net_blackhole", "postgres", 15.0), ("net_blackhole", "redis", 15.0),
                ("net_reset", "postgres", 0.0), ("net_reset", "redis", 0.0),
                ("net_latency", "postgres", 15.0), ("net_latency", "redis", 15.0)),
    ),
}


@dataclass
class FaultRecord:
    """One injected fault: what, when (seconds since the stream started), how long, what happened."""

    kind: str
    target: str
    at_s: float
    took_s: float = 0.0
    outcome: str = "done"


@dataclass
class Report:
    """Everything a run found; `ok` only when every check passed."""

    profile: str
    seed: int
    faults: list[FaultRecord] = field(default_factory=list)
    self_exits: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    #: defects found that do not break the data guarantees (reported, not failed on)
    findings: list[str] = field(default_factory=list)
    durations_s: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when there is no mismatch."""
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["ok"] = self.ok
        data["faults_by_kind"] = dict(Counter(f.kind for f in self.faults))
        return data


# ---- setup -------------------------------------------------------------------------------------


async def _load_reference(dsn: str, prefix: str) -> None:
    import asyncpg
    from dataproc_shared.migrate import migrate_postgres

    await migrate_postgres(dsn)
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


def _create_topics(bootstrap: str, topics: dict[str, str], audit: str) -> None:
    """The run's topics as a deployment's topic job creates them (`plan_topics`: partitions, settings)."""
    from dataproc_shared.config import Settings, load_settings
    from dataproc_shared.topics import ensure_topics, plan_topics

    settings = load_settings(Settings, topics={**{k.lower(): v for k, v in topics.items()},
                                               "partitions": PARTITIONS, "side_partitions": 1},
                             audit_kafka_topic=audit)
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), plan_topics(settings))


def _with_port(url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def stream(count: int, seed: int, prefix: str) -> tuple[list[RawTick], list[RawTick]]:
    """The generated records and the watermark pushers (one quote per partition, far ahead)."""
    from dataproc_shared.partitioning import partition_for

    step_ns = 150 * 10**6
    span_ns = count * step_ns
    now_s = time.time_ns() // NS_PER_S
    start_ns = (now_s - 600) * NS_PER_S - span_ns - 2 * 3600 * NS_PER_S
    cfg = GeneratorConfig(
        count=count, seed=seed, start_ns=start_ns, step_ns=step_ns,
        malformed_share=0.02, duplicate_share=0.02, out_of_order_share=0.03, late_share=0.01,
        unknown_share=0.01, extra_unknown=(Instrument("XNYS", "NOSUCH", "equity"), Instrument(*INACTIVE[:3])),
    )
    ticks = list(generate([Instrument(v, s, a, t) for v, s, a, _c, t in INSTRUMENTS], cfg))
    front = max(t.ts_ns for t in ticks)
    push_ts = front + 2 * 3600 * NS_PER_S
    pushers: list[RawTick] = []
    covered: set[int] = set()
    for venue, sym, *_ in INSTRUMENTS:
        key = f"{venue}:{sym}".encode()
        part = partition_for(key, PARTITIONS)
        if part in covered:
            continue
        covered.add(part)
        body = {"venue": venue, "symbol": sym, "type": "quote", "ts": push_ts, "bid": 1.0, "ask": 1.1,
                "bid_size": 1, "ask_size": 1}
        pushers.append(RawTick(key, json.dumps(body).encode(), Tag.QUOTE, venue, sym, push_ts))
    del prefix
    return ticks, pushers


def expected_arrivals(ticks: list[RawTick], prefix: str) -> list[Arrival]:
    """What aggregation must see: valid ticks of active, known instruments, per partition in order."""
    return arrivals_from_raw(ticks, {(v, s) for v, s, *_ in INSTRUMENTS}, PARTITIONS,
                             lambda venue, symbol: f"{prefix}.{venue}.{symbol}")


# ---- the run -----------------------------------------------------------------------------------


class Chain:
    """The four services (first instances supervised, second instances on demand) and the stack."""

    def __init__(self, stack: PrivateStack, workdir: Path, prefix: str, env: dict[str, str]) -> None:
        self.stack = stack
        self.prefix = prefix
        self.lock = threading.RLock()
        ports = {s: free_port() for s in SERVICES}
        self.first = Pipeline(env=env, ports=ports, run_dir=workdir / "run", log_dir=workdir / "logs")
        self.second = Pipeline(env=env, ports={s: free_port() for s in SERVICES}, run_dir=workdir / "run-b",
                               log_dir=workdir / "logs-b")
        self.held: set[str] = set()  # first instances deliberately down (not restarted by the supervisor)
        self.self_exits: list[dict[str, Any]] = []
        self._live_since_start: dict[str, bool] = {}  # probe history of the current process
        self._failing_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)

    def ids(self, service: str, which: str) -> dict[str, str]:
        """Group and instance id of an instance."""
        return {"DATA_PROC_KAFKA__GROUP_ID": f"{self.prefix}-{service}",
                "DATA_PROC_INSTANCE_ID": f"{self.prefix}-{service}-{which}"}

    def start(self) -> None:
        """Start the first instances, wait until each is ready, start supervising."""
        for service in SERVICES:
            self.first.start(service, self.ids(service, "a"))
        for service in SERVICES:
            self.first.wait_ready(service, 240)
        self._thread.start()

    def _supervise(self) -> None:
        """What the orchestrator does: restart a process that exited or failed its liveness probe.

        The probe is `/live`, as in the Helm chart; it must have failed for `LIVENESS_GRACE_S` after the
        process was live once.
        """
        live_since_start, failing_since = self._live_since_start, self._failing_since
        while not self._stop.wait(1.0):
            with self.lock:
                for service in SERVICES:
                    proc = self.first.procs.get(service)
                    if service in self.held or proc is None:
                        failing_since.pop(service, None)
                        continue
                    if proc.poll() is not None:
                        self.self_exits.append({"service": service, "cause": "exited",
                                                "exit_code": proc.returncode, "at": time.time(),
                                                "log_tail": self.first.log_tail(service, 8)})
                        log.warning("service exited by itself, restarting", service=service,
                                    code=proc.returncode)
                        self.start_first(service, live_since_start, failing_since)
                        continue
                    if http_get(self.first.url(service, "/live"), timeout=2)[0] == 200:
                        live_since_start[service] = True
                        failing_since.pop(service, None)
                        continue
                    if not live_since_start.get(service):
                        continue
                    first_fail = failing_since.setdefault(service, time.monotonic())
                    if time.monotonic() - first_fail >= LIVENESS_GRACE_S:
                        self.self_exits.append({"service": service, "cause": "liveness probe failed",
                                                "exit_code": None, "at": time.time(),
                                                "log_tail": self.first.log_tail(service, 8)})
                        log.warning("liveness probe failing, killing and restarting", service=service)
                        self.first.kill(service, signal.SIGKILL)
                        self.start_first(service, live_since_start, failing_since)

    def start_first(self, service: str, live: dict[str, bool], failing: dict[str, float]) -> None:
        """(Re)start the first instance of `service` and forget its probe history."""
        live.pop(service, None)
        failing.pop(service, None)
        self.first.start(service, self.ids(service, "a"))

    def restart(self, service: str, sig: int) -> None:
        """Kill (`sig`) or stop (SIGTERM, clean) the first instance of `service` and start it again."""
        with self.lock:
            if sig == signal.SIGTERM:
                self.first.stop(service)
            else:
                self.first.kill(service, sig)
            self.start_first(service, self._live_since_start, self._failing_since)

    def close(self) -> None:
        """Stop supervising and stop every process."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for service in SERVICES:
            with contextlib.suppress(Exception):
                self.second.stop(service)
        for service in reversed(SERVICES):
            pid = self.first.pid(service)
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(Exception):
                self.first.stop(service)


class Injector:
    """Carries out one fault at a time."""

    def __init__(self, chain: Chain, proxies: dict[str, NetProxy], started: float) -> None:
        self.chain = chain
        self.proxies = proxies
        self.started = started

    def run(self, kind: str, target: str, seconds: float) -> FaultRecord:
        """Inject one fault and wait until it is over (the chain recovers on its own)."""
        rec = FaultRecord(kind=kind, target=target, at_s=round(time.monotonic() - self.started, 1))
        t0 = time.monotonic()
        log.info("fault", kind=kind, target=target, seconds=seconds)
        getattr(self, "_" + kind)(target, seconds, rec)
        rec.took_s = round(time.monotonic() - t0, 1)
        return rec

    def _kill9(self, service: str, _s: float, _rec: FaultRecord) -> None:
        self.chain.restart(service, signal.SIGKILL)

    def _aggregation_restart(self, service: str, _s: float, _rec: FaultRecord) -> None:
        self.chain.restart(service, signal.SIGTERM)
        self.chain.first.wait_ready(service, 240)

    def _second_instance(self, service: str, seconds: float, rec: FaultRecord) -> None:
        second = self.chain.second
        second.start(service, self.chain.ids(service, "b"))
        second.wait_ready(service, 240)
        time.sleep(seconds)
        code = second.stop(service)
        rec.outcome = f"second instance ran {seconds:.0f}s, stopped with exit code {code}"

    def _zombie(self, service: str, seconds: float, rec: FaultRecord) -> None:
        chain = self.chain
        second = chain.second
        second.start(service, chain.ids(service, "b"))
        second.wait_ready(service, 240)
        time.sleep(3)
        with chain.lock:
            chain.held.add(service)
            pid = chain.first.pid(service)
        if pid is None:
            rec.outcome = "first instance not running"
            chain.held.discard(service)
            second.stop(service)
            return
        exits_before = len(chain.self_exits)
        log_path = chain.first.log_dir / f"{service}.log"
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        log_size = log_path.stat().st_size
        os.kill(pid, signal.SIGCONT)
        chain.held.discard(service)
        time.sleep(12)  # the zombie wakes up, finds itself fenced or rejoins the group
        with log_path.open("rb") as handle:
            handle.seek(log_size)
            woke = handle.read().decode(errors="replace")
        second.stop(service)
        time.sleep(2)
        exited = len(chain.self_exits) > exits_before
        fences = sorted({m for m in ("UNKNOWN_MEMBER_ID", "ILLEGAL_GENERATION", "FENCED_INSTANCE_ID",
                                     "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "_FENCED")
                         if m in woke})
        seen = ", ".join(fences) or "no fencing error"
        rec.outcome = (f"SIGSTOP {seconds:.0f}s (> transaction timeout {TX_TIMEOUT_MS / 1000:.0f}s); after "
                       f"SIGCONT: {seen}; cycle rolled back: {'cycle rolled back' in woke}; "
                       f"partitions lost: {'partitions lost' in woke}; "
                       + ("exited and was restarted" if exited else "rejoined the group"))

    def _broker_hard(self, _t: str, seconds: float, _rec: FaultRecord) -> None:
        self.chain.stack.kafka_stop(hard=True)
        time.sleep(seconds)
        self.chain.stack.up()

    def _broker_clean(self, _t: str, seconds: float, _rec: FaultRecord) -> None:
        self.chain.stack.kafka_stop(hard=False)
        time.sleep(seconds)
        self.chain.stack.up()

    def _postgres_down(self, _t: str, seconds: float, _rec: FaultRecord) -> None:
        self.chain.stack.postgres_stop()
        time.sleep(seconds)
        self.chain.stack.postgres_start()

    def _redis_down(self, _t: str, seconds: float, _rec: FaultRecord) -> None:
        self.chain.stack.redis_stop()
        time.sleep(seconds)
        self.chain.stack.redis_start()

    def _net_blackhole(self, target: str, seconds: float, _rec: FaultRecord) -> None:
        self.proxies[target].blackhole(True)
        time.sleep(seconds)
        self.proxies[target].blackhole(False)

    def _net_reset(self, target: str, _s: float, _rec: FaultRecord) -> None:
        self.proxies[target].reset()

    def _net_latency(self, target: str, seconds: float, _rec: FaultRecord) -> None:
        self.proxies[target].latency(0.2)
        time.sleep(seconds)
        self.proxies[target].latency(0.0)


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                     "enable.idempotence": True,
                     "linger.ms": 5, "message.timeout.ms": 600_000})


def _feed(producer: Producer, topic: str, ticks: list[RawTick], seconds: float,
          done: threading.Event) -> None:
    start = time.monotonic()
    for i, tick in enumerate(ticks):
        due = start + seconds * i / len(ticks)
        while (now := time.monotonic()) < due:
            producer.poll(min(0.05, due - now))
        producer.produce(topic, key=tick.key, value=tick.value)
        producer.poll(0)
    if producer.flush(600) != 0:
        raise RuntimeError("raw ticks not acknowledged by the broker")
    done.set()


def stall_snapshot(bootstrap: str, chain: Chain, topics: dict[str, str]) -> str:
    """`chain_snapshot` of the first instances' groups: offsets, lag and health of every input partition."""
    groups = {s: chain.ids(s, "a")["DATA_PROC_KAFKA__GROUP_ID"] for s in SERVICES}
    return chain_snapshot(bootstrap, chain.first, groups, topics)


def run(profile: Profile, seed: int, workdir: Path, *, keep_on_failure_s: float = 0.0,
        drain_timeout_s: float | None = None) -> Report:
    """One fault-injection run in `workdir` (private stack included); returns the report.

    A run that fails keeps its private stack and services for up to `keep_on_failure_s` (or until
    the file `workdir/release` exists) before tearing them down, for a look at the broker; a run
    that does not drain writes `stall_snapshot` to `workdir/stall.txt` first.
    """
    report = Report(profile=profile.name, seed=seed)
    rng = random.Random(seed)
    prefix = "FLT" + uuid.uuid4().hex[:8].upper()
    t_setup = time.monotonic()
    stack = PrivateStack(workdir / "stack")
    proxies: dict[str, NetProxy] = {}
    chain: Chain | None = None
    try:
        stack.up()
        asyncio.run(_load_reference(stack.postgres_dsn, prefix))
        for name, url in (("postgres", stack.postgres_dsn), ("redis", stack.redis_url)):
            proxies[name] = NetProxy("127.0.0.1", int(urllib.parse.urlsplit(url).port or 0)).start()
        topics = {name: f"{prefix.lower()}.{name.lower()}" for name in (
            "RAW", "NORMALIZED", "ENRICHED", "BARS", "DEADLETTER", "NORMALIZATION_DEDUP_CHANGELOG",
            "AGGREGATION_WINDOWS_CHANGELOG")}
        audit_topic = f"{prefix.lower()}.audit"
        _create_topics(stack.bootstrap, topics, audit_topic)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
        env.update({
            "DATA_PROC_ENV": "local", "DATA_PROC_KAFKA_BOOTSTRAP": stack.bootstrap,
            "DATA_PROC_POSTGRES_DSN": _with_port(stack.postgres_dsn, proxies["postgres"].port),
            "DATA_PROC_REDIS_URL": _with_port(stack.redis_url, proxies["redis"].port),
            "DATA_PROC_CLICKHOUSE_URL": str(workdir / "chdb"), "DATA_PROC_AUDIT_KAFKA_TOPIC": audit_topic,
            "DATA_PROC_TOPICS__PARTITIONS": str(PARTITIONS),
            "DATA_PROC_AGGREGATION__INTERVALS": ",".join(INTERVALS),
            "DATA_PROC_AGGREGATION__ALLOWED_LATENESS_MS": str(LATENESS_MS),
            # windows close by the watermark pushers only: no outage may close one early
            "DATA_PROC_AGGREGATION__IDLE_TIMEOUT_MS": str(86_400_000),
            "DATA_PROC_LOOP__TICK_INTERVAL_MS": "200",
            "DATA_PROC_LOOP__TRANSACTION_TIMEOUT_MS": str(TX_TIMEOUT_MS),
            "DATA_PROC_LOOP__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "DATA_PROC_LOOP__LIVE_STALL_TIMEOUT_S": str(LIVE_STALL_S),
            # every producer of the run uses the 10 s transaction timeout: an open transaction whose
            # producer wrote nothing for 3x that is hanging (the broker's maximum, 15 min, is the default)
            "DATA_PROC_LOOP__HANGING_TRANSACTION_TIMEOUT_MS": str(3 * TX_TIMEOUT_MS),
            "DATA_PROC_LOOP__HANGING_CHECK_INTERVAL_S": "10",
            "DATA_PROC_LOG_LEVEL": "INFO",
            # librdkafka statistics: the loop logs an input partition that stops advancing (stall evidence)
            "DATA_PROC_KAFKA__CONSUMER_EXTRA": json.dumps({"statistics.interval.ms": 5000}),
        })
        env.update({f"DATA_PROC_TOPICS__{name}": topic for name, topic in topics.items()})
        # a Kafka SASL password is set too (unused by the PLAINTEXT listener): it must not leak either
        sasl_secret = "sasl-" + uuid.uuid4().hex
        env["DATA_PROC_KAFKA__SASL_PASSWORD"] = sasl_secret
        ticks, pushers = stream(profile.count, seed, prefix)
        chain = Chain(stack, workdir, prefix, env)
        chain.start()
        report.durations_s["setup"] = round(time.monotonic() - t_setup, 1)

        plan = list(profile.faults)
        rng.shuffle(plan)
        expected_s = sum(max(s, 5.0) + 8.0 for _k, _t, s in plan)
        producer = _producer(stack.bootstrap)
        fed = threading.Event()
        feeder = threading.Thread(target=_feed, args=(producer, topics["RAW"], ticks, expected_s, fed),
                                  name="feed", daemon=True)
        started = time.monotonic()
        feeder.start()
        injector = Injector(chain, proxies, started)
        for kind, target, seconds in plan:
            time.sleep(rng.uniform(*profile.gap_s))
            try:
                report.faults.append(injector.run(kind, target, seconds))
            except Exception as exc:
                report.faults.append(FaultRecord(kind, target, round(time.monotonic() - started, 1),
                                                 outcome=f"injection failed: {exc}"))
                report.mismatches.append(f"fault {kind} on {target} could not be injected: {exc}")
        feeder.join(900)
        if not fed.is_set():
            report.mismatches.append("the feed did not finish")
            return report
        for tick in pushers:
            producer.produce(topics["RAW"], key=tick.key, value=tick.value)
        producer.flush(120)
        report.durations_s["faults_and_feed"] = round(time.monotonic() - started, 1)

        t_drain = time.monotonic()
        reference = compute(expected_arrivals([*ticks, *pushers], prefix), INTERVALS, LATENESS_MS * 10**6)
        try:
            _wait_for_finals(stack.bootstrap, topics["BARS"], len(reference.bars),
                             drain_timeout_s or profile.drain_timeout_s)
        except TimeoutError as exc:
            report.mismatches.append(f"the chain did not recover: {exc}")
            report.durations_s["drain"] = round(time.monotonic() - t_drain, 1)
            _snapshot(workdir, stack, chain, topics)
            return report
        # the lag metrics can be stale while a loop hangs: wait until every service is live and the
        # read model has converged (the supervisor restarts a hung service meanwhile), then drained
        try:
            _wait_converged(chain, stack.redis_url, reference, 300)
            chain.first.wait_drained(timeout=300)
        except TimeoutError as exc:
            report.mismatches.append(f"the chain did not drain: {exc}")
            report.durations_s["drain"] = round(time.monotonic() - t_drain, 1)
            _snapshot(workdir, stack, chain, topics)
            return report
        report.durations_s["drain"] = round(time.monotonic() - t_drain, 1)
        verify(report, stack, chain, topics, audit_topic, ticks, pushers, reference, prefix)
        secrets = [*stack.secrets(), sasl_secret]
        exposed = [(f"{s}{path}", http_get(chain.first.url(s, path), timeout=10)[1].decode(errors="replace"))
                   for s in SERVICES for path in ("/health", "/ready", "/live", "/metrics")]
        report.self_exits = chain.self_exits
        chain.close()  # the logs are complete only now
        exposed += [(str(p), p.read_text(errors="replace")) for p in sorted(workdir.glob("logs*/*.log"))]
        check_secrets(report, secrets, exposed)
        return report
    finally:
        if not report.ok and keep_on_failure_s > 0:
            _keep(stack, workdir, keep_on_failure_s)
        if chain is not None:
            report.self_exits = chain.self_exits
            chain.close()
        for proxy in proxies.values():
            proxy.close()
        stack.destroy()


def _snapshot(workdir: Path, stack: PrivateStack, chain: Chain, topics: dict[str, str]) -> None:
    """`stall_snapshot` printed and written to `workdir/stall.txt`."""
    try:
        snapshot = stall_snapshot(stack.bootstrap, chain, topics)
    except Exception as exc:
        snapshot = f"stall snapshot failed: {exc!r}"
    (workdir / "stall.txt").write_text(snapshot + "\n")
    print(snapshot, flush=True)


def _keep(stack: PrivateStack, workdir: Path, seconds: float) -> None:
    """Keep a failed run's stack and services up for a look, until `workdir/release` or `seconds`."""
    release = workdir / "release"
    print(f"run failed: stack kept for {seconds:.0f}s (bootstrap {stack.bootstrap}, logs in {workdir}); "
          f"touch {release} to tear it down", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not release.exists():
        time.sleep(2)


def _consume(bootstrap: str, topics: list[str]) -> list[Any]:
    from dataproc_shared.testing import consume_all

    return consume_all(bootstrap, topics, timeout=120)


def _final_bars(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    from dataproc_shared import avro

    bars = [avro.decode(r.value, "bar") for r in _consume(bootstrap, [topic]) if r.value]
    return [b for b in bars if b["is_final"]]


def _wait_for_finals(bootstrap: str, topic: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_final_bars(bootstrap, topic)) >= expected:
            return
        time.sleep(3)
    raise TimeoutError(f"fewer than {expected} final bars on {topic} after {timeout:.0f}s")


def _wait_converged(chain: Chain, redis_url: str, reference: Any, timeout: float) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    wanted: Counter[tuple[str, str]] = Counter((b.instrument_id, b.interval) for b in reference.bars.values())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = all(http_get(chain.first.url(s, "/live"))[0] == 200 for s in SERVICES)
        with contextlib.suppress(redis.RedisError):
            if live and all(client.zcard(f"md:bars:{inst}:{interval}") >= n
                            for (inst, interval), n in wanted.items()):
                return
        time.sleep(2)
    log.warning("read model not converged", timeout_s=timeout)


def verify(report: Report, stack: PrivateStack, chain: Chain, topics: dict[str, str], audit_topic: str,
           ticks: list[RawTick], pushers: list[RawTick], reference: Any, prefix: str) -> None:
    """All the end-of-run checks; differences go to `report.mismatches`, figures to `report.counts`."""
    import redis
    from dataproc_shared import avro

    bootstrap = stack.bootstrap
    bad = report.mismatches.append
    counts = report.counts
    tags = Counter(t.tag for t in ticks)
    counts["raw_in"] = len(ticks) + len(pushers)
    counts["expected_final_bars"] = len(reference.bars)

    # 1. bars topic: every final bar once, equal to the reference
    finals = _final_bars(bootstrap, topics["BARS"])
    keys = [(b["instrument_id"], b["interval"], b["window_start_ms"]) for b in finals]
    counts["final_bars_on_topic"] = len(keys)
    for key, n in Counter(keys).items():
        if n > 1:
            bad(f"final bar {key} appears {n} times on the bars topic")
    on_topic = dict(zip(keys, finals, strict=True))
    report.mismatches.extend(f"bars topic: {d}" for d in diff_bars(reference.bars, on_topic))

    # 2. ClickHouse FINAL through aggregation's read API
    from_ch: dict[tuple[str, str, int], dict[str, Any]] = {}
    for venue, sym, *_ in INSTRUMENTS:
        for interval in INTERVALS:
            query = urllib.parse.urlencode({"instrument": f"{prefix}.{venue}.{sym}", "interval": interval,
                                            "final": "true", "limit": 10000})
            status, body = http_get(chain.first.url("aggregation", f"/api/v1/bars?{query}"), timeout=30)
            if status != 200:
                bad(f"read API answered {status}")
                continue
            payload = json.loads(body)
            for row in payload["bars"] if isinstance(payload, dict) else payload:
                from_ch[(row["instrument_id"], row["interval"], int(row["window_start_ms"]))] = row
    counts["final_bars_clickhouse"] = len(from_ch)
    report.mismatches.extend(f"clickhouse: {d}" for d in diff_bars(reference.bars, from_ch))

    # 3. Redis: history of final bars and the latest bar per instrument and interval
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    from_redis: dict[tuple[str, str, int], dict[str, Any]] = {}
    latest: dict[tuple[str, str], RefBar] = {}
    for bar in reference.bars.values():
        k = (bar.instrument_id, bar.interval)
        if k not in latest or latest[k].window_start_ms < bar.window_start_ms:
            latest[k] = bar
    for (inst, interval), bar in latest.items():
        for member in client.zrange(f"md:bars:{inst}:{interval}", 0, -1):
            row = json.loads(str(member))
            from_redis[(inst, interval, int(row["window_start"]))] = row
        head = client.hgetall(f"md:bar:{inst}:{interval}")
        if not head or int(head["window_start"]) != bar.window_start_ms or float(head["close"]) != bar.close:
            bad(f"redis latest bar of {inst} {interval}: {head} != {bar}")
    counts["final_bars_redis"] = len(from_redis)
    report.mismatches.extend(f"redis: {d}" for d in diff_bars(reference.bars, from_redis))

    # 4. every record accounted for, by identity (raw partition, raw offset)
    raw = _consume(bootstrap, [topics["RAW"]])
    counts["raw_on_topic"] = len(raw)
    if len(raw) != counts["raw_in"]:
        bad(f"raw topic holds {len(raw)} records, {counts['raw_in']} were sent")
    normalized = [avro.decode(r.value, "normalized_tick")
                  for r in _consume(bootstrap, [topics["NORMALIZED"]])]
    enriched = [avro.decode(r.value, "enriched_tick") for r in _consume(bootstrap, [topics["ENRICHED"]])]
    dead = [json.loads(r.value) for r in _consume(bootstrap, [topics["DEADLETTER"]]) if r.value]
    audit = [json.loads(r.value) for r in _consume(bootstrap, [audit_topic]) if r.value]
    # The same message twice (one event, one `event_id`, on the topic more than once) is told apart
    # from a record processed twice (two events for one raw record): both are mismatches.
    copies = Counter(str(a.get("event_id", "")) for a in audit)
    repeated = {event_id: n for event_id, n in copies.items() if event_id and n > 1}
    counts["audit_event_copies"] = sum(n - 1 for n in repeated.values())
    if repeated:
        bad(f"{len(repeated)} audit events are on the audit topic more than once with the same event_id "
            f"(the same message twice), e.g. {sorted(repeated.items())[:3]}")
        for event_id in sorted(repeated)[:3]:
            bad(f"evidence for event {event_id}: "
                f"{json.dumps([a for a in audit if a.get('event_id') == event_id], default=str)}")
    unique_audit = list({str(a.get("event_id") or f"#{i}"): a for i, a in enumerate(audit)}.values())
    dups = [a for a in unique_audit if a.get("event_type") == "duplicate_dropped"]
    by_reason = Counter((d["service"], d["reason"]) for d in dead)
    counts.update({"normalized": len(normalized), "enriched": len(enriched), "dead_letters": len(dead),
                   "deduplicated": len(dups)})
    counts.update({f"dead_{svc}_{reason}": n for (svc, reason), n in by_reason.items()})
    seen: Counter[tuple[int, int]] = Counter()
    seen.update((n["source_partition"], n["source_offset"]) for n in normalized)
    seen.update((d["source_partition"], d["source_offset"]) for d in dead
                if d["service"] == "normalization")
    # a dropped duplicate is proved by its `duplicate_dropped` audit event (same transaction)
    seen.update((int(a["source_partition"]), int(a["offset_from"])) for a in dups)
    raw_ids = {(r.partition, r.offset) for r in raw}
    missing = raw_ids - set(seen)
    twice = {k: n for k, n in seen.items() if n > 1}
    extra = set(seen) - raw_ids
    counts["raw_unaccounted"] = len(missing)
    counts["raw_accounted_twice"] = len(twice)
    if missing:
        bad(f"{len(missing)} raw records neither normalized, dead-lettered nor deduplicated, "
            f"e.g. {sorted(missing)[:5]}")
    if twice:
        bad(f"{len(twice)} raw records accounted more than once, e.g. {sorted(twice.items())[:5]}")
        for ident in sorted(twice)[:3]:
            evidence = [{"normalized": n} for n in normalized
                        if (n["source_partition"], n["source_offset"]) == ident]
            evidence += [{"dead_letter": {k: v for k, v in d.items() if k != "payload_b64"}} for d in dead
                         if d["service"] == "normalization"
                         and (d["source_partition"], d["source_offset"]) == ident]
            evidence += [{"duplicate_audit": a} for a in dups
                         if (int(a["source_partition"]), int(a["offset_from"])) == ident]
            bad(f"evidence for raw record {ident}: {json.dumps(evidence, default=str)}")
    if extra:
        bad(f"{len(extra)} outputs refer to raw records that do not exist")
    if len(normalized) + by_reason_sum(by_reason, "normalization") + len(dups) != len(raw):
        bad("normalized + dead-lettered + deduplicated != raw in")
    if len(dups) != tags[Tag.DUPLICATE]:
        bad(f"{len(dups)} duplicates dropped, {tags[Tag.DUPLICATE]} were generated")
    if by_reason_sum(by_reason, "normalization") != tags[Tag.MALFORMED]:
        bad(f"{by_reason_sum(by_reason, 'normalization')} dead-lettered by normalization, "
            f"{tags[Tag.MALFORMED]} malformed generated")
    norm_ids = Counter((n["source_partition"], n["source_offset"]) for n in normalized)
    enr_ids = Counter((e["source_partition"], e["source_offset"]) for e in enriched)
    for d in dead:  # an enrichment dead letter carries the normalized tick (raw lineage inside)
        if d["service"] == "enrichment":
            tick = avro.decode(base64.b64decode(d["payload_b64"]), "normalized_tick")
            enr_ids[(tick["source_partition"], tick["source_offset"])] += 1
    if +enr_ids != +norm_ids:
        bad(f"enriched + enrichment dead letters differ from normalized: "
            f"{len(set(norm_ids) - set(enr_ids))} missing, {sum(n > 1 for n in enr_ids.values())} twice")
    late = len({idx for idx, _ in reference.late})
    counts["late_trades_expected"] = late
    if by_reason[("aggregation", "late_trade")] != late:
        bad(f"{by_reason[('aggregation', 'late_trade')]} late trades dead-lettered, reference says {late}")


def check_secrets(report: Report, secrets: list[str], exposed: list[tuple[str, str]]) -> None:
    """No secret in any of `exposed` (where, text): log files, health, readiness and metric responses."""
    report.counts["secret_checked_sources"] = len(exposed)
    report.counts["secret_checked_lines"] = sum(text.count("\n") + 1 for _, text in exposed)
    leaks = [f"a secret appears in {where}"
             for where, text in exposed for secret in secrets if secret in text]
    report.counts["secret_leaks"] = len(leaks)
    report.mismatches.extend(leaks)
    if len(secrets) < 3 or any(len(secret) < 16 for secret in secrets):
        report.mismatches.append("secret check: the stack's passwords were not found")


def by_reason_sum(by_reason: Counter[tuple[str, str]], service: str) -> int:
    """Dead letters of one service, all reasons."""
    return sum(n for (svc, _), n in by_reason.items() if svc == service)


def print_report(report: Report, out: Callable[[str], None] = print) -> None:
    """Human-readable summary."""
    out(f"fault-injection run: profile {report.profile}, seed {report.seed}")
    kinds = Counter(f.kind for f in report.faults)
    out("faults injected: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()))
    for f in report.faults:
        out(f"  t+{f.at_s:6.1f}s {f.kind:20} {f.target:14} {f.took_s:5.1f}s  {f.outcome}")
    out(f"restarts by the supervisor (exit or failed liveness probe): {len(report.self_exits)}")
    for e in report.self_exits:
        out(f"  {e['service']}: {e.get('cause', 'exited')}, exit code {e['exit_code']}")
    out("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(report.counts.items())))
    out("durations: " + ", ".join(f"{k}={v}s" for k, v in report.durations_s.items()))
    out(f"findings (defects that keep the data guarantees): {len(report.findings)}")
    for finding in report.findings:
        out(f"  {finding}")
    out(f"mismatches: {len(report.mismatches)}")
    for m in report.mismatches[:50]:
        out(f"  {m}")
    out("RESULT: " + ("OK" if report.ok else "FAILED"))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None,
                        help="report path (default bench-results/faults-<profile>-<time>.json)")
    parser.add_argument("--keep-on-failure", type=float, default=0.0, metavar="SECONDS",
                        help="after a failed run keep the private stack and services up this long "
                             "(or until WORKDIR/release exists) before tearing them down")
    parser.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long the final bars may take after the feed (default: the profile's)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dp-faults-"))
    report = run(PROFILES[args.profile], args.seed, workdir, keep_on_failure_s=args.keep_on_failure,
                 drain_timeout_s=args.drain_timeout)
    print_report(report)
    stamp = time.strftime('%Y%m%dT%H%M%S')
    path = args.json or REPO / "bench-results" / f"faults-{args.profile}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, default=str))
    print(f"report written to {path}; logs in {workdir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
