"""Run the four services as separate local processes: start, stop, kill, wait until drained.

    uv run python -m dptools.pipeline start      # start all four, wait until each is ready
    uv run python -m dptools.pipeline status
    uv run python -m dptools.pipeline wait-drained
    uv run python -m dptools.pipeline stop

Each service runs as `python -m <service>` with the environment of this process (`.stack/env`),
logs to `.stack/logs/<service>.log` and leaves its pid in `.stack/run/<service>.pid`. The `Pipeline`
class does the same for tests, with per-test environment overrides and ports.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
SERVICES = ("normalization", "enrichment", "aggregation", "projection")
DEFAULT_PORTS = {"normalization": 8080, "enrichment": 8081, "aggregation": 8082, "projection": 8083}
#: The chain topics (by configuration name) each service consumes.
CHAIN_INPUTS = {"normalization": ("RAW",), "enrichment": ("NORMALIZED",), "aggregation": ("ENRICHED",),
                "projection": ("ENRICHED", "BARS")}
_LAG = re.compile(r'^dp_consumer_lag\{[^}]*\}\s+([0-9.e+-]+)$', re.M)
_IN = re.compile(r'^dp_messages_in_total\{[^}]*\}\s+([0-9.e+-]+)$', re.M)


def stop_on_sigterm() -> None:
    """Make SIGTERM end the program as Ctrl-C does: by an exception, so `finally` blocks run.

    A tool that starts processes and topics stops them in `finally`; Python's default for SIGTERM
    ends the interpreter at once and leaves the services of a benchmark running (exit status 143,
    as for a process killed by the signal).
    """
    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET (status 0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local http only
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class Pipeline:
    """The four services as child processes sharing one environment."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    run_dir: Path = REPO / ".stack" / "run"
    log_dir: Path = REPO / ".stack" / "logs"
    services: tuple[str, ...] = SERVICES
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, service: str, path: str = "") -> str:
        """Base URL of a service's HTTP port."""
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def start(self, service: str, extra_env: Mapping[str, str] | None = None) -> None:
        """Start one service process (no wait)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        env["DATA_PROC_HTTP__PORT"] = str(self.ports[service])
        env.update(extra_env or {})
        log = (self.log_dir / f"{service}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", service], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO, start_new_session=True,
        )
        log.close()
        self.procs[service] = proc
        (self.run_dir / f"{service}.pid").write_text(str(proc.pid))

    def start_all(self, ready_timeout: float = 120.0) -> None:
        """Start every service and wait until each answers /ready."""
        for service in self.services:
            self.start(service)
        for service in self.services:
            self.wait_ready(service, ready_timeout)

    def wait_ready(self, service: str, timeout: float = 120.0) -> None:
        """Block until the service's /ready answers 200; raise with its log tail if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}:\n{self.log_tail(service)}")
            if http_get(self.url(service, "/ready"))[0] == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{service} not ready after {timeout:.0f}s:\n{self.log_tail(service)}")

    def log_tail(self, service: str, lines: int = 40) -> str:
        """Last lines of a service's log."""
        path = self.log_dir / f"{service}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def pid(self, service: str) -> int | None:
        """Pid of a running service, from this object or its pid file."""
        proc = self.procs.get(service)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        path = self.run_dir / f"{service}.pid"
        if not path.exists():
            return None
        pid = int(path.read_text().strip() or 0)
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one service (kill -9 by default) and reap it."""
        pid = self.pid(service)
        if pid is None:
            return
        os.kill(pid, sig)
        proc = self.procs.get(service)
        if proc is not None and sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=60)

    def stop(self, service: str, timeout: float = 45.0) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL after `timeout`. Returns the exit code."""
        pid = self.pid(service)
        if pid is None:
            return None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        proc = self.procs.get(service)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            if proc is None and self.pid(service) is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        (self.run_dir / f"{service}.pid").unlink(missing_ok=True)
        return proc.wait(timeout=10) if proc is not None else None

    def stop_all(self) -> None:
        """Stop every service (reverse order of the chain)."""
        for service in reversed(self.services):
            self.stop(service)

    def lag_and_input(self) -> tuple[float, float] | None:
        """Total consumer lag and consumed count over all services (None when one doesn't answer)."""
        lag = consumed = 0.0
        for service in self.services:
            status, body = http_get(self.url(service, "/metrics"))
            if status != 200:
                return None
            text = body.decode()
            lag += sum(float(v) for v in _LAG.findall(text))
            consumed += sum(float(v) for v in _IN.findall(text))
        return lag, consumed

    def wait_drained(self, timeout: float = 300.0, settle: float = 3.0) -> None:
        """Block until every service has zero lag and consumed nothing new for `settle` seconds.

        Consumed, not necessarily committed: the lag counts from the consumer's position, which
        moves when a record is taken, and is refreshed every 10 s. A check that reads what the
        services wrote (Redis, ClickHouse, output topics) waits for `wait_committed` as well.
        """
        deadline = time.monotonic() + timeout
        last: tuple[float, float] | None = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            now = self.lag_and_input()
            if now is None or now[0] > 0 or now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= settle:
                return
            time.sleep(0.5)
        raise TimeoutError(f"pipeline not drained after {timeout:.0f}s (lag, consumed = {last})")


