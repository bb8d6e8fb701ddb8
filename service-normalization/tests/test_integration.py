"""`python -m normalization` against the real broker: a mixed stream in, exactly the expected ticks,
dead letters and dropped duplicates out (read_committed), across a `kill -9` and restart mid-stream."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from dataproc_shared import avro
from dataproc_shared.deadletter import decode_dead_letter
from dataproc_shared.partitioning import partition_for
from dataproc_shared.records import CORRELATION_HEADER, INGEST_TIME_HEADER, InRecord

pytestmark = pytest.mark.integration

PARTITIONS = 3
S = 1_000_000_000


@dataclass(frozen=True)
class Sent:
    """One raw message and what must become of it."""

    key: bytes
    value: bytes
    expect: str  # "out", "dup" or a dead-letter reason
    out_key: str = ""
    ts_ns: int = 0
    fields: tuple[tuple[str, Any], ...] = ()


def build_stream(now_ns: int) -> tuple[list[Sent], list[Sent]]:
    """A deterministic mix in two parts: trades and quotes of several instruments, bad records, and in
    the second part duplicates of first-part trades (they arrive after the restart, so only the
    restored dedup state can recognize them).
    """
    venues = [("XNYM", "CLZ6"), ("binance", " btcusdt "), ("XCEC", "GCZ13"), ("OANDA", "EURUSD")]
    first: list[Sent] = []
    second: list[Sent] = []
    originals: list[tuple[bytes, dict[str, Any]]] = []
    for i in range(720):
        part = first if i < 540 else second
        venue, symbol = venues[i % len(venues)]
        key = f"{venue}:{symbol}".encode()  # raw producers' keys may be sloppy
        canonical = f"{venue.strip().upper()}:{symbol.strip().upper()}"
        ts_ns = now_ns - (1000 - i) * S // 10
        if i % 3 == 0:
            body: dict[str, Any] = {
                "venue": venue,
                "symbol": symbol,
                "type": "quote",
                "ts": ts_ns,
                "bid": f"{100 + i}.25",
                "ask": 100.5 + i,
                "bid_size": 3,
            }
            fields: tuple[tuple[str, Any], ...] = (("kind", "QUOTE"), ("bid", 100.25 + i), ("ask", 100.5 + i))
        else:
            body = {
                "venue": venue,
                "symbol": symbol,
                "ts": ts_ns // 1_000_000,
                "price": str(50 + i / 4),
                "size": 1 + i % 5,
                "trade_id": f"T{i}",
                "seq": i,
            }
            ts_ns = ts_ns // 1_000_000 * 1_000_000
            fields = (
                ("kind", "TRADE"),
                ("price", 50 + i / 4),
                ("size", float(1 + i % 5)),
                ("trade_id", f"T{i}"),
            )
            if i < 540 and i % 16 == 1:
                originals.append((key, body))
        part.append(Sent(key, json.dumps(body).encode(), "out", canonical, ts_ns, fields))
        if i % 10 == 5:
            part.append(bad_record(i, now_ns, key))
    # Same venue (any spelling) + trade_id, shifted event time, other price: a duplicate all the same.
    for j, (key, body) in enumerate(originals):
        dup = {**body, "venue": f" {body['venue'].lower()} ", "ts": body["ts"] + 1000, "price": "1"}
        second.insert(min(len(second), j * 2), Sent(key, json.dumps(dup).encode(), "dup"))
    return first, second


def bad_record(i: int, now_ns: int, key: bytes) -> Sent:
    """One of the rejected kinds, chosen by `i`."""
    ts = now_ns // 1_000_000
    kinds: list[tuple[bytes, str]] = [
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00garbage", "not_utf8"),
        (b"[1, 2, 3]", "not_object"),
        (json.dumps({"symbol": "X", "ts": ts, "price": 1, "size": 1}).encode(), "missing_field"),
        (
            json.dumps({"venue": "V", "symbol": "X", "ts": ts, "price": "abc", "size": 1}).encode(),
            "bad_number",
        ),
        (
            json.dumps({"venue": "V", "symbol": "X", "ts": "noon", "price": 1, "size": 1}).encode(),
            "bad_timestamp",
        ),
        (
            json.dumps({"venue": "V", "symbol": "X", "type": "quote", "ts": ts, "bid": 2, "ask": 1}).encode(),
            "crossed_quote",
        ),
        (
            json.dumps({"venue": "V", "symbol": "X", "ts": ts + 3_600_000, "price": 1, "size": 1}).encode(),
            "future_timestamp",
        ),
        (json.dumps({"venue": "V", "symbol": "X", "ts": ts, "price": 1, "size": 0}).encode(), "bad_size"),
        (
            json.dumps({"venue": "V", "symbol": "X", "ts": ts, "price": "NaN", "size": 1}).encode(),
            "non_finite",
        ),
    ]
    value, reason = kinds[(i // 10) % len(kinds)]
    return Sent(key, value, reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """`python -m normalization` as a subprocess with its own topics, group, instance id and port."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = {**os.environ, **env}
        self.port = int(env["DATA_PROC_HTTP__PORT"])
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        with (self.tmp / f"service-{self.runs}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "normalization"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return "\n".join(
            (self.tmp / f"service-{i}.log").read_text(errors="replace")[-4000:]
            for i in range(1, self.runs + 1)
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError):
            return 0, b""  # not listening yet

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def service_env(topic_factory: Callable[..., str], kafka_bootstrap: str) -> dict[str, str]:
    run = uuid.uuid4().hex[:10]
    return {
        "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DATA_PROC_TOPICS__RAW": topic_factory("raw", PARTITIONS),
        "DATA_PROC_TOPICS__NORMALIZED": topic_factory("norm", PARTITIONS),
        "DATA_PROC_TOPICS__DEADLETTER": topic_factory("dlq", 1),
        "DATA_PROC_TOPICS__NORMALIZATION_DEDUP_CHANGELOG": topic_factory(
            "dedup", PARTITIONS, {"cleanup.policy": "compact"}
        ),
        "DATA_PROC_AUDIT_KAFKA_TOPIC": topic_factory("audit", 1),
        "DATA_PROC_AUDIT_SINKS": "kafka",
        "DATA_PROC_AUDIT_FLUSH_INTERVAL_MS": "100",
        "DATA_PROC_TOPICS__PARTITIONS": str(PARTITIONS),
        "DATA_PROC_KAFKA__GROUP_ID": f"norm-test-{run}",
        "DATA_PROC_INSTANCE_ID": f"norm-test-{run}",
        "DATA_PROC_HTTP__PORT": str(free_port()),
        "DATA_PROC_HTTP__HOST": "127.0.0.1",
        "DATA_PROC_LOOP__BATCH_SIZE": "5",
        "DATA_PROC_LOOP__TICK_INTERVAL_MS": "200",
    }


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    svc = Service(service_env, tmp_path)
    yield svc
    svc.stop_quietly()


