"""Audit events: a bounded, never-blocking emitter with ClickHouse and Kafka sinks, and the loader.

`AuditEmitter.emit` puts an event on a bounded queue and returns at once; a full queue drops the
event and counts it (`dp_audit_dropped_total`). A background task flushes the queue every
`audit_flush_interval_ms` to the enabled sinks:

- `ClickHouseAuditSink` inserts rows into `market_data.audit_events` (a ClickHouse server, or the
  embedded engine in the process that owns it);
- `KafkaAuditSink` produces the event JSON to `audit.events.v1` (key = service name).

The Kafka loop puts the audit events of a batch (batch summary, dead letters, the processor's own)
into the batch's Kafka transaction itself (`AuditEmitter.kafka_records`) and hands them to the
emitter with `skip_kafka=True` after the commit, so the other sinks see only committed batches.

Embedded ClickHouse can be opened by one process only. Services that do not own it send to Kafka
only; the owner (aggregation) runs `AuditLoader`, which consumes `audit.events.v1` into
`audit_events` idempotently: each insert carries a dedup token built from the topic, partition and
offset ranges of its rows, and offsets are committed only after the insert.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from dataproc_shared.clickhouse import ClickHouseClient
from dataproc_shared.deadletter import format_timestamp
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import AuditEvent, OutRecord

log = structlog.get_logger(__name__)

#: ClickHouse table of audit events (migration `006_audit_events.sql`).
AUDIT_TABLE = "market_data.audit_events"
#: Columns written to `audit_events`, in order; also the keys of the Kafka JSON event.
AUDIT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "event_time",
    "service",
    "event_type",
    "environment",
    "correlation_id",
    "instrument",
    "source_topic",
    "source_partition",
    "offset_from",
    "offset_to",
    "outcome",
    "reason",
    "details",
)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One audit event with the emitter's fields filled in, ready for any sink."""

    event_id: str
    event_time: datetime
    service: str
    environment: str
    event: AuditEvent

    def as_json(self) -> dict[str, Any]:
        """The event as the Kafka topic's JSON object (keys = `AUDIT_COLUMNS`)."""
        return audit_json(self.event, self.event_id, format_timestamp(self.event_time), self.service,
                          self.environment)


def audit_json(event: AuditEvent, event_id: str, event_time: str, service: str,
               environment: str) -> dict[str, Any]:
    """The audit topic's JSON object of `event` (keys = `AUDIT_COLUMNS`, in order).

    `event_time` is already formatted (`format_timestamp`), so that a caller writing many events
    with one time formats it once. The one place that lays the event out: `AuditRow.as_json` (the
    sinks) and `AuditEmitter.kafka_records` (the loop's transaction) both use it.
    """
    return {
        "event_id": event_id,
        "event_time": event_time,
        "service": service,
        "event_type": event.event_type,
        "environment": environment,
        "correlation_id": event.correlation_id,
        "instrument": event.instrument,
        "source_topic": event.source_topic,
        "source_partition": event.source_partition,
        "offset_from": event.offset_from,
        "offset_to": event.offset_to,
        "outcome": event.outcome,
        "reason": event.reason,
        "details": event.details,
    }

def json_to_row(doc: Mapping[str, Any], default_event_id: str = "") -> tuple[Any, ...]:
    """A Kafka audit JSON object as an `audit_events` row (columns `AUDIT_COLUMNS`).

    `default_event_id` (the loader passes `<topic>:<partition>:<offset>`) is used when the event
    carries no `event_id`.
    """
    event_time = datetime.fromisoformat(str(doc["event_time"]).replace("Z", "+00:00"))
    details = doc.get("details", {})
    return (
        str(doc.get("event_id") or default_event_id),
        event_time,
        str(doc.get("service", "")),
        str(doc.get("event_type", "")),
        str(doc.get("environment", "")),
        str(doc.get("correlation_id", "")),
        str(doc.get("instrument", "")),
        str(doc.get("source_topic", "")),
        int(doc.get("source_partition", -1)),
        int(doc.get("offset_from", -1)),
        int(doc.get("offset_to", -1)),
        str(doc.get("outcome", "")),
        str(doc.get("reason", "")),
        details if isinstance(details, str) else orjson.dumps(details).decode(),
    )


