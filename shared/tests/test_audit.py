from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import pytest
from dataproc_shared.audit import AUDIT_COLUMNS, AuditEmitter, AuditRow, audit_json, json_to_row
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import AuditEvent

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class MemorySink:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.rows: list[AuditRow] = []

    async def write(self, rows: Sequence[AuditRow]) -> None:
        if self.fail:
            raise ConnectionError("sink down")
        self.rows.extend(rows)


def emitter(*sinks: MemorySink, queue_size: int = 10, metrics: ServiceMetrics | None = None,
            enabled: bool = True) -> AuditEmitter:
    return AuditEmitter(service="svc", environment="local", sinks=sinks, metrics=metrics,
                        queue_size=queue_size, enabled=enabled, kafka_topic="audit", clock=lambda: NOW)


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"service": "svc", **labels})
    return 0.0 if value is None else value


async def test_full_queue_drops_and_counts_without_blocking() -> None:
    metrics = ServiceMetrics("svc")
    sink = MemorySink("clickhouse")
    em = emitter(sink, queue_size=3, metrics=metrics)
    for i in range(5):
        em.emit(AuditEvent(event_type=f"e{i}"))
    assert em.dropped == 2
    assert sample(metrics, "dp_audit_dropped_total") == 2
    assert sample(metrics, "dp_audit_queue_depth") == 3
    await em.flush()
    assert [r.event.event_type for r in sink.rows] == ["e0", "e1", "e2"]
    assert sample(metrics, "dp_audit_written_total", sink="clickhouse") == 3
    assert sample(metrics, "dp_audit_queue_depth") == 0


async def test_failed_sink_keeps_rows_for_next_flush_other_sink_unaffected() -> None:
    good, bad = MemorySink("clickhouse"), MemorySink("kafka", fail=True)
    em = emitter(good, bad)
    em.emit(AuditEvent(event_type="a"))
    await em.flush()
    assert len(good.rows) == 1
    assert bad.rows == []
    bad.fail = False
    em.emit(AuditEvent(event_type="b"))
    await em.flush()
    assert [r.event.event_type for r in bad.rows] == ["a", "b"]
    assert [r.event.event_type for r in good.rows] == ["a", "b"]


async def test_skip_kafka_events_reach_only_other_sinks() -> None:
    ch, kafka = MemorySink("clickhouse"), MemorySink("kafka")
    em = emitter(ch, kafka)
    em.emit(AuditEvent(event_type="in-txn"), skip_kafka=True)
    await em.flush()
    assert len(ch.rows) == 1
    assert kafka.rows == []


async def test_disabled_emitter_emits_nothing() -> None:
    sink = MemorySink("kafka")
    em = emitter(sink, enabled=False)
    em.emit(AuditEvent(event_type="x"))
    assert em.kafka_records([AuditEvent(event_type="x")]) == []
    await em.flush()
    assert sink.rows == []


def test_kafka_records_and_row_round_trip() -> None:
    em = emitter(MemorySink("kafka"))
    event = AuditEvent(event_type="batch_committed", source_topic="t", source_partition=2, offset_from=5,
                       offset_to=9, details={"in": 5})
    (record,) = em.kafka_records([event])
    assert record.topic == "audit"
    assert record.key == b"svc"
    doc = orjson.loads(record.value or b"")
    assert set(doc) == set(AUDIT_COLUMNS)
    row = dict(zip(AUDIT_COLUMNS, json_to_row(doc), strict=True))
    assert row["event_time"] == NOW
    assert (row["service"], row["event_type"], row["source_partition"], row["offset_to"]) == (
        "svc", "batch_committed", 2, 9)
    assert orjson.loads(row["details"]) == {"in": 5}
    assert row["event_id"] == doc["event_id"] != ""


def test_kafka_records_are_the_rows_json_with_fresh_version_4_ids() -> None:
    em = emitter(MemorySink("kafka"))
    events = [AuditEvent(event_type="batch_committed", outcome="ok", reason="r", instrument="X:Y",
                         correlation_id="c", source_topic="t", source_partition=p, offset_from=p * 10,
                         offset_to=p * 10 + 9, details={"in": p, "nested": {"a": [1, 2]}}) for p in range(50)]
    records = em.kafka_records(events)
    docs = [orjson.loads(r.value or b"") for r in records]
    for doc, event in zip(docs, events, strict=True):
        expected = AuditRow(doc["event_id"], NOW, "svc", em.environment, event).as_json()
        assert list(doc) == list(expected)  # same keys in the same order
        assert doc == expected
        parsed = uuid.UUID(doc["event_id"])
        assert (parsed.version, str(parsed)) == (4, doc["event_id"])
    assert len({d["event_id"] for d in docs}) == len(docs)
    assert em.kafka_records([]) == []


def test_the_audit_json_has_the_columns_in_order_and_every_event_field() -> None:
    event = AuditEvent(event_type="t")
    doc = audit_json(event, "id", "2026-11-23T12:00:00.000000Z", "svc", "local")
    assert tuple(doc) == AUDIT_COLUMNS
    assert {f.name for f in dataclasses.fields(AuditEvent)} <= set(doc)
    row = AuditRow("id", NOW, "svc", "local", event)
    assert row.as_json() == doc


def test_row_without_event_id_takes_the_default() -> None:
    row = json_to_row({"event_time": "2026-11-23T12:00:00.000000Z", "service": "x"}, "topic:1:7")
    assert row[0] == "topic:1:7"


@pytest.mark.parametrize("toggle", ["false", "0"])
def test_per_service_toggle(monkeypatch: pytest.MonkeyPatch, toggle: str) -> None:
    from dataproc_shared.config import load_settings

    monkeypatch.setenv("DATA_PROC_NORMALIZATION_AUDIT_ENABLED", toggle)
    assert not load_settings(service="normalization").audit_enabled_for()
    assert load_settings(service="enrichment").audit_enabled_for()
