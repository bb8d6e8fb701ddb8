"""Pipeline benchmark against the physical limit, on the local stack, in one run.

    uv run python -m dptools.bench --ticks 1000000            # full run (see docs/benchmarks.md)
    uv run python -m dptools.bench --ticks 50000 --open-loop-seconds 10   # quick look

1. Pre-produces a backlog of synthetic raw ticks (valid trades and quotes over the reference-data
   instruments, event times spread over the last `--span-minutes`) to a fresh raw topic.
2. Relay chain: four `dptools.relay` processes (raw -> r1 -> r2 -> r3 -> r4, the shared Kafka loop
   with the same guarantee and transactions, no decoding) drain the backlog; ticks/s = the physical
   limit on this broker, these topics and partitions, these messages.
3. Drain mode: the four services drain the same backlog (own consumer groups, own downstream topics,
   own chDB folder, own Redis database); ticks/s end to end, and the ratio to the relay chain.
4. Open loop at fixed shares of the drain rate: ticks are sent on a fixed schedule whatever the
   pipeline does (event time = scheduled send time, so latency is measured from when a tick was due,
   without coordinated omission); every tick write announced on Redis `md:updates` gives one
   tick -> Redis latency sample; every final bar added to a Redis history set (`md:bars:...`, one
   announcement per final bar) gives the delay from its window's close (window end + allowed
   lateness) to its final bar in Redis (ClickHouse is written before the bars topic commits, hence
   before Redis). Windows whose close lies after the phase's last tick can only close by the idle
   timer, which finalizes each once the wall clock has passed its close and its partition has been
   idle for the idle timeout: they are counted apart (`final_bars_closed_after_feed`, with their own
   close -> final bar delays), and windows still open when the phase ends (the current 5-minute and
   hour windows) are reported from the aggregation's metrics (`open_windows_at_end`); the next phase's
   watermark closes them.
5. CPU microseconds per tick and peak RSS of every process.

Writes `bench-results/bench-<time>.json` and `.png`. Needs `make up`; applies the PostgreSQL
migrations and loads the reference data itself (both idempotent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from dataproc_shared.config import TopicOptions

from dptools.benchkit import delete_topics
from dptools.pipeline import REPO, SERVICES, Pipeline, http_get, stop_on_sigterm
from dptools.produce import load_instruments_from_postgres
from dptools.ticks import GeneratorConfig, generate

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|\+Inf|-Inf)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text endpoint ({} when it does not answer)."""
    status, body = http_get(url, timeout=5)
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    if status != 200:
        return out
    for line in body.decode().splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def late_trades(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
    """Late trades of the aggregation after a drain.

    Dead-lettered trades, their share of its input (trades and quotes), and the share of
    `late_trades` rows among the ClickHouse rows it wrote (one late row per interval it missed).
    """
    late = metric(samples, "dp_dead_letters_total", reason="late_trade")
    consumed = metric(samples, "dp_messages_in_total")
    late_rows = metric(samples, "dp_clickhouse_rows_written_total", table="late_trades")
    rows = metric(samples, "dp_clickhouse_rows_written_total")
    return {"dead_lettered": late, "share_of_input": late / consumed if consumed else 0.0,
            "late_trade_rows": late_rows, "share_of_clickhouse_rows": late_rows / rows if rows else 0.0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Stage:
    """One process of a chain: its pid and metrics URL."""

    name: str
    pid: int
    metrics_url: str


@dataclass
class Timeline:
    """When the first record was consumed and when the chain was done."""

    start: float = 0.0
    end: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)


def watch(first: Callable[[], float], done: Callable[[], bool], timeout: float) -> Timeline:
    """Poll until `done()`; `first()` > 0 marks the start (first record consumed by the first stage)."""
    tl = Timeline()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        consumed = first()
        if consumed > 0 and not tl.start:
            tl.start = now
        tl.samples.append((now, consumed))
        if tl.start and done():
            tl.end = time.monotonic()
            return tl
        time.sleep(0.25)
    raise TimeoutError("chain did not finish in time")


def create_topics(admin: AdminClient, names: list[str], partitions: int, compacted: set[str],
                  configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create topics (`configs`: extra topic settings by name) and wait for them."""
    extra = configs or {}
    new = [NewTopic(n, num_partitions=partitions, replication_factor=1,
                    config={**({"cleanup.policy": "compact"} if n in compacted else {}), **extra.get(n, {})})
           for n in names]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result()


def preproduce(bootstrap: str, topic: str, count: int, span_minutes: float, dsn: str, seed: int) -> float:
    """Write the backlog; returns seconds taken."""
    instruments = load_instruments_from_postgres(dsn)
    span_ns = int(span_minutes * 60e9)
    cfg = GeneratorConfig(count=count, seed=seed, start_ns=time.time_ns() - span_ns - 5 * 10**9,
                          step_ns=max(1, span_ns // count), quote_share=0.4, timestamp_style="ns")
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 50,
                         "batch.num.messages": 10_000, "queue.buffering.max.messages": 1_000_000,
                         "compression.type": "lz4", "enable.idempotence": True})
    started = time.monotonic()
    for tick in generate(instruments, cfg):
        while True:
            try:
                producer.produce(topic, key=tick.key, value=tick.value)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("backlog not fully delivered")
    return time.monotonic() - started


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child process logging to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until /ready answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        if http_get(f"http://127.0.0.1:{port}/ready")[0] == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not ready")


def run_relay_chain(bootstrap: str, raw: str, n: int, run_id: str, base_env: dict[str, str],
                    partitions: int, log_dir: Path) -> dict[str, Any]:
    """Drain the backlog through four relays; ticks/s and per-process CPU/RSS."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    hops = [raw] + [f"bench-{run_id}-relay{i}" for i in range(1, 5)]
    create_topics(admin, hops[1:], partitions, set())
    procs: list[tuple[Stage, subprocess.Popen[bytes]]] = []
    cpu0: dict[str, float] = {}
    try:
        # last hop first: each relay is ready (and its CPU sampled) before anything reaches it, and
        # the first relay, which starts the drain, starts last
        for i in reversed(range(4)):
            port = free_port()
            env = dict(base_env, DATA_PROC_HTTP__PORT=str(port),
                       DATA_PROC_INSTANCE_ID=f"{run_id}-relay{i + 1}",
                       DATA_PROC_KAFKA__GROUP_ID=f"bench-{run_id}-relay{i + 1}")
            proc = start_process([sys.executable, "-m", "dptools.relay", hops[i], hops[i + 1]], env,
                                 log_dir / f"relay{i + 1}.log")
            stage = Stage(f"relay{i + 1}", proc.pid, f"http://127.0.0.1:{port}/metrics")
            procs.insert(0, (stage, proc))
            wait_ready(port, proc)
            cpu0[stage.name] = cpu_seconds(stage.pid)
        tl = watch(lambda: metric(scrape(procs[0][0].metrics_url), "dp_messages_in_total"),
                   lambda: metric(scrape(procs[-1][0].metrics_url), "dp_messages_out_total",
                                  topic=hops[-1]) >= n,
                   timeout=3600)
        result = {
            "ticks": n, "seconds": tl.end - tl.start, "ticks_per_s": n / (tl.end - tl.start),
            "cpu_us_per_tick": {s.name: (cpu_seconds(s.pid) - cpu0[s.name]) / n * 1e6 for s, _ in procs},
            "peak_rss_mib": {s.name: peak_rss_mib(s.pid) for s, _ in procs},
        }
    finally:
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_topics(admin, hops[1:])
    return result


_UNIT_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


@dataclass(frozen=True, slots=True)
class FinalBarSeen:
    """A final bar announced on the updates channel: its interval, window close and when it was seen."""

    interval: str
    #: window end + allowed lateness (ns): when the watermark may close the window
    close_ns: int
    seen_ns: int


def final_bar_seen(data: dict[str, Any], now_ns: int, lateness_ns: int) -> FinalBarSeen | None:
    """The `FinalBarSeen` of an announcement of the final-bar history set, else None.

    Only `bars` announcements count: the projection writes one for every final bar, while the
    latest-bar hash (`bar`) skips a final bar that a newer window's update of the same instrument and
    interval supersedes in the same batch - which is the case for most final bars, since the trade that
    closes a window usually opens the next one.
    """
    if data.get("type") != "bars" or not data.get("is_final"):
        return None
    interval = str(data["interval"])
    length = int(interval[:-1]) * _UNIT_NS[interval[-1]]
    end = int(data["window_start"]) * 10**6 + length
    return FinalBarSeen(interval, end + lateness_ns, now_ns)


@dataclass(slots=True)
class Apart:
    """Final bars not closed by the watermark during the feed (see `final_bar_delays`)."""

    #: close -> final bar delays (ms) of the windows whose close lies after the feed's last tick
    after_feed_ms: list[float]
    #: final bars seen before their window's close (none is expected: a sign of an early close)
    before_close: int = 0


def final_bar_delays(seen: list[FinalBarSeen], since_ns: int, feed_end_ns: int
                     ) -> tuple[dict[str, list[float]], Apart]:
    """Window close -> final bar delays (ms) per interval of the bars the watermark closed during the feed.

    `since_ns`: windows whose close is before it closed before the phase began and are skipped.
    `feed_end_ns`: event time of the phase's last tick. A window whose close is after it cannot be
    closed by the watermark (no later event time arrives): the idle timer closes it once the wall
    clock has passed its close and the partition has been idle for the idle timeout, so its delay
    includes the wait for the partition to go idle. Those are kept apart (`Apart.after_feed_ms`),
    as are windows closed before their close time (`Apart.before_close`).
    """
    delays: dict[str, list[float]] = {}
    apart = Apart([])
    for bar in seen:
        if bar.close_ns < since_ns:
            continue
        if bar.seen_ns < bar.close_ns:
            apart.before_close += 1
        elif bar.close_ns > feed_end_ns:
            apart.after_feed_ms.append((bar.seen_ns - bar.close_ns) / 1e6)
        else:
            delays.setdefault(bar.interval, []).append((bar.seen_ns - bar.close_ns) / 1e6)
    return delays, apart


class UpdateListener:
    """Collects tick -> Redis latencies and final bars from the projection's updates channel.

    Reads whole messages only (waits for data, then reads a message without a timeout: a read timeout
    in the middle of a message would lose the connection's framing). A connection error reconnects
    and is counted in `errors` (announcements sent meanwhile are lost).
    """

    def __init__(self, redis_url: str, channel: str, lateness_ms: int) -> None:
        import redis  # local import: only the open-loop phase needs it

        self._client = redis.Redis.from_url(redis_url)
        self._channel = channel
        self._pubsub = self._subscribe()
        self._lateness_ns = lateness_ms * 10**6
        self.tick_latency_ms: list[float] = []
        self.final_bars: list[FinalBarSeen] = []
        self.errors = 0
        self.recording = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _subscribe(self) -> Any:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(self._channel)
        return pubsub

    def _run(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                conn = self._pubsub.connection
                if conn is None or not conn.can_read(timeout=0.2):
                    continue
                msg = self._pubsub.get_message(timeout=None)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                self.errors += 1
                time.sleep(0.2)
                try:
                    self._pubsub.close()
                    self._pubsub = self._subscribe()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    pass
                continue
            if not msg or not self.recording:
                continue
            now = time.time_ns()
            data = json.loads(msg["data"])
            kind = data.get("type")
            if kind == "tick" and "ts" in data:
                self.tick_latency_ms.append((now - int(data["ts"])) / 1e6)
            elif kind == "bars":
                bar = final_bar_seen(data, now, self._lateness_ns)
                if bar is not None:
                    self.final_bars.append(bar)

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def open_loop(bootstrap: str, topic: str, rate: float, seconds: float, instruments_dsn: str,
              seed: int) -> tuple[int, int]:
    """Send ticks on a fixed schedule (event time = due time); returns how many, and the last due time."""
    instruments = load_instruments_from_postgres(instruments_dsn)
    count = int(rate * seconds)
    cfg = GeneratorConfig(count=count, seed=seed, start_ns=0, step_ns=1, quote_share=0.4,
                          timestamp_style="ns")
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 1,
                         "enable.idempotence": True})
    start = due = time.time_ns() + 200_000_000
    for i, tick in enumerate(generate(instruments, cfg)):
        due = start + int(i * 1e9 / rate)
        delay = (due - time.time_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        body = json.loads(tick.value)
        body["ts"] = due  # event time = when the tick was due: latency counts from there
        body.pop("trade_id", None)
        producer.produce(topic, key=tick.key, value=json.dumps(body).encode())
        producer.poll(0)
    producer.flush(60)
    return count, due


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def phase_figures(before: tuple[float, Samples], after: tuple[float, Samples], ticks: int,
                  seconds: float) -> dict[str, float]:
    """A service's CPU per tick, committed cycles per second and mean batch size over one phase."""
    (cpu0, m0), (cpu1, m1) = before, after

    def delta(name: str, **labels: str) -> float:
        return metric(m1, name, **labels) - metric(m0, name, **labels)

    cycles = delta("dp_transactions_total", outcome="committed")
    batches = delta("dp_batch_size_count")
    return {"cpu_us_per_tick": (cpu1 - cpu0) / ticks * 1e6 if ticks else 0.0,
            "cpu_us_per_cycle": (cpu1 - cpu0) / cycles * 1e6 if cycles else 0.0,
            "cycles_per_s": cycles / seconds if seconds else 0.0,
            # e.g. the aggregation's late trades after an idle close between phases
            "dead_letters": delta("dp_dead_letters_total"),
            "mean_batch": delta("dp_batch_size_sum") / batches if batches else 0.0}


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p99/p99.9/max of a sample."""
    if not values:
        return {}
    s = sorted(values)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {"n": len(s), "p50": pick(0.5), "p99": pick(0.99), "p99.9": pick(0.999), "max": s[-1]}


def service_env(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` options as environment variables of the services; only `DATA_PROC_` keys."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("DATA_PROC_"):
            raise SystemExit(f"--service-env {pair!r}: expected DATA_PROC_<NAME>=<value>")
        out[key] = value
    return out


def bars_emitted(before: Samples, after: Samples, seconds: float) -> dict[str, float]:
    """Bar emissions per second of the aggregation over a phase, by `<interval> update|final`."""
    out: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name != "dp_bars_emitted_total":
            continue
        lab = dict(labels)
        kind = "final" if lab.get("final") == "true" else "update"
        key = f"{lab.get('interval', '?')} {kind}"
        out[key] = out.get(key, 0.0) + (value - before.get((name, labels), 0.0)) / seconds
    return dict(sorted(out.items()))


def committed_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records (and transaction markers) of `topic` past `group`'s committed offsets, all partitions.

    What the group has not processed and committed yet, read from the broker (not the services'
    own lag gauge, which is refreshed every 10 s and counts from the consumer's position). A
    partition without a committed offset counts from its low watermark.
    """
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition

    admin = AdminClient({"bootstrap.servers": bootstrap})
    parts = sorted(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    tps = [TopicPartition(topic, p) for p in parts]
    listed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)],
                                               require_stable=False)[group]
    committed = {tp.partition: tp.offset for tp in listed.result(30).topic_partitions}
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lag-check-{uuid.uuid4().hex}",
                       "enable.auto.commit": False})
    try:
        lag = 0
        for p in parts:
            low, high = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            at = committed.get(p, -1)
            lag += max(0, high - (at if at >= 0 else low))
        return lag
    finally:
        reader.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    stop_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m dptools.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--span-minutes", type=float, default=120.0)
    parser.add_argument("--open-loop-seconds", type=float, default=30.0)
    parser.add_argument("--rates", default="0.25,0.5,0.75",
                        help="open-loop rates as shares of the drain rate")
    parser.add_argument("--open-loop-rates", default=None, metavar="TICKS_PER_S,...",
                        help="open-loop rates in ticks/s instead of shares of the drain rate (the same "
                             "load for runs of different code)")
    parser.add_argument("--redis-db", type=int, default=2, help="Redis database of the benchmark (flushed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--drain-only", action="store_true",
                        help="skip the relay chain and the open loop (bar correctness after a backlog)")
    parser.add_argument("--log-level", default="WARNING",
                        help="DATA_PROC_LOG_LEVEL of the services (INFO shows idle closes and alignment)")
    parser.add_argument("--keep-topics", action="store_true",
                        help="leave the run's topics (bench-<run id>-*) for inspection")
    parser.add_argument("--service-env", action="append", default=[], metavar="DATA_PROC_KEY=VALUE",
                        help="an environment variable of every service, e.g. "
                             "'DATA_PROC_AGGREGATION__UPDATE_INTERVALS_MS={\"1h\": 15000}' (repeatable)")
    args = parser.parse_args(argv)
    service_env(args.service_env)  # a malformed option stops the run before anything is created
    env = dict(os.environ)
    bootstrap, dsn = env["DATA_PROC_KAFKA_BOOTSTRAP"], env["DATA_PROC_POSTGRES_DSN"]
    # the reference tables and their rows, idempotently (as the main job does): the generator and
    # enrichment read the instruments from PostgreSQL
    for tool in (("dptools.migrate", "postgres"), ("dptools.refdata", "load")):
        subprocess.run([sys.executable, "-m", *tool], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    redis_url = re.sub(r"/\d+$", f"/{args.redis_db}", env["DATA_PROC_REDIS_URL"])
    run_id = uuid.uuid4().hex[:8]
    work = args.out / f"run-{run_id}"
    partitions = int(env.get("DATA_PROC_TOPICS__PARTITIONS", "6"))
    lateness_ms = 5_000
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = {k: f"bench-{run_id}-{k.lower()}" for k in (
        "RAW", "NORMALIZED", "ENRICHED", "BARS", "DEADLETTER", "NORMALIZATION_DEDUP_CHANGELOG",
        "AGGREGATION_WINDOWS_CHANGELOG")}
    audit = f"bench-{run_id}-audit"
    # the dead-letter topic's size limit as the topic plan sets it (services check it at start)
    deadletter_size = {"max.message.bytes": str(TopicOptions().deadletter_message_limit)}
    create_topics(admin, [*names.values(), audit], partitions,
                  {names["NORMALIZATION_DEDUP_CHANGELOG"], names["AGGREGATION_WINDOWS_CHANGELOG"]},
                  {names["DEADLETTER"]: deadletter_size})
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "host": platform.node()},
        "ticks": args.ticks, "partitions": partitions, "run_id": run_id,
    }
    print(f"pre-producing {args.ticks} ticks to {names['RAW']} ...", flush=True)
    results["preproduce_seconds"] = preproduce(bootstrap, names["RAW"], args.ticks, args.span_minutes, dsn, 7)

    base = {k: v for k, v in env.items() if k != "DATA_PROC_HTTP__PORT"}
    base.update({"DATA_PROC_LOG_LEVEL": args.log_level, "DATA_PROC_AUDIT_KAFKA_TOPIC": audit,
                 "DATA_PROC_CLICKHOUSE_URL": str(work / "chdb"), "DATA_PROC_REDIS_URL": redis_url})
    base.update({f"DATA_PROC_TOPICS__{k}": v for k, v in names.items()})
    extra_env = service_env(args.service_env)
    base.update(extra_env)
    results["service_env"] = extra_env
    if not args.drain_only:
        print("relay chain ...", flush=True)
        results["relay_chain"] = run_relay_chain(bootstrap, names["RAW"], args.ticks, run_id, base,
                                                 partitions, work / "logs")
        print(f"  {results['relay_chain']['ticks_per_s']:.0f} ticks/s", flush=True)

    import redis

    redis.Redis.from_url(redis_url).flushdb()
    pipe = Pipeline(env=base, ports={s: free_port() for s in SERVICES}, run_dir=work / "run",
                    log_dir=work / "logs")
    channel = f"bench-{run_id}:updates"
    base["DATA_PROC_PROJECTION__UPDATES_CHANNEL"] = channel
    listener = UpdateListener(redis_url, channel, lateness_ms)
    try:
        # downstream first, normalization (which starts the drain) last; each service's CPU is
        # sampled when it is ready, so no service drains part of the backlog before its sample
        pids: dict[str, int] = {}
        cpu0 = {}
        for s in reversed(SERVICES):
            pipe.start(s, {"DATA_PROC_KAFKA__GROUP_ID": f"bench-{run_id}-{s}",
                           "DATA_PROC_INSTANCE_ID": f"bench-{run_id}-{s}"})
            pipe.wait_ready(s, 180)
            pids[s] = pipe.pid(s) or 0
            cpu0[s] = cpu_seconds(pids[s])
        pids = {s: pids[s] for s in SERVICES}
        print("drain mode ...", flush=True)

        def url(s: str) -> str:
            return pipe.url(s, "/metrics")

        def done() -> bool:
            m = {s: scrape(url(s)) for s in SERVICES}
            norm_in = metric(m["normalization"], "dp_messages_in_total")
            normalized = metric(m["normalization"], "dp_messages_out_total", topic=names["NORMALIZED"])
            enriched = metric(m["enrichment"], "dp_messages_out_total", topic=names["ENRICHED"])
            bars = metric(m["aggregation"], "dp_messages_out_total", topic=names["BARS"])
            return (norm_in >= args.ticks
                    and metric(m["enrichment"], "dp_messages_in_total") >= normalized
                    and metric(m["aggregation"], "dp_messages_in_total") >= enriched
                    and metric(m["projection"], "dp_messages_in_total", topic=names["ENRICHED"]) >= enriched
                    and metric(m["projection"], "dp_messages_in_total", topic=names["BARS"]) >= bars
                    and enriched > 0)

        tl = watch(lambda: metric(scrape(url("normalization")), "dp_messages_in_total"), done, 7200)
        drain_rate = args.ticks / (tl.end - tl.start)
        relay_rate = results["relay_chain"]["ticks_per_s"] if "relay_chain" in results else None
        results["pipeline_drain"] = {
            "ticks": args.ticks, "seconds": tl.end - tl.start, "ticks_per_s": drain_rate,
            "ratio_to_relay_chain": drain_rate / relay_rate if relay_rate else None,
            "cpu_us_per_tick": {s: (cpu_seconds(p) - cpu0[s]) / args.ticks * 1e6 for s, p in pids.items()},
            "late_trades": late_trades(scrape(url("aggregation"))),
        }
        print(f"  {drain_rate:.0f} ticks/s"
              + (f", ratio {drain_rate / relay_rate:.2f}" if relay_rate else ""), flush=True)
        print(f"  late trades {results['pipeline_drain']['late_trades']}", flush=True)

        results["open_loop"] = []
        # (share of the drain rate, seed of the phase's ticks): fixed rates keep their seed across runs
        if args.drain_only:
            phases: list[tuple[float, int]] = []
        elif args.open_loop_rates:
            phases = [(float(x) / drain_rate, int(float(x))) for x in args.open_loop_rates.split(",")]
        else:
            phases = [(float(x), int(float(x) * 100)) for x in args.rates.split(",")]
        for share, seed in phases:
            rate = share * drain_rate
            print(f"open loop at {share:.0%} of the drain rate ({rate:.0f} ticks/s) ...", flush=True)
            listener.tick_latency_ms.clear()
            listener.final_bars.clear()
            errors = listener.errors
            before = {s: (cpu_seconds(pids[s]), scrape(url(s))) for s in SERVICES}
            since_ns = time.time_ns()
            listener.recording = True
            load_start = os.getloadavg()[0]
            sent, feed_end_ns = open_loop(bootstrap, names["RAW"], rate, args.open_loop_seconds, dsn, seed)
            feed_s = (time.time_ns() - since_ns) / 1e9
            feed_end = time.monotonic()
            lag_at_feed_end = committed_lag(bootstrap, f"bench-{run_id}-aggregation", names["ENRICHED"])
            load_feed_end = os.getloadavg()[0]
            pipe.wait_drained(timeout=300, settle=2)
            catch_up_s = time.monotonic() - feed_end - 2
            listener.recording = False
            phase_s = (time.time_ns() - since_ns) / 1e9
            by_interval, apart = final_bar_delays(listener.final_bars, since_ns, feed_end_ns)
            delays = [d for values in by_interval.values() for d in values]
            entry = {"share_of_drain": share, "rate": rate, "sent": sent,
                     "tick_to_redis_ms": percentiles(listener.tick_latency_ms),
                     "window_close_to_final_bar_ms": percentiles(delays),
                     "window_close_to_final_bar_ms_by_interval": {
                         k: percentiles(v) for k, v in sorted(by_interval.items())},
                     "final_bars_closed_after_feed": len(apart.after_feed_ms),
                     "window_close_to_final_bar_ms_after_feed": percentiles(apart.after_feed_ms),
                     "final_bars_closed_before_close": apart.before_close,
                     # windows whose close had not come yet: the next phase's watermark closes them
                     "open_windows_at_end": metric(scrape(url("aggregation")), "dp_open_windows"),
                     "listener_errors": listener.errors - errors,
                     "feed_seconds": feed_s,
                     # committed lag of the aggregation when the last tick was sent, and how long the
                     # pipeline then took to drain: both ~0 while the services keep up
                     "aggregation_lag_at_feed_end": lag_at_feed_end,
                     "catch_up_seconds": catch_up_s,
                     "load_average": [load_start, load_feed_end],
                     "services": {s: phase_figures(before[s], (cpu_seconds(pids[s]), scrape(url(s))), sent,
                                                   phase_s) for s in SERVICES}}
            agg_after = scrape(url("aggregation"))
            entry["bars_emitted_per_s"] = bars_emitted(before["aggregation"][1], agg_after, feed_s)
            entry["aggregation_clickhouse_rows_per_s"] = (
                metric(agg_after, "dp_clickhouse_rows_written_total")
                - metric(before["aggregation"][1], "dp_clickhouse_rows_written_total")) / feed_s
            results["open_loop"].append(entry)
            print(f"  tick->redis {entry['tick_to_redis_ms']}", flush=True)
            print(f"  window close->final bar {entry['window_close_to_final_bar_ms']}", flush=True)
            print(f"  aggregation lag at feed end {lag_at_feed_end}, catch-up {catch_up_s:.1f} s, "
                  f"load {load_start:.1f} -> {load_feed_end:.1f}", flush=True)
            print(f"  bars emitted/s {entry['bars_emitted_per_s']}", flush=True)
            print(f"  after the feed: {entry['final_bars_closed_after_feed']} final bars (close->final bar "
                  f"{entry['window_close_to_final_bar_ms_after_feed']}), "
                  f"{entry['open_windows_at_end']:.0f} windows still open", flush=True)
            for name, f in entry["services"].items():
                print(f"  {name}: {f['cpu_us_per_tick']:.1f} CPU µs/tick, "
                      f"{f['cpu_us_per_cycle']:.0f} µs/cycle, {f['cycles_per_s']:.1f} cycles/s, "
                      f"mean batch {f['mean_batch']:.0f}, dead letters {f['dead_letters']:.0f}", flush=True)
        results["peak_rss_mib"] = {s: peak_rss_mib(p) for s, p in pids.items()}
    finally:
        listener.close()
        pipe.stop_all()
        if args.keep_topics:
            print(f"topics kept: bench-{run_id}-*", flush=True)
        else:
            delete_topics(admin, [*names.values(), audit])
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    if args.drain_only:
        print(f"results: {path}")
        return 0
    plot(results, path.with_suffix(".png"))
    print(f"results: {path} and {path.with_suffix('.png')}")
    return 0


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput next to the relay chain, and latency percentiles per open-loop rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["relay chain", "pipeline"]
    values = [results["relay_chain"]["ticks_per_s"], results["pipeline_drain"]["ticks_per_s"]]
    ax1.bar(names, values, color=["#888888", "#1f77b4"])
    ax1.set_ylabel("ticks/s (drain mode)")
    ax1.set_title(f"Throughput, {results['ticks']:,} ticks, {results['machine']['cpus']} cores")
    for i, v in enumerate(values):
        ax1.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    rows = results.get("open_loop", [])
    labels = [f"{r['share_of_drain']:.0%}\n{r['rate']:,.0f}/s" for r in rows]
    for q, color in (("p50", "#2ca02c"), ("p99", "#ff7f0e"), ("p99.9", "#d62728")):
        ax2.plot(labels, [r["tick_to_redis_ms"].get(q, float("nan")) for r in rows], marker="o", label=q,
                 color=color)
    ax2.set_yscale("log")
    ax2.set_ylabel("tick -> Redis latency, ms")
    ax2.set_title("Open loop (share of drain rate)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
