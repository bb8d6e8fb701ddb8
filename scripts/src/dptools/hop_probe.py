"""Latency of one relay hop, and where a cycle's time goes.

    uv run python -m dptools.hop_probe --rate 200 --seconds 30
    uv run python -m dptools.hop_probe --rate 1000 --env DATA_PROC_LOOP__BATCH_TIMEOUT_MS=20

A paced producer writes records (value = send time, ns) to a fresh input topic at `--rate`; one
`dptools.relay` process (the shared Kafka loop, same guarantee and transactions as the services, no
decoding) copies them to a fresh output topic; a `read_committed` consumer on the output measures
send -> visible downstream per record. A second consumer on the input gives the same path without
the relay (produce + fetch), so the hop's own share is the difference. The relay's
`dp_cycle_step_seconds` histogram (consume wait, process, produce, before_commit, send_offsets,
commit) gives the split of its cycles; its CPU per record and per committed cycle, and per thread
kind the CPU and the voluntary context switches (wake-ups) per cycle, are read from /proc.

Prints a summary and writes `bench-results/hop-<time>.json`. Needs the local stack (`.stack/env`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from dptools.bench import (
    CLK_TCK,
    Samples,
    cpu_seconds,
    create_topics,
    free_port,
    percentiles,
    scrape,
    start_process,
    wait_ready,
)
from dptools.benchkit import delete_topics
from dptools.pipeline import REPO, stop_on_sigterm

STEPS = ("consume", "process", "produce", "before_commit", "send_offsets", "commit")


class Receiver:
    """A consumer thread that records, per record, now minus the send time carried in the value."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, read_committed: bool) -> None:
        self.latency_ms: list[float] = []
        self.recording = False
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"hop-probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 10,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        })
        self._consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in range(partitions)])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            # the first record, then what is already fetched: consume(n, timeout) would wait for n
            msgs = consumer.consume(1, 0.1)
            if msgs:
                msgs.extend(consumer.consume(500, 0))
            for msg in msgs:
                if msg.error() is None and self.recording:
                    self.latency_ms.append((time.time_ns() - int(msg.value() or b"0")) / 1e6)

    def close(self) -> None:
        """Stop and close the consumer."""
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def step_figures(before: Samples, after: Samples) -> dict[str, dict[str, float]]:
    """Per cycle step: count, mean ms and an upper bound of the p50 and p99 (bucket bounds)."""
    out: dict[str, dict[str, float]] = {}
    def delta(name: str, step: str) -> float:
        return sum(v - before.get((n, lab), 0.0) for (n, lab), v in after.items()
                   if n == name and ("step", step) in lab)

    for step in STEPS:
        count = delta("dp_cycle_step_seconds_count", step)
        if not count:
            continue
        buckets = sorted(
            (float(dict(lab)["le"]), v - before.get((n, lab), 0.0))
            for (n, lab), v in after.items()
            if n == "dp_cycle_step_seconds_bucket" and dict(lab).get("step") == step
        )

        def bound(q: float, buckets: list[tuple[float, float]] = buckets, count: float = count) -> float:
            return next((le * 1000 for le, c in buckets if c >= q * count), float("inf"))

        out[step] = {"cycles": count, "mean_ms": delta("dp_cycle_step_seconds_sum", step) / count * 1000,
                     "p50_le_ms": bound(0.5), "p99_le_ms": bound(0.99)}
    return out


def thread_stats(pid: int) -> dict[str, tuple[float, int]]:
    """CPU seconds and voluntary context switches (wake-ups after a wait) per thread kind of `pid`.

    Kinds: `python main` (the event loop's thread), `python other` (worker and runner threads), and
    librdkafka's threads by name without their number (`rdk:main`, `rdk:broker`, ...).
    """
    out: dict[str, tuple[float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        switches = next((int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("voluntary_ctxt_switches:")), 0)
        if task.name == str(pid):
            kind = "python main"
        elif comm.startswith("rdk:"):
            kind = comm.rstrip("0123456789-")
        else:
            kind = "python other"
        have = out.get(kind, (0.0, 0))
        out[kind] = (have[0] + cpu, have[1] + switches)
    return out


def per_cycle(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]],
              cycles: float) -> dict[str, dict[str, float]]:
    """`thread_stats` differences per committed cycle: CPU µs and wake-ups per thread kind.

    Threads that ended between the two samples are missing from `after` (their share is left out).
    """
    if not cycles:
        return {}
    out = {}
    for kind in sorted(after):
        cpu0, sw0 = before.get(kind, (0.0, 0))
        cpu1, sw1 = after[kind]
        out[kind] = {"cpu_us": (cpu1 - cpu0) / cycles * 1e6, "wakeups": (sw1 - sw0) / cycles}
    return out