def uncommitted_inputs(bootstrap: str, inputs: Mapping[str, Sequence[str]],
                       read_s: float = 5.0) -> dict[str, int]:
    """Input partitions with records their group has not committed yet: `group topic[p]` -> records.

    `inputs`: consumer group -> the topics it consumes. For each partition a read_committed reader
    starts at the group's committed offset (the beginning when there is none) and reads to the last
    stable offset; the records it meets are the ones not processed and committed yet. A transaction
    marker is no record: the committed offset of a fully processed transactional input sits on the
    last marker, below the last stable offset, and the reader passes it without a record. A reader
    that does not reach the end within `read_s` counts the partition with -1 (not known to be done).
    Empty: every group has committed all of its input - under exactly-once, together with every
    output and external write (Redis, ClickHouse) of those records, which `before_commit` finished
    before the commit. The consumer lag that `wait_drained` reads counts from the consumer's
    position, which moves when a record is taken, before it is processed and committed.
    """
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(timeout=10)
    behind: dict[str, int] = {}
    for group, names in inputs.items():
        tps = [TopicPartition(t, p) for t in names for p in sorted(metadata.topics[t].partitions)]
        listed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)])[group]
        committed = {(tp.topic, tp.partition): tp.offset for tp in listed.result(30).topic_partitions}
        reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drain-check-{uuid.uuid4().hex}",
                           "isolation.level": "read_committed", "enable.auto.commit": False})
        try:
            ends = {tp: reader.get_watermark_offsets(TopicPartition(*tp), timeout=10)[1] for tp in committed}
            todo = {tp: at for tp, at in committed.items() if ends[tp] > max(at, 0)}
            found = _read_to_end(reader, todo, ends, read_s) if todo else {}
            behind.update({f"{group} {t}[{p}]": n for (t, p), n in found.items() if n})
        finally:
            reader.close()
    return behind


