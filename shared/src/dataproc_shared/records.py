"""The records a service's transform sees and returns.

These types are the whole interface between a service's pure transform and the Kafka loop
(`dataproc_shared.kafka.loop`): the loop hands a batch of `InRecord`s to the service's `Processor`
and gets back a `BatchResult`, which it produces, dead-letters and commits under the configured
processing guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Headers = tuple[tuple[str, bytes], ...]

#: Kafka header that carries the correlation id of a record across services.
CORRELATION_HEADER = "dp-correlation-id"
#: Kafka header with the ingest time (ns since the epoch) of the raw record a message descends from.
INGEST_TIME_HEADER = "dp-ingest-ns"


@dataclass(frozen=True, slots=True)
class InRecord:
    """One consumed Kafka message, with its coordinates."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: Headers = ()

    def header(self, name: str) -> bytes | None:
        """Value of the first header called `name`, if any."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class OutRecord:
    """One message to produce. `partition=None` lets the loop pick the partition from the key.

    `source` (optional) is the input record this output derives from: the loop copies its
    correlation and ingest-time headers when `headers` lacks them. Without it the loop matches
    outputs to inputs of the same key in the batch.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: Headers = ()
    source: InRecord | None = field(default=None, compare=False, repr=False)


class DeadLetterReason(StrEnum):
    """Reason codes of the dead-letter topic. Values are part of the external contract."""

    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"
    BAD_NUMBER = "bad_number"
    NON_FINITE = "non_finite"
    BAD_TIMESTAMP = "bad_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"
    BAD_SIZE = "bad_size"
    CROSSED_QUOTE = "crossed_quote"
    EMPTY_QUOTE = "empty_quote"
    BAD_FIELD = "bad_field"
    UNDECODABLE = "undecodable"
    UNKNOWN_INSTRUMENT = "unknown_instrument"
    INACTIVE_INSTRUMENT = "inactive_instrument"
    LATE_TRADE = "late_trade"
    PROCESSING_ERROR = "processing_error"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot be processed, with why. The loop turns it into the contract's JSON."""

    source: InRecord
    reason: DeadLetterReason
    detail: str


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit event. `service`, `environment` and `event_time` are filled in by the emitter."""

    event_type: str
    outcome: str = "ok"
    reason: str = ""
    instrument: str = ""
    correlation_id: str = ""
    source_topic: str = ""
    source_partition: int = -1
    offset_from: int = -1
    offset_to: int = -1
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BatchResult:
    """What a transform returns for one batch (or one idle tick).

    `outputs` are produced in order; `dead_letters` go to the dead-letter topic; `audit` events to the
    audit emitter; `deduplicated` counts records dropped as duplicates (for metrics and accounting).
    All of it is committed atomically with the input offsets in exactly-once mode.

    `event_time_ns` (optional) is the event time (epoch ns) each input (topic, partition) reached
    with this batch (its last record's). A processor that fills it opts into the loop's event-time
    alignment of input partitions (`docs/runtime.md`); it is a scheduling hint, never committed.
    """

    outputs: list[OutRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    deduplicated: int = 0
    event_time_ns: dict[tuple[str, int], int] = field(default_factory=dict)

    def extend(self, other: BatchResult) -> None:
        """Append everything of `other` to this result (`other`'s event times are the later ones)."""
        self.outputs.extend(other.outputs)
        self.dead_letters.extend(other.dead_letters)
        self.audit.extend(other.audit)
        self.deduplicated += other.deduplicated
        if other.event_time_ns:
            self.event_time_ns.update(other.event_time_ns)
