"""Audit events through the real broker into an embedded ClickHouse `audit_events` table."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
from dataproc_shared.audit import AuditEmitter, AuditLoader, ClickHouseAuditSink, KafkaAuditSink
from dataproc_shared.clickhouse import ChdbClickHouse
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import AuditEvent, InRecord
from dataproc_shared.testing import unique_name

from .test_loop_integration import App, produce_inputs, topics, wait_for

pytestmark = pytest.mark.integration


def load_all(client: ChdbClickHouse, bootstrap: str, topic: str, expected: int) -> AuditLoader:
    loader = AuditLoader(client=client, topic=topic,
                         consumer_config={"bootstrap.servers": bootstrap, "group.id": unique_name("loader")})
    try:
        deadline = time.monotonic() + 60
        while loader.loaded < expected and time.monotonic() < deadline:
            loader.load_once()
    finally:
        loader.close()
    return loader


def test_service_audit_events_reach_kafka_and_clickhouse_through_the_loader(
    topic_factory: Callable[..., str], kafka_bootstrap: str, tmp_path: Path,
    consume_all: Callable[..., list[InRecord]], chdb_client: ChdbClickHouse,
) -> None:
    env = topics(topic_factory, partitions=2)
    audit_topic = topic_factory("audit", 2)
    env.update({"DATA_PROC_AUDIT_ENABLED": "true", "DATA_PROC_AUDIT_SINKS": "kafka",
                "DATA_PROC_AUDIT_KAFKA_TOPIC": audit_topic, "DATA_PROC_AUDIT_FLUSH_INTERVAL_MS": "100",
                "DATA_PROC_LOOP__BATCH_SIZE": "20"})
    values = [b"m%d" % i for i in range(60)]
    values[7] = b"POISON"
    produce_inputs(kafka_bootstrap, env["APP_INPUT"], values)
    app = App(kafka_bootstrap, env, tmp_path)
    try:
        app.start()
        wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) >= 59, 60, "outputs")
        assert app.terminate() == 0, app.log()
    finally:
        app.stop_quietly()

    raw_events = consume_all([audit_topic], timeout=30)
    events = [orjson.loads(r.value or b"") for r in raw_events]
    kinds = Counter(e["event_type"] for e in events)
    assert {"config_loaded", "start", "rebalance", "batch_committed", "dead_letter", "stop"} <= set(kinds)
    assert kinds["dead_letter"] == 1
    assert sum(e["details"]["in"] for e in events if e["event_type"] == "batch_committed") == 60
    assert all(e["service"] == "loopapp" for e in events)
    config = next(e for e in events if e["event_type"] == "config_loaded")["details"]["settings"]
    assert config["kafka_bootstrap"] == kafka_bootstrap
    for secret_env in ("DATA_PROC_POSTGRES_DSN", "DATA_PROC_REDIS_URL"):
        secret = urlsplit(os.environ.get(secret_env, "")).password
        if secret:
            assert all(secret.encode() not in (r.value or b"") for r in raw_events)

    load_all(chdb_client, kafka_bootstrap, audit_topic, len(events))
    query = "SELECT event_type, count() FROM market_data.audit_events FINAL GROUP BY event_type"
    assert dict(chdb_client.query(query).rows) == dict(kinds)
    dead = chdb_client.query(
        "SELECT reason, source_topic, offset_from FROM market_data.audit_events "
        "WHERE event_type = 'dead_letter'"
    ).rows
    assert dead == ((("bad_field", env["APP_INPUT"], dead[0][2]),))
    # A second loader (new group: the whole topic again) adds nothing under FINAL.
    load_all(chdb_client, kafka_bootstrap, audit_topic, len(events))
    assert dict(chdb_client.query(query).rows) == dict(kinds)


async def test_emitter_writes_to_clickhouse_directly(chdb_client: ChdbClickHouse) -> None:
    metrics = ServiceMetrics("svc")
    emitter = AuditEmitter(service="svc", environment="local", sinks=[ClickHouseAuditSink(chdb_client)],
                           metrics=metrics, flush_interval_ms=50)
    async with emitter:
        emitter.emit(AuditEvent(event_type="start", details={"k": "v"}))
        emitter.emit(AuditEvent(event_type="batch_committed", source_topic="t", source_partition=1,
                                offset_from=10, offset_to=19))
    rows = chdb_client.query(
        "SELECT event_type, service, environment, source_partition, offset_to, details "
        "FROM market_data.audit_events ORDER BY event_type"
    ).rows
    assert rows == (("batch_committed", "svc", "local", 1, 19, "{}"),
                    ("start", "svc", "local", -1, -1, '{"k":"v"}'))
    written = metrics.registry.get_sample_value("dp_audit_written_total",
                                                {"service": "svc", "sink": "clickhouse"})
    assert written == 2


async def test_kafka_sink_never_produces_an_event_twice_when_the_flush_times_out(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
) -> None:
    """A flush that returns with rows still in flight (a broker that is slow or restarting) must not
    make the emitter hand the same rows over again: the client delivers them itself, and a second
    hand-over would put a second copy with the same `event_id` on the topic (finding 5)."""
    topic = topic_factory("audit", 1)
    sink = KafkaAuditSink({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True}, topic, "svc",
                          flush_timeout_s=0.0)
    emitter = AuditEmitter(service="svc", environment="local", sinks=[sink], kafka_topic=topic)
    for i in range(50):
        emitter.emit(AuditEvent(event_type="batch_committed", offset_from=i, offset_to=i))
    for _ in range(3):
        await emitter.flush()
    sink.close()
    records = consume_all([topic], timeout=30)
    ids = Counter(orjson.loads(r.value or b"")["event_id"] for r in records)
    assert len(records) == 50, ids.most_common(3)
    assert len(ids) == 50
    assert sorted(orjson.loads(r.value or b"")["offset_from"] for r in records) == list(range(50))


async def test_kafka_sink_keeps_rows_whose_delivery_failed_for_the_next_write() -> None:
    """Rows the client reports as failed (no broker: message timeout) are produced again later."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    sink = KafkaAuditSink({"bootstrap.servers": f"127.0.0.1:{port}", "message.timeout.ms": 300,
                           "log_level": 0}, "audit", "svc", flush_timeout_s=5.0)
    emitter = AuditEmitter(service="svc", environment="local", sinks=[sink], kafka_topic="audit")
    for i in range(5):
        emitter.emit(AuditEvent(event_type="batch_committed", offset_from=i, offset_to=i))
    await emitter.flush()
    assert sink.pending == 5
    await emitter.flush()  # nothing new queued: the failed rows are tried again all the same
    assert sink.pending == 5
    sink.close()