class AuditSink(Protocol):
    """Where flushed audit events go."""

    name: str

    async def write(self, rows: Sequence[AuditRow]) -> None:
        """Write `rows`; raise on failure (the emitter keeps them for the next flush)."""


class ClickHouseAuditSink:
    """Inserts audit rows into `audit_events` through the shared ClickHouse client."""

    name = "clickhouse"

    def __init__(self, client: ClickHouseClient, table: str = AUDIT_TABLE) -> None:
        self._client = client
        self._table = table

    async def write(self, rows: Sequence[AuditRow]) -> None:
        """Insert `rows` in one statement."""
        values = [json_to_row(r.as_json()) for r in rows]
        await asyncio.to_thread(self._client.insert, self._table, values, AUDIT_COLUMNS)


class KafkaAuditSink:
    """Produces audit events to the audit topic with an idempotent (non-transactional) producer.

    Used for events outside any batch (lifecycle, rebalances, loader) and, in at-least-once mode,
    for every event.

    Each row is handed to the client once. `write` waits up to `flush_timeout_s` for the
    deliveries; a row still in flight after that stays with the client, which keeps retrying it
    itself (idempotent producer, until `message.timeout.ms`): producing it again would put a second
    copy, with the same `event_id`, on the topic once the broker answers again. Only a row whose
    delivery the client reported as failed is produced again, with the next `write` (`pending`).
    `write` raises only when none of its rows could be handed to the client.
    """

    name = "kafka"

    def __init__(self, producer_config: Mapping[str, Any], topic: str, service: str, *,
                 flush_timeout_s: float = 10.0, max_pending: int = 10_000,
                 metrics: ServiceMetrics | None = None) -> None:
        """`max_pending` bounds the rows kept for a new attempt (the oldest are dropped and counted).

        Drops are counted in `dropped` and, with `metrics`, in `dp_audit_sink_dropped_total{sink="kafka"}`.
        """
        conf = {k: v for k, v in producer_config.items() if not k.startswith("transaction")}
        self._producer = Producer(conf)
        self._topic = topic
        self._key = service.encode()
        self._flush_timeout_s = flush_timeout_s
        self._max_pending = max_pending
        self._failed: list[AuditRow] = []
        self._metrics = metrics
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Rows whose delivery failed, produced again with the next `write`."""
        return len(self._failed)

    async def write(self, rows: Sequence[AuditRow]) -> None:
        """Produce the failed rows of earlier writes and `rows`; wait (bounded) for their delivery."""
        await asyncio.to_thread(self._write, rows)

    def _write(self, rows: Sequence[AuditRow]) -> None:
        batch = [*self._failed, *rows]
        self._failed = []
        for index, row in enumerate(batch):
            try:
                self._produce(row)
            except KafkaException as exc:
                if index == 0 and rows:
                    # nothing handed over: the caller keeps `rows`, this sink its own retries
                    self._keep(batch[:len(batch) - len(rows)])
                    raise
                self._keep(batch[index:])
                log.warning("audit produce failed", topic=self._topic, rows=len(batch) - index,
                            error=str(exc))
                break
        remaining = self._producer.flush(self._flush_timeout_s)
        if remaining or self._failed:
            log.warning("audit delivery incomplete", topic=self._topic, in_flight=remaining,
                        failed=len(self._failed))

    def _produce(self, row: AuditRow) -> None:
        def delivered(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                self._keep([row])

        while True:
            try:
                self._producer.produce(self._topic, orjson.dumps(row.as_json()), self._key,
                                       on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _keep(self, rows: Sequence[AuditRow]) -> None:
        self._failed.extend(rows)
        overflow = len(self._failed) - self._max_pending
        if overflow > 0:
            del self._failed[:overflow]
            self.dropped += overflow
            if self._metrics is not None:
                self._metrics.child(self._metrics.audit_sink_dropped, sink=self.name).inc(overflow)
            log.error("audit events dropped: delivery failed and the retry buffer is full",
                      topic=self._topic, dropped=overflow, max_pending=self._max_pending)

    def close(self) -> None:
        """Flush what is left."""
        self._producer.flush(5.0)


class AuditEmitter:
    """Bounded, non-blocking audit event queue flushed periodically to the enabled sinks."""

    def __init__(
        self,
        *,
        service: str,
        environment: str,
        sinks: Sequence[AuditSink],
        metrics: ServiceMetrics | None = None,
        queue_size: int = 10_000,
        flush_interval_ms: int = 1_000,
        enabled: bool = True,
        kafka_topic: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`kafka_topic` is the audit topic when Kafka is among the sinks (for `kafka_records`)."""
        self.service = service
        self.environment = environment
        self._sinks = list(sinks)
        self._metrics = metrics
        self._queue_size = queue_size
        self._flush_interval_s = flush_interval_ms / 1000
        self.enabled = enabled
        self._kafka_topic = kafka_topic if any(s.name == "kafka" for s in sinks) else None
        self._clock = clock
        self._queue: deque[tuple[AuditRow, bool]] = deque()
        # Rows that a sink failed to take, kept for the next flush (bounded by `queue_size`).
        self._retry: dict[str, list[AuditRow]] = {s.name: [] for s in self._sinks}
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def kafka_topic(self) -> str | None:
        """The audit topic when the Kafka sink is on, else None."""
        return self._kafka_topic if self.enabled else None

    def emit(self, event: AuditEvent, *, skip_kafka: bool = False) -> None:
        """Queue `event`; never blocks. A full queue drops it and counts the drop.

        `skip_kafka=True`: the event already went to the audit topic inside a Kafka transaction.
        """
        if not self.enabled or not self._sinks:
            return
        if skip_kafka and all(s.name == "kafka" for s in self._sinks):
            return
        if len(self._queue) >= self._queue_size:
            self._drop(1)
            return
        self._queue.append((self._row(event), skip_kafka))
        if self._metrics is not None:
            self._metrics.child(self._metrics.audit_queue_depth).set(len(self._queue))

    def kafka_records(self, events: Sequence[AuditEvent]) -> list[OutRecord]:
        """`events` as audit-topic messages, for the loop to put in its transaction.

        The same JSON as `AuditRow.as_json` (both from `audit_json`); the events of one call share
        one event time (the clock is read and formatted once: a cycle's events are written in one
        transaction).
        """
        topic = self.kafka_topic
        if topic is None or not events:
            return []
        key = self.service.encode()
        event_time = format_timestamp(self._clock())
        service, environment = self.service, self.environment
        ids = _uuid4_strings(len(events))
        dumps = orjson.dumps
        return [OutRecord(topic, key, dumps(audit_json(e, event_id, event_time, service, environment)))
                for event_id, e in zip(ids, events, strict=True)]

    def count_written(self, sink: str, count: int) -> None:
        """Record `count` events written to `sink` outside the emitter (the loop's transaction)."""
        if self._metrics is not None and count:
            self._metrics.child(self._metrics.audit_written, sink=sink).inc(count)

    def _row(self, event: AuditEvent) -> AuditRow:
        return AuditRow(event_id=str(uuid.uuid4()), event_time=self._clock(), service=self.service,
                        environment=self.environment, event=event)

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._metrics is not None:
            self._metrics.child(self._metrics.audit_dropped).inc(count)

    async def flush(self) -> None:
        """Write everything queued to every sink; a failing sink keeps its rows for the next flush."""
        batch = list(self._queue)
        self._queue.clear()
        if self._metrics is not None:
            self._metrics.child(self._metrics.audit_queue_depth).set(0)
        for sink in self._sinks:
            rows = self._retry[sink.name] + [r for r, skip in batch if not (skip and sink.name == "kafka")]
            if not rows and not getattr(sink, "pending", 0):
                continue
            try:
                await sink.write(rows)
            except Exception as exc:
                overflow = max(0, len(rows) - self._queue_size)
                if overflow:
                    self._drop(overflow)
                self._retry[sink.name] = rows[overflow:]
                log.warning("audit sink write failed", sink=sink.name, rows=len(rows), error=str(exc))
                continue
            self._retry[sink.name] = []
            if self._metrics is not None:
                self._metrics.child(self._metrics.audit_written, sink=sink.name).inc(len(rows))

    async def run(self) -> None:
        """Flush every `flush_interval_ms` until cancelled."""
        while True:
            await asyncio.sleep(self._flush_interval_s)
            await self.flush()

    async def __aenter__(self) -> AuditEmitter:
        self._task = asyncio.create_task(self.run(), name="audit-flush")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()