def produce(bootstrap: str, topic: str, stream: list[Sent]) -> list[tuple[int, int]]:
    """Produce in order; return (partition, offset) of each message."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    coords: list[tuple[int, int]] = [(-1, -1)] * len(stream)

    def delivered(index: int) -> Callable[[Any, Any], None]:
        def callback(err: Any, msg: Any) -> None:
            assert err is None, err
            coords[index] = (msg.partition(), msg.offset())

        return callback

    for index, sent in enumerate(stream):
        # Keyed by the raw key as sent (possibly sloppy), partitioned like the Java client would.
        producer.produce(
            topic,
            sent.value,
            sent.key,
            partition=partition_for(sent.key, PARTITIONS),
            on_delivery=delivered(index),
        )
    assert producer.flush(30) == 0
    return coords


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, svc: Service) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{svc.log()}")
        if svc.proc is not None and svc.proc.poll() is not None:
            raise AssertionError(
                f"service exited with {svc.proc.returncode} while waiting for {what}\n{svc.log()}"
            )
        time.sleep(0.2)


def test_mixed_stream_exactly_once_across_kill9(
    service: Service,
    service_env: dict[str, str],
    kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    raw, norm, dlq, audit = (
        service_env["DATA_PROC_TOPICS__RAW"],
        service_env["DATA_PROC_TOPICS__NORMALIZED"],
        service_env["DATA_PROC_TOPICS__DEADLETTER"],
        service_env["DATA_PROC_AUDIT_KAFKA_TOPIC"],
    )
    first, second = build_stream(time.time_ns())
    stream = first + second
    expected_out = [s for s in stream if s.expect == "out"]
    expected_dead = [s for s in stream if s.expect not in ("out", "dup")]
    dups = [s for s in second if s.expect == "dup"]
    assert len(dups) >= 20
    assert len(expected_dead) >= 20

    coords = produce(kafka_bootstrap, raw, first)
    service.start()
    # Kill -9 in the middle of the stream, once part of it is committed.
    wait_for(lambda: len(consume_all([norm], timeout=30)) >= 30, 90, "first outputs", service)
    service.kill9()
    committed_before = len(consume_all([norm], timeout=30))
    assert committed_before < sum(1 for s in first if s.expect == "out"), "the kill came too late"
    coords += produce(kafka_bootstrap, raw, second)
    service.start()
    wait_for(lambda: service.get("/ready")[0] == 200, 60, "ready after restart", service)
    status, body = service.get("/health")
    health = json.loads(body)
    assert status == 200, health
    assert health["status"] == "healthy"
    assert "kafka" in json.dumps(health["dependencies"]).lower()

    consume_all([norm], timeout=90, expected=len(expected_out))
    dead = consume_all([dlq], timeout=60, expected=len(expected_dead))
    time.sleep(2)  # anything extra (an output twice) would show up now
    outputs = consume_all([norm], timeout=30)
    dead = consume_all([dlq], timeout=30)

    # Exactly the expected ticks, once each, on the canonical key's partition, with lineage headers.
    by_source: dict[tuple[int, int], InRecord] = {}
    for rec in outputs:
        tick = avro.decode(rec.value or b"", "normalized_tick")
        source = (tick["source_partition"], tick["source_offset"])
        assert source not in by_source, f"output twice for raw {source}"
        by_source[source] = rec
    expected_sources = {coords[i]: s for i, s in enumerate(stream) if s.expect == "out"}
    assert set(by_source) == set(expected_sources)
    for source, rec in by_source.items():
        sent = expected_sources[source]
        tick = avro.decode(rec.value or b"", "normalized_tick")
        assert rec.key == sent.out_key.encode()
        assert rec.partition == partition_for(sent.out_key.encode(), PARTITIONS)
        assert f"{tick['venue']}:{tick['symbol']}" == sent.out_key
        assert tick["ts_ns"] == sent.ts_ns
        for name, value in sent.fields:
            assert tick[name] == value, (name, tick)
        headers = dict(rec.headers)
        assert headers[CORRELATION_HEADER]
        assert int(headers[INGEST_TIME_HEADER]) == tick["ingest_ns"] > 0

    # Exactly the expected dead letters, once each, with the reason and the original bytes.
    got_dead = Counter()
    for rec in dead:
        doc = decode_dead_letter(rec.value or b"")
        assert doc["service"] == "normalization"
        assert doc["source_topic"] == raw
        got_dead[
            (
                doc["source_partition"],
                doc["source_offset"],
                doc["reason"],
                base64.b64decode(doc["payload_b64"]),
            )
        ] += 1
    want_dead = Counter(
        (*coords[i], s.expect, s.value) for i, s in enumerate(stream) if s.expect not in ("out", "dup")
    )
    assert got_dead == want_dead

    # Duplicates: none of them came out; the restarted instance counted each one (metric) and
    # audited it, committed with the outputs (read_committed audit topic: exactly once each).
    status, metrics = service.get("/metrics")
    assert status == 200
    dup_lines = [line for line in metrics.decode().splitlines() if line.startswith("dp_duplicates_total")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in dup_lines) == len(dups), metrics.decode()[:3000]
    events = [json.loads(rec.value or b"") for rec in consume_all([audit], timeout=30)]
    dropped = [e for e in events if e["event_type"] == "duplicate_dropped"]
    dup_coords = {coords[len(first) + i] for i, s in enumerate(second) if s.expect == "dup"}
    assert sorted((e["source_partition"], e["offset_from"]) for e in dropped) == sorted(dup_coords)
    assert all(e["service"] == "normalization" and e["reason"] == "duplicate" for e in dropped)
    assert service.terminate() == 0


def test_audit_events_commit_with_their_batch_across_kill9(
    service_env: dict[str, str],
    tmp_path: Path,
    kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    """A batch's audit events (dropped duplicates, dead letters, batch summary) are in the batch's
    transaction, not in the emitter's queue: a `kill -9` right after the outputs are committed
    loses none of them. The emitter's periodic flush is pushed out of reach (10 min), so an event
    that went through the queue instead of the transaction never reaches the topic."""
    raw, norm, audit = (
        service_env["DATA_PROC_TOPICS__RAW"],
        service_env["DATA_PROC_TOPICS__NORMALIZED"],
        service_env["DATA_PROC_AUDIT_KAFKA_TOPIC"],
    )
    first, second = build_stream(time.time_ns())
    stream = first + second
    coords = produce(kafka_bootstrap, raw, stream)
    service = Service({**service_env, "DATA_PROC_AUDIT_FLUSH_INTERVAL_MS": "600000"}, tmp_path)
    try:
        service.start()
        expected_out = sum(1 for s in stream if s.expect == "out")
        wait_for(lambda: len(consume_all([norm], timeout=30)) >= expected_out, 120, "all outputs", service)
        # every input is committed (its outputs are visible): kill before any periodic audit flush
        service.kill9()
    finally:
        service.stop_quietly()

    events = [json.loads(rec.value or b"") for rec in consume_all([audit], timeout=30)]
    dropped = sorted((e["source_partition"], e["offset_from"]) for e in events
                     if e["event_type"] == "duplicate_dropped")
    assert dropped == sorted(coords[i] for i, s in enumerate(stream) if s.expect == "dup")
    dead = sorted((e["source_partition"], e["offset_from"]) for e in events
                  if e["event_type"] == "dead_letter")
    assert dead == sorted(coords[i] for i, s in enumerate(stream) if s.expect not in ("out", "dup"))
    covered: Counter[tuple[int, int]] = Counter()
    for e in events:
        if e["event_type"] == "batch_committed":
            covered.update((e["source_partition"], o) for o in range(e["offset_from"], e["offset_to"] + 1))
    assert covered == Counter(coords), "every raw offset in exactly one committed batch summary"
