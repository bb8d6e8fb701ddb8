"""The contract's dead-letter message: one producer path for every service.

A `DeadLetter` (a record plus a reason code and a detail) becomes a JSON object on the dead-letter
topic (`deadletter.market.v1`), keyed by the source key, with the original bytes base64-encoded and
untouched:

    {"service", "reason", "detail", "source_topic", "source_partition", "source_offset",
     "source_key", "payload_b64", "failed_at"}

The Kafka loop produces these inside the batch's transaction, counts them and emits one audit event
for each (`dead_letter_audit_event`).

Size: the dead-letter topic's limit is derived from the raw topic's, so the dead letter of any raw
record the raw topic accepts carries its payload whole. Only when a dead letter would still exceed
the limit it is given (`max_bytes`: the producer's and the topic's limit, e.g. behind an operator's
larger raw topic) is the payload cut: `payload_b64` then holds the first bytes of the payload, the
`detail` ends with `[payload truncated: N of M bytes kept]` and the header `dp-payload-truncated`
holds M, the original payload size. A dead letter is never refused for its size: a record that
cannot be dead-lettered would stall its partition.
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
#: Header of a dead letter whose payload was truncated: the original payload size in bytes (ASCII).
TRUNCATED_HEADER = "dp-payload-truncated"
#: Bytes of a size limit kept free for the record and batch framing and for compression that does
#: not shrink (base64 of random bytes under lz4), besides 1/64 of the limit.
FRAMING_BYTES = 1024
#: Longest `source_key` (characters) kept in a dead letter that has to be cut to fit.
MAX_TRUNCATED_KEY_CHARS = 1024

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
    max_bytes: int | None = None,
) -> OutRecord:
    """The message to produce for `dead_letter`: key = source key, value = contract JSON.

    The correlation and ingest-time headers of the source record travel along, so a dead letter can
    be traced back like any other message. `max_bytes` is the message size limit of the producer and
    the dead-letter topic; a dead letter that would exceed it has its payload truncated (module
    docstring).
    """
    doc = dead_letter_document(dead_letter, service=service, failed_at=failed_at)
    headers = [(name, value) for name, value in dead_letter.source.headers if name in _COPIED_HEADERS]
    headers.append((REASON_HEADER, doc["reason"].encode()))
    key = dead_letter.source.key
    value = orjson.dumps(doc)
    if max_bytes is not None:
        budget = max_bytes - max_bytes // 64 - FRAMING_BYTES
        if _size(key, value, headers) > budget:
            key, value, headers = _fit(dead_letter, doc, key, headers, budget)
    return OutRecord(topic=topic, key=key, value=value, headers=tuple(headers))


def _size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """What librdkafka counts against `message.max.bytes`: key, value and headers."""
    return len(key or b"") + len(value) + sum(len(n) + len(v) for n, v in headers)


def _fit(
    dead_letter: DeadLetter, doc: dict[str, Any], key: bytes | None, headers: list[tuple[str, bytes]],
    budget: int,
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """Cut the payload (and, if that is not enough, key and detail) so the dead letter fits `budget`."""
    payload = dead_letter.source.value or b""
    headers = [(n, v[:MAX_TRUNCATED_KEY_CHARS]) for n, v in headers]
    headers.append((TRUNCATED_HEADER, str(len(payload)).encode()))
    if key is not None and len(key) > MAX_TRUNCATED_KEY_CHARS:
        key = key[:MAX_TRUNCATED_KEY_CHARS]
    doc = dict(doc)
    for detail_chars, key_chars in ((MAX_DETAIL_CHARS, None), (200, MAX_TRUNCATED_KEY_CHARS)):
        if key_chars is not None and doc["source_key"] is not None:
            doc["source_key"] = doc["source_key"][:key_chars]
        # The note's numbers have at most as many digits as the payload size.
        note = f" [payload truncated: {len(payload)} of {len(payload)} bytes kept]"
        doc["detail"] = dead_letter.detail[:detail_chars]
        doc["payload_b64"] = ""
        base = _size(key, orjson.dumps({**doc, "detail": doc["detail"] + note}), headers)
        room = budget - base
        if room >= 0:
            kept = room // 4 * 3
            doc["detail"] += f" [payload truncated: {kept} of {len(payload)} bytes kept]"
            doc["payload_b64"] = base64.b64encode(payload[:kept]).decode("ascii")
            return key, orjson.dumps(doc), headers
    # Not even an empty payload fits (a limit below a few kB): keep the reason and the coordinates.
    doc["detail"] = f"[payload truncated: 0 of {len(payload)} bytes kept]"
    doc["source_key"] = None
    return None, orjson.dumps(doc), headers


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