def probe(bootstrap: str, rate: float, seconds: float, partitions: int, extra_env: dict[str, str],
          log_dir: Path) -> dict[str, Any]:
    """Run the probe once; returns its figures."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    run = uuid.uuid4().hex[:8]
    source, target = f"hop-{run}-in", f"hop-{run}-out"
    create_topics(admin, [source, target], partitions, set())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATA_PROC_HTTP__PORT"}
    env.update({"DATA_PROC_HTTP__PORT": str(port), "DATA_PROC_INSTANCE_ID": f"hop-{run}",
                "DATA_PROC_KAFKA__GROUP_ID": f"hop-{run}", "DATA_PROC_LOG_LEVEL": "WARNING", **extra_env})
    proc = start_process([sys.executable, "-m", "dptools.relay", source, target], env,
                         log_dir / f"hop-{run}.log")
    direct = hop = None
    try:
        wait_ready(port, proc)
        direct = Receiver(bootstrap, source, partitions, read_committed=True)
        hop = Receiver(bootstrap, target, partitions, read_committed=True)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "enable.idempotence": True,
                             "partitioner": "murmur2_random"})
        # warm-up: the relay's first transaction and the consumers' first fetches
        for i in range(20):
            producer.produce(source, key=b"k%d" % i, value=b"%d" % time.time_ns())
        producer.flush(10)
        time.sleep(2)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        before, cpu0, threads0 = scrape(metrics_url), cpu_seconds(proc.pid), thread_stats(proc.pid)
        direct.recording = hop.recording = True
        count = int(rate * seconds)
        start = time.monotonic() + 0.1
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.produce(source, key=b"k%d" % (i % 100), value=b"%d" % time.time_ns())
            producer.poll(0)
        producer.flush(30)
        deadline = time.monotonic() + 30
        while len(hop.latency_ms) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        after, cpu1, threads1 = scrape(metrics_url), cpu_seconds(proc.pid), thread_stats(proc.pid)
        steps = step_figures(before, after)
        cycles = steps.get("commit", {}).get("cycles", 0.0)
        return {
            "rate": rate, "seconds": seconds, "partitions": partitions, "sent": count,
            "env": extra_env, "load_average": os.getloadavg(),
            "direct_ms": percentiles(direct.latency_ms), "hop_ms": percentiles(hop.latency_ms),
            "relay_cpu_us_per_record": (cpu1 - cpu0) / count * 1e6,
            "relay_cpu_us_per_cycle": (cpu1 - cpu0) / cycles * 1e6 if cycles else 0.0,
            "threads_per_cycle": per_cycle(threads0, threads1, cycles),
            "steps": steps,
        }
    finally:
        for receiver in (direct, hop):
            if receiver is not None:
                receiver.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        delete_topics(admin, [source, target])


def main(argv: list[str] | None = None) -> int:
    """Run the probe and print its figures."""
    stop_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m dptools.hop_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="records per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the relay (e.g. DATA_PROC_LOOP__BATCH_TIMEOUT_MS=20)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    result = probe(os.environ["DATA_PROC_KAFKA_BOOTSTRAP"], args.rate, args.seconds, args.partitions, extra,
                   args.out / "logs")
    for name in ("direct_ms", "hop_ms"):
        r = result[name]
        print(f"{name:>10}: n={r.get('n', 0)} p50 {r.get('p50', 0):.1f} p99 {r.get('p99', 0):.1f} "
              f"p99.9 {r.get('p99.9', 0):.1f} max {r.get('max', 0):.1f}")
    print(f"relay CPU µs/record: {result['relay_cpu_us_per_record']:.1f}, "
          f"µs/cycle: {result['relay_cpu_us_per_cycle']:.0f} (load average {result['load_average'][0]:.1f})")
    for kind, f in result["threads_per_cycle"].items():
        print(f"  {kind:>13}: CPU {f['cpu_us']:.0f} µs, wake-ups {f['wakeups']:.1f} per cycle")
    for step, f in result["steps"].items():
        print(f"  {step:>13}: cycles {f['cycles']:.0f} mean {f['mean_ms']:.2f} ms "
              f"p50 <= {f['p50_le_ms']:g} ms p99 <= {f['p99_le_ms']:g} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hop-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