class AuditLoader:
    """Loads the audit topic into `audit_events` (run by the process that owns ClickHouse).

    Each insert holds the rows of one consumed batch and carries the dedup token
    `<topic>:<partition>:<first>-<last>[,<partition>:<first>-<last>...]` (the batch's offset range
    per partition, in partition order); offsets are committed after the insert. A replay of the same
    range after a crash between insert and commit is dropped by the engine's insert deduplication
    (the table sets `non_replicated_deduplication_window`); a replay over a different range still
    collapses under `FINAL`, because every event keeps its `event_id` (ReplacingMergeTree key).
    """

    def __init__(
        self,
        *,
        client: ClickHouseClient,
        consumer_config: Mapping[str, Any],
        topic: str,
        table: str = AUDIT_TABLE,
        batch_size: int = 1_000,
        poll_timeout_s: float = 0.5,
    ) -> None:
        """`consumer_config` must carry the bootstrap servers and a `group.id` for the loader."""
        self._client = client
        self._topic = topic
        self._table = table
        self._batch_size = batch_size
        self._poll_timeout_s = poll_timeout_s
        conf = dict(consumer_config)
        conf.update({"enable.auto.commit": False, "isolation.level": "read_committed",
                     "auto.offset.reset": "earliest"})
        conf.pop("enable.auto.offset.store", None)
        self._consumer = Consumer(conf)
        self._consumer.subscribe([topic])
        self.loaded = 0
        self.bad = 0

    def load_once(self) -> int:
        """Consume one batch, insert it, commit; return the rows inserted (blocking)."""
        msgs = self._consumer.consume(self._batch_size, self._poll_timeout_s)
        by_partition: dict[int, list[Any]] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("audit loader consume error", error=str(err))
                continue
            partition = msg.partition()
            if partition is not None:
                by_partition.setdefault(partition, []).append(msg)
        rows: list[tuple[Any, ...]] = []
        ranges: list[str] = []
        for partition, part_msgs in sorted(by_partition.items()):
            for msg in part_msgs:
                try:
                    rows.append(json_to_row(orjson.loads(msg.value() or b""),
                                            f"{self._topic}:{partition}:{msg.offset()}"))
                except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
                    self.bad += 1
                    log.warning("undecodable audit event", topic=self._topic, partition=partition,
                                offset=msg.offset(), error=str(exc))
            ranges.append(f"{partition}:{part_msgs[0].offset()}-{part_msgs[-1].offset()}")
        inserted = 0
        if rows:
            # One insert for the whole batch (an insert's fixed cost is milliseconds of engine CPU).
            token = f"{self._topic}:{','.join(ranges)}"
            self._client.insert(self._table, rows, AUDIT_COLUMNS, dedup_token=token)
            inserted = len(rows)
        if by_partition:
            offsets = [TopicPartition(self._topic, p, m[-1].offset() + 1) for p, m in by_partition.items()]
            self._consumer.commit(offsets=offsets, asynchronous=False)
        self.loaded += inserted
        return inserted

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Load batches until `stop` is set or the task is cancelled; retry after errors."""
        backoff = 0.5
        while stop is None or not stop.is_set():
            try:
                await asyncio.to_thread(self.load_once)
                backoff = 0.5
            except Exception as exc:
                log.warning("audit loader batch failed", topic=self._topic, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def close(self) -> None:
        """Leave the group."""
        self._consumer.close()


def _uuid4_strings(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as `str(uuid.uuid4())` writes them, from one `os.urandom` call."""
    raw = bytearray(os.urandom(16 * count))
    out = []
    for i in range(0, 16 * count, 16):
        raw[i + 6] = (raw[i + 6] & 0x0F) | 0x40
        raw[i + 8] = (raw[i + 8] & 0x3F) | 0x80
        h = raw[i:i + 16].hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def lifecycle_event(kind: str, **details: Any) -> AuditEvent:
    """A lifecycle audit event (`start`, `stop`, `rebalance`, `config_loaded`)."""
    return AuditEvent(event_type=kind, details=details)

