from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import pytest
from dataproc_shared.config import TopicOptions
from dataproc_shared.deadletter import (
    FRAMING_BYTES,
    REASON_HEADER,
    TRUNCATED_HEADER,
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


def _big(size: int, key: bytes | None = b"XNYM:CLZ6") -> DeadLetter:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    source = InRecord(topic="raw", partition=0, offset=7, key=key, value=payload, timestamp_ms=0,
                      headers=((CORRELATION_HEADER, b"c-9"),))
    return DeadLetter(source, DeadLetterReason.NOT_JSON, "not JSON")


def test_a_one_megabyte_record_fits_the_default_limit_whole() -> None:
    limit = TopicOptions().deadletter_message_limit
    dl = _big(1_048_588 - 100)
    rec = dead_letter_record(dl, service="s", failed_at=WHEN, max_bytes=limit)
    assert TRUNCATED_HEADER not in dict(rec.headers)
    assert decode_dead_letter(rec.value or b"")["payload"] == dl.source.value
    assert len(rec.value or b"") < limit - limit // 64 - FRAMING_BYTES


@pytest.mark.parametrize("limit", [20_000, 300_000, 1_463_656])
def test_a_dead_letter_above_the_limit_keeps_a_prefix_and_says_so(limit: int) -> None:
    dl = _big(3_000_000)
    rec = dead_letter_record(dl, service="s", failed_at=WHEN, max_bytes=limit)
    headers = dict(rec.headers)
    size = len(rec.key or b"") + len(rec.value or b"") + sum(len(n) + len(v) for n, v in rec.headers)
    assert size <= limit - limit // 64 - FRAMING_BYTES
    assert size > limit * 0.9  # as much of the payload as fits
    assert headers[TRUNCATED_HEADER] == b"3000000"
    assert headers[REASON_HEADER] == b"not_json"
    doc = decode_dead_letter(rec.value or b"")
    assert set(doc) - {"payload"} == {"service", "reason", "detail", "source_topic", "source_partition",
                                      "source_offset", "source_key", "payload_b64", "failed_at"}
    kept = len(doc["payload"])
    assert 0 < kept < 3_000_000
    assert doc["payload"] == (dl.source.value or b"")[:kept]
    assert doc["detail"] == f"not JSON [payload truncated: {kept} of 3000000 bytes kept]"
    assert (doc["reason"], doc["source_offset"], doc["source_key"]) == ("not_json", 7, "XNYM:CLZ6")


def test_a_huge_key_is_cut_too() -> None:
    dl = _big(500_000, key=b"K" * 400_000)
    rec = dead_letter_record(dl, service="s", failed_at=WHEN, max_bytes=100_000)
    size = len(rec.key or b"") + len(rec.value or b"") + sum(len(n) + len(v) for n, v in rec.headers)
    assert size <= 100_000
    doc = decode_dead_letter(rec.value or b"")
    assert doc["source_key"] == "K" * 1024
    assert rec.key == b"K" * 1024
    assert len(doc["payload"]) > 50_000


def test_without_a_limit_or_below_it_nothing_changes() -> None:
    dl = _big(10_000)
    assert dead_letter_record(dl, service="s", failed_at=WHEN) == dead_letter_record(
        dl, service="s", failed_at=WHEN, max_bytes=1_000_000)