def _read_to_end(reader: Any, starts: Mapping[tuple[str, int], int], ends: Mapping[tuple[str, int], int],
                 read_s: float) -> dict[tuple[str, int], int]:
    """Records `reader` meets from `starts` to `ends` per partition; -1 where it did not reach the end."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    reader.assign([TopicPartition(t, p, at if at >= 0 else OFFSET_BEGINNING)
                   for (t, p), at in starts.items()])
    found = dict.fromkeys(starts, 0)
    at_end: set[tuple[str, int]] = set()
    deadline = time.monotonic() + read_s
    while len(at_end) < len(starts) and time.monotonic() < deadline:
        msg = reader.poll(0.2)
        if msg is not None and msg.error() is None:
            found[(msg.topic(), msg.partition())] += 1
        at_end = {(tp.topic, tp.partition) for tp in reader.position([TopicPartition(*tp) for tp in starts])
                  if tp.offset >= ends[(tp.topic, tp.partition)]}
    return {tp: n if tp in at_end else -1 for tp, n in found.items()}


def wait_committed(bootstrap: str, inputs: Mapping[str, Sequence[str]], timeout: float = 120.0) -> None:
    """Block until every group has committed all of its input (`uncommitted_inputs` empty)."""
    deadline = time.monotonic() + timeout
    behind = uncommitted_inputs(bootstrap, inputs)
    while behind:
        if time.monotonic() > deadline:
            raise TimeoutError(f"input not committed after {timeout:.0f}s: {behind}")
        time.sleep(0.5)
        behind = uncommitted_inputs(bootstrap, inputs)


def chain_snapshot(bootstrap: str, pipe: Pipeline, groups: Mapping[str, str],
                   topics: Mapping[str, str]) -> str:
    """Where each input partition of the chain stands, for a run that failed or did not drain.

    `groups`: service -> consumer group id; `topics`: configuration name (`RAW`, `NORMALIZED`,
    `ENRICHED`, `BARS`) -> topic. Per input partition of every service: the group's committed offset
    (not requiring a stable offset, so an offset commit of an open transaction shows too), the last
    stable offset (what a read_committed consumer can reach) and the high watermark; then the
    services' own `dp_consumer_lag` (cached high watermark - consumer position), transactions,
    rebalances, alignment holds and `/health`.
    """
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    lines = [f"chain snapshot {time.strftime('%H:%M:%S')}"]
    readers = {level: Consumer({"bootstrap.servers": bootstrap, "group.id": f"snapshot-{uuid.uuid4().hex}",
                                "isolation.level": level, "enable.auto.commit": False})
               for level in ("read_committed", "read_uncommitted")}
    try:
        metadata = admin.list_topics(timeout=10)
        for service, names in CHAIN_INPUTS.items():
            group = groups[service]
            tps = [TopicPartition(topics[n], p) for n in names
                   for p in sorted(metadata.topics[topics[n]].partitions)]
            try:
                future = admin.list_consumer_group_offsets(
                    [ConsumerGroupTopicPartitions(group, tps)], require_stable=False)[group]
                committed = {(tp.topic, tp.partition): tp.offset for tp in future.result(30).topic_partitions}
            except Exception as exc:
                lines.append(f"{service}: committed offsets not read: {exc}")
                committed = {}
            for tp in tps:
                try:
                    lso = readers["read_committed"].get_watermark_offsets(tp, timeout=10)[1]
                    hw = readers["read_uncommitted"].get_watermark_offsets(tp, timeout=10)[1]
                except Exception as exc:
                    lso = hw = -1
                    lines.append(f"  watermarks of {tp.topic}[{tp.partition}] not read: {exc}")
                at = committed.get((tp.topic, tp.partition))
                lines.append(f"{service:13} {tp.topic}[{tp.partition}] committed={at} lso={lso} hw={hw}")
    finally:
        for reader in readers.values():
            reader.close()
    for service in SERVICES:
        status, body = http_get(pipe.url(service, "/metrics"), timeout=10)
        lags = [line for line in body.decode(errors="replace").splitlines()
                if line.startswith(("dp_consumer_lag", "dp_abandoned", "dp_transactions_total",
                                    "dp_alignment_paused", "dp_rebalances_total"))]
        lines.append(f"{service} /metrics {status}: " + "; ".join(lags))
        status, body = http_get(pipe.url(service, "/health"), timeout=10)
        lines.append(f"{service} /health {status}: {body.decode(errors='replace')[:800]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status", "wait-drained"))
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    pipe = Pipeline()
    if args.command == "start":
        for service in SERVICES:
            if pipe.pid(service) is None:
                print(f"starting {service} on :{pipe.ports[service]} (log .stack/logs/{service}.log)")
                pipe.start(service)
        for service in SERVICES:
            pipe.wait_ready(service, args.timeout)
            print(f"{service} ready at {pipe.url(service, '/health')}")
    elif args.command == "stop":
        for service in reversed(SERVICES):
            if pipe.pid(service) is not None:
                print(f"stopping {service}")
                pipe.stop(service)
    elif args.command == "status":
        for service in SERVICES:
            code, body = http_get(pipe.url(service, "/health"))
            state = body.decode()[:200] if code else "down"
            print(f"{service:14} pid={pipe.pid(service)} {pipe.url(service, '/health')} -> {code} {state}")
    else:
        pipe.wait_drained(args.timeout)
        print("pipeline drained")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
