"""Helpers of the enrichment integration tests: normalized ticks, the service as a subprocess, HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from dataproc_shared import avro
from dataproc_shared.partitioning import instrument_key, partition_for
from dataproc_shared.records import InRecord

START_NS = 1_763_900_000_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tick(venue: str, symbol: str, n: int, price: float = 100.0) -> dict[str, Any]:
    """A normalized trade whose `source_offset` is `n` (the test's id of the tick)."""
    return {
        "venue": venue,
        "symbol": symbol,
        "kind": "TRADE",
        "ts_ns": START_NS + n * 1_000_000,
        "seq": n,
        "trade_id": f"T{n}",
        "price": price,
        "size": 1.0 + n % 7,
        "bid": None,
        "ask": None,
        "bid_size": None,
        "ask_size": None,
        "ingest_ns": START_NS + n * 1_000_000 + 1_000,
        "source_partition": 0,
        "source_offset": n,
    }


def produce_ticks(bootstrap: str, topic: str, partitions: int, ticks: Iterable[Mapping[str, Any]]) -> int:
    """Produce normalized ticks keyed and partitioned like normalization does; return how many."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    count = 0
    for t in ticks:
        key = instrument_key(str(t["venue"]), str(t["symbol"]))
        producer.produce(
            topic, avro.encode("normalized_tick", t), key, partition=partition_for(key, partitions)
        )
        count += 1
        producer.poll(0)
    if producer.flush(30) != 0:
        raise RuntimeError("ticks not delivered")
    return count


@dataclass(frozen=True)
class Outcome:
    """What became of one input tick (by its `source_offset`)."""

    n: int
    kind: str  # "enriched" or the dead-letter reason
    record: InRecord
    value: dict[str, Any]


def outcomes(enriched: Sequence[InRecord], dead: Sequence[InRecord]) -> list[Outcome]:
    """Every output and dead letter, decoded and named by the tick's `source_offset`."""
    found: list[Outcome] = []
    for rec in enriched:
        value = avro.decode(rec.value or b"", "enriched_tick")
        found.append(Outcome(int(value["source_offset"]), "enriched", rec, value))
    for rec in dead:
        doc = json.loads(rec.value or b"{}")
        source = avro.decode(base64.b64decode(doc["payload_b64"]), "normalized_tick")
        found.append(Outcome(int(source["source_offset"]), str(doc["reason"]), rec, doc))
    return found


class ServiceProcess:
    """`python -m enrichment` as a subprocess with its own environment overrides."""

    def __init__(self, env: Mapping[str, str], port: int, log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "enrichment"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode()

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/health")[1])
        return result

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        total = 0.0
        for line in self.get("/metrics")[1].splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            self.check_running()
            try:
                if self.get("/ready")[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not ready in {within_s}s; log:\n{self.log_tail()}")

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"service exited with {self.proc.returncode}; log:\n{self.log_tail()}")

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, within_s: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(within_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(predicate: Any, within_s: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until true; an HTTP server not up yet counts as false."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if predicate():
                return
        except OSError:  # includes URLError: the service's HTTP server is not listening yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {within_s}s")
        time.sleep(0.1)
