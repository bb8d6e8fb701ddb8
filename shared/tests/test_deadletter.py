from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
from dataproc_shared.deadletter import (
    REASON_HEADER,
    dead_letter_audit_event,
    dead_letter_document,
    dead_letter_record,
    decode_dead_letter,
)
from dataproc_shared.records import CORRELATION_HEADER, DeadLetter, DeadLetterReason, InRecord

RAW = b"\xff\xfe not utf-8 {"
SOURCE = InRecord(topic="ingestion.market.raw.v1", partition=4, offset=1234, key=b"XNYM:CLZ6", value=RAW,
                  timestamp_ms=1_700_000_000_000,
                  headers=((CORRELATION_HEADER, b"c-1"), ("other", b"x")))
WHEN = datetime(2026, 11, 23, 14, 30, 0, 123456, tzinfo=UTC)


def test_document_has_exactly_the_contract_fields() -> None:
    doc = dead_letter_document(DeadLetter(SOURCE, DeadLetterReason.NOT_UTF8, "bad byte at 0"),
                               service="normalization", failed_at=WHEN)
    assert doc == {
        "service": "normalization",
        "reason": "not_utf8",
        "detail": "bad byte at 0",
        "source_topic": "ingestion.market.raw.v1",
        "source_partition": 4,
        "source_offset": 1234,
        "source_key": "XNYM:CLZ6",
        "payload_b64": base64.b64encode(RAW).decode(),
        "failed_at": "2026-11-23T14:30:00.123456Z",
    }


def test_record_keeps_bytes_key_and_tracing_headers() -> None:
    rec = dead_letter_record(DeadLetter(SOURCE, DeadLetterReason.NOT_JSON, "x"), service="s",
                             failed_at=WHEN, topic="dlq")
    assert rec.topic == "dlq"
    assert rec.key == b"XNYM:CLZ6"
    assert rec.partition is None
    assert dict(rec.headers) == {CORRELATION_HEADER: b"c-1", REASON_HEADER: b"not_json"}
    decoded = decode_dead_letter(rec.value or b"")
    assert decoded["payload"] == RAW
    assert orjson.loads(rec.value or b"")["reason"] == "not_json"


def test_missing_key_and_value() -> None:
    src = InRecord(topic="t", partition=0, offset=0, key=None, value=None, timestamp_ms=0)
    doc = dead_letter_document(DeadLetter(src, DeadLetterReason.UNDECODABLE, "x" * 5000), service="s",
                               failed_at=WHEN)
    assert doc["source_key"] is None
    assert doc["payload_b64"] == ""
    assert len(doc["detail"]) == 2000


def test_audit_event_of_a_dead_letter() -> None:
    event = dead_letter_audit_event(DeadLetter(SOURCE, DeadLetterReason.LATE_TRADE, "window closed"))
    assert (event.event_type, event.outcome, event.reason) == ("dead_letter", "rejected", "late_trade")
    assert (event.source_partition, event.offset_from, event.offset_to) == (4, 1234, 1234)
    assert event.correlation_id == "c-1"
    assert event.instrument == "XNYM:CLZ6"
