"""The main job: the whole pipeline on the local stack, fed with real and synthetic ticks.

    make demo          # = make up, then: uv run python -m dptools.demo
    make demo-stop     # stop the services and the stack

Steps: PostgreSQL migrations, topics, reference data, the four services as separate processes
(aggregation applies the ClickHouse migrations to the embedded engine it owns), a feed of real
Binance trades and quotes followed by synthetic ticks for every active instrument (with a few
malformed, duplicate, out-of-order and late records; their event times end now, like a live feed's),
a wait until the pipeline has drained and every window that has ended is closed, then a report: bars
read back through aggregation's read API and from Redis, the bars still open (windows that have not
ended: the current 5-minute and hour windows, final once the wall clock passes their end plus the
allowed lateness), dead letters by reason, and where to look next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from dptools.pipeline import REPO, SERVICES, Pipeline, http_get

DEMO_IDLE_TIMEOUT_MS = 15_000
#: The aggregation's default `allowed_lateness_ms`.
DEFAULT_LATENESS_MS = 5_000
#: Slack (ms) for the idle timer's period and the write to ClickHouse once a window's close has passed.
CLOSE_SLACK_MS = 3_000


def step(text: str) -> None:
    """Print a step header."""
    print(f"\n==> {text}", flush=True)


def run_tool(*args: str) -> None:
    """Run `python -m dptools.<tool> ...`, failing loudly."""
    subprocess.run([sys.executable, "-m", *args], check=True, cwd=REPO)


def dead_letter_counts(bootstrap: str, topic: str) -> Counter[tuple[str, str]]:
    """(service, reason) counts of every dead letter on the topic so far (read_committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-report-{os.getpid()}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "auto.offset.reset": "earliest"})
    counts: Counter[tuple[str, str]] = Counter()
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        consumer.assign(parts)
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        done = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + 60
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1.0):
                value = msg.value()
                if msg.error() is None and value:
                    letter = json.loads(value)
                    counts[(letter.get("service", "?"), letter.get("reason", "?"))] += 1
                partition = msg.partition()
                if partition is not None and (msg.offset() or 0) + 1 >= ends[partition]:
                    done.add(partition)
            for p in parts:
                pos = consumer.position([p])[0].offset
                if pos >= ends[p.partition]:
                    done.add(p.partition)
    finally:
        consumer.close()
    return counts


def open_bars(pipe: Pipeline) -> list[dict[str, Any]] | None:
    """The summary rows of the intervals with open bars (not final in ClickHouse yet), else None.

    Each row: `interval`, `open_bars` and the earliest and latest window end of those bars
    (`first_open_end_ms`, `last_open_end_ms`); None when the read API does not answer.
    """
    status, body = http_get(pipe.url("aggregation", "/api/v1/summary"), timeout=30)
    if status != 200:
        return None
    return [row for row in json.loads(body)["intervals"] if int(row["open_bars"])]


def overdue(rows: list[dict[str, Any]], lateness_ms: int, now_ms: int) -> int:
    """Open bars of the intervals whose earliest open window is past its close, with slack (0: none).

    The close is the window end + lateness; past it by more than `CLOSE_SLACK_MS`, the idle timer
    has still to finalize at least that window once its partition is idle.
    """
    return sum(int(r["open_bars"]) for r in rows
               if int(r["first_open_end_ms"]) + lateness_ms + CLOSE_SLACK_MS < now_ms)