async def test_kafka_sink_counts_the_rows_it_drops_when_its_retry_buffer_is_full() -> None:
    """Failed rows beyond `max_pending` are dropped, oldest first, and counted as a metric."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    metrics = ServiceMetrics("svc")
    sink = KafkaAuditSink({"bootstrap.servers": f"127.0.0.1:{port}", "message.timeout.ms": 300,
                           "log_level": 0}, "audit", "svc", flush_timeout_s=5.0, max_pending=3,
                          metrics=metrics)
    emitter = AuditEmitter(service="svc", environment="local", sinks=[sink], kafka_topic="audit")
    for i in range(5):
        emitter.emit(AuditEvent(event_type="batch_committed", offset_from=i, offset_to=i))
    await emitter.flush()
    assert (sink.pending, sink.dropped) == (3, 2)
    labels = {"service": "svc", "sink": "kafka"}
    assert metrics.registry.get_sample_value("dp_audit_sink_dropped_total", labels) == 2
    emitter.emit(AuditEvent(event_type="batch_committed", offset_from=5, offset_to=5))
    await emitter.flush()  # 3 kept + 1 new fail again: 1 more dropped
    assert (sink.pending, sink.dropped) == (3, 3)
    assert metrics.registry.get_sample_value("dp_audit_sink_dropped_total", labels) == 3
    sink.close()
