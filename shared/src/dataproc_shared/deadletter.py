"""The contract's dead-letter message: one producer path for every service.

A `DeadLetter` (a record plus a reason code and a detail) becomes a JSON object on the dead-letter
topic (`deadletter.market.v1`), keyed by the source key, with the original bytes base64-encoded and
untouched:

    {"service", "reason", "detail", "source_topic", "source_partition", "source_offset",
     "source_key", "payload_b64", "failed_at"}

The Kafka loop produces these inside the batch's transaction, counts them and emits one audit event
for each (`dead_letter_audit_event`).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson

from dataproc_shared.records import (
    CORRELATION_HEADER,
    INGEST_TIME_HEADER,
    AuditEvent,
    DeadLetter,
    DeadLetterReason,
    OutRecord,
)

#: Default dead-letter topic of the contract.
DEADLETTER_TOPIC = "deadletter.market.v1"
#: Header naming the reason code on a dead-letter message (the JSON body carries it too).
REASON_HEADER = "dp-dead-letter-reason"
#: Longest `detail` kept; a transform's error text is truncated beyond this.
MAX_DETAIL_CHARS = 2000

_COPIED_HEADERS = (CORRELATION_HEADER, INGEST_TIME_HEADER)


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC timestamp with microseconds and a `Z` suffix."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dead_letter_document(dead_letter: DeadLetter, *, service: str, failed_at: datetime) -> dict[str, Any]:
    """The contract's JSON object for `dead_letter` (as a dict, before serialisation)."""
    source = dead_letter.source
    payload = source.value if source.value is not None else b""
    return {
        "service": service,
        "reason": DeadLetterReason(dead_letter.reason).value,
        "detail": dead_letter.detail[:MAX_DETAIL_CHARS],
        "source_topic": source.topic,
        "source_partition": source.partition,
        "source_offset": source.offset,
        "source_key": None if source.key is None else source.key.decode("utf-8", errors="replace"),
        "payload_b64": base64.b64encode(payload).decode("ascii"),
        "failed_at": format_timestamp(failed_at),
    }


def dead_letter_record(
    dead_letter: DeadLetter,
    *,
    service: str,
    failed_at: datetime,
    topic: str = DEADLETTER_TOPIC,
) -> OutRecord:
    """The message to produce for `dead_letter`: key = source key, value = contract JSON.

    The correlation and ingest-time headers of the source record travel along, so a dead letter can
    be traced back like any other message.
    """
    doc = dead_letter_document(dead_letter, service=service, failed_at=failed_at)
    headers = [(name, value) for name, value in dead_letter.source.headers if name in _COPIED_HEADERS]
    headers.append((REASON_HEADER, doc["reason"].encode()))
    return OutRecord(topic=topic, key=dead_letter.source.key, value=orjson.dumps(doc), headers=tuple(headers))


def dead_letter_audit_event(dead_letter: DeadLetter) -> AuditEvent:
    """The audit event emitted for each dead letter (no payload: audit rows stay small)."""
    source = dead_letter.source
    correlation = source.header(CORRELATION_HEADER)
    return AuditEvent(
        event_type="dead_letter",
        outcome="rejected",
        reason=DeadLetterReason(dead_letter.reason).value,
        instrument="" if source.key is None else source.key.decode("utf-8", errors="replace"),
        correlation_id="" if correlation is None else correlation.decode("utf-8", errors="replace"),
        source_topic=source.topic,
        source_partition=source.partition,
        offset_from=source.offset,
        offset_to=source.offset,
        details={"detail": dead_letter.detail[:MAX_DETAIL_CHARS]},
    )


def decode_dead_letter(value: bytes) -> dict[str, Any]:
    """Parse a dead-letter message value (for tools and tests); `payload` holds the original bytes."""
    doc: dict[str, Any] = orjson.loads(value)
    doc["payload"] = base64.b64decode(doc["payload_b64"])
    return doc