def wait_ended_final(pipe: Pipeline, lateness_ms: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until every window that has ended (its end + lateness passed on the wall clock) is final.

    Once the feed stops, its partitions go idle and the idle timer finalizes each window as the wall
    clock passes its close; windows that have not ended stay open. Returns the open ones per interval.
    """
    deadline = time.monotonic() + timeout
    rows = open_bars(pipe)
    while time.monotonic() < deadline:
        rows = open_bars(pipe)
        if rows is not None and not overdue(rows, lateness_ms, time.time_ns() // 1_000_000):
            return rows
        time.sleep(0.5)
    waiting = "?" if rows is None else overdue(rows, lateness_ms, time.time_ns() // 1_000_000)
    print(f"warning: {waiting} bars of ended windows still open after {timeout:.0f}s", file=sys.stderr)
    return rows or []


def show_open(rows: list[dict[str, Any]], lateness_ms: int) -> None:
    """Print the bars still open: windows that have not ended, and when they close."""
    if not rows:
        print("\nEvery bar is final.")
        return

    def clock(ms: int) -> str:
        return time.strftime("%H:%M:%S", time.gmtime((ms + lateness_ms) / 1000))

    print("\nBars still open: their windows have not ended yet (the feed's event times reach up to now).")
    print(f"Each becomes final when its window end + {lateness_ms / 1000:g} s allowed lateness has passed,")
    print("by the watermark of newer ticks or, with no more ticks, by the idle timer on the wall clock:")
    for r in rows:
        first, last = int(r["first_open_end_ms"]), int(r["last_open_end_ms"])
        when = clock(first) if first == last else f"{clock(first)} to {clock(last)}"
        print(f"  {r['interval']:<4}{int(r['open_bars']):>6} open, final at {when} UTC")


def show_bars(pipe: Pipeline, redis_url: str) -> None:
    """Print a table of recent 1m bars per instrument (ClickHouse FINAL) and their Redis view."""
    import redis  # local import: only the report needs it

    status, body = http_get(pipe.url("aggregation", "/api/v1/summary"), timeout=30)
    if status == 200:
        print("ClickHouse summary (aggregation read API /api/v1/summary):")
        print(json.dumps(json.loads(body), indent=2)[:2000])
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    instruments = sorted({k.split(":")[2] for k in client.scan_iter(match="md:bars:*:1m", count=1000)})
    print(f"\n{len(instruments)} instruments have final 1m bars in Redis. The busiest ones:")
    ranked = sorted(instruments, key=lambda i: -client.zcard(f"md:bars:{i}:1m"))[:8]
    header = f"{'instrument':<28}{'window start (UTC)':<22}{'open':>12}{'high':>12}{'low':>12}" \
             f"{'close':>12}{'volume':>12}{'trades':>8}  redis latest"
    print(header)
    print("-" * len(header))
    for inst in ranked:
        query = urllib.parse.urlencode({"instrument": inst, "interval": "1m", "limit": 10000})
        status, body = http_get(pipe.url("aggregation", f"/api/v1/bars?{query}"), timeout=30)
        if status != 200:
            print(f"{inst:<28}read API answered {status}: {body[:200].decode(errors='replace')}")
            continue
        bars: list[dict[str, Any]] = json.loads(body)["bars"]
        latest: dict[str, str] = client.hgetall(f"md:bar:{inst}:1m")  # type: ignore[assignment]
        for bar in bars[-3:]:
            mark = ""
            if latest and int(latest.get("window_start", -1)) == bar["window_start_ms"]:
                mark = f"v{latest.get('version')} final={latest.get('is_final')}"
            print(f"{inst:<28}{bar['window_start'][:19]:<22}{bar['open']:>12.4f}{bar['high']:>12.4f}"
                  f"{bar['low']:>12.4f}{bar['close']:>12.4f}{bar['volume']:>12.2f}"
                  f"{bar['trade_count']:>8}  {mark}")


def main(argv: list[str] | None = None) -> int:
    """Run the main job."""
    parser = argparse.ArgumentParser(prog="python -m dptools.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=20_000, help="synthetic ticks to feed")
    parser.add_argument("--real", type=int, default=20_000, help="real Binance ticks to feed first")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    for name in ("DATA_PROC_KAFKA_BOOTSTRAP", "DATA_PROC_POSTGRES_DSN", "DATA_PROC_REDIS_URL"):
        if name not in env:
            print(f"{name} is not set: bring the stack up first (make up; source .stack/env)",
                  file=sys.stderr)
            return 2
    bootstrap = env["DATA_PROC_KAFKA_BOOTSTRAP"]

    step("PostgreSQL migrations (ClickHouse migrations run in aggregation, the owner of the embedded engine)")
    run_tool("dptools.migrate", "postgres")
    step("topics")
    run_tool("dptools.topics", "create")
    step("reference data")
    run_tool("dptools.refdata", "load")

    step("starting the four services")
    env.setdefault("DATA_PROC_AGGREGATION__IDLE_TIMEOUT_MS", str(DEMO_IDLE_TIMEOUT_MS))
    pipe = Pipeline(env=env)
    for service in SERVICES:
        if pipe.pid(service) is None:
            print(f"starting {service} on :{pipe.ports[service]} (log .stack/logs/{service}.log)")
            pipe.start(service)
        else:
            print(f"{service} already running (pid {pipe.pid(service)})")
    for service in SERVICES:
        pipe.wait_ready(service, 180)
        print(f"{service} ready: {pipe.url(service, '/health')}")

    started = time.monotonic()
    if args.real:
        step(f"feeding {args.real} real Binance ticks (2024-08-08, spot and perpetuals)")
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
            run_tool("dptools.realdata", "binance", "--limit", str(args.real), "--out", tmp.name)
            run_tool("dptools.produce", "--no-progress", "replay", tmp.name)
    step(f"feeding {args.synthetic} synthetic ticks (seed {args.seed}) with malformed, duplicate, "
         "out-of-order and late records")
    run_tool("dptools.produce", "--no-progress", "synthetic", "--count", str(args.synthetic),
             "--seed", str(args.seed), "--malformed", "0.005", "--duplicates", "0.005",
             "--out-of-order", "0.01", "--late", "0.002", "--unknown", "0.002")

    step("waiting until the pipeline has drained and the windows that have ended are closed")
    pipe.wait_drained(timeout=600)
    lateness_ms = int(env.get("DATA_PROC_AGGREGATION__ALLOWED_LATENESS_MS", DEFAULT_LATENESS_MS))
    idle_ms = int(env["DATA_PROC_AGGREGATION__IDLE_TIMEOUT_MS"])
    still_open = wait_ended_final(pipe, lateness_ms, timeout=(idle_ms + lateness_ms) / 1000 + 120)
    print(f"drained in {time.monotonic() - started:.1f}s")

    step("result")
    show_bars(pipe, env["DATA_PROC_REDIS_URL"])
    show_open(still_open, lateness_ms)
    counts = dead_letter_counts(bootstrap, env.get("DATA_PROC_TOPICS__DEADLETTER", "deadletter.market.v1"))
    print("\nDead letters by service and reason (all runs so far):")
    for (service, reason), n in sorted(counts.items()):
        print(f"  {service:<14}{reason:<22}{n:>8}")

    step("where to look next")
    for service in SERVICES:
        print(f"  {service:<14}{pipe.url(service, '/health')}   {pipe.url(service, '/metrics')}")
    print(f"  bars          {pipe.url('aggregation', '/api/v1/bars?instrument=BINANCE.BTCUSDT&interval=1m')}")
    print("  logs          .stack/logs/<service>.log")
    print("  stop          make demo-stop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
