"""The Kafka loop: the one place where delivery guarantees are implemented.

`KafkaLoop` drives a service's `Processor` over confluent-kafka. asyncio runs outside; every
librdkafka call that can wait for the network runs in another thread (a worker, `asyncio.to_thread`,
or the producer's runner thread for the transactional calls) so the health server stays responsive;
calls that only queue, dequeue or ask librdkafka's own thread (`begin_transaction`, `produce`, taking
already fetched records) run on the event loop's thread, since a hand-off to a Python thread costs
~0.15 ms of CPU. One cycle:

1. consume up to `loop.batch_size` records: take what the consumer has already fetched (no wait);
   only when nothing is there, wait at most `loop.batch_timeout_ms` for the first one (in a worker
   thread), then take what is fetched by then, without waiting for the batch to fill;
2. `processor.process(batch)`, plus `processor.on_tick()` every `loop.tick_interval_ms` (also with
   no input);
3. produce outputs (`OutRecord.partition` when set, else by key with the murmur2 partitioner, as
   the Java client does), dead letters (contract JSON) and the batch's audit events (`produce` only
   queues: up to `INLINE_PRODUCE_MAX` records on the event loop's thread, more in a worker);
4. `processor.before_commit()` (flush external sinks; its records join the same commit);
5. commit:
   - `exactly-once`: everything above plus the input offsets
     (`send_offsets_to_transaction(positions, consumer_group_metadata)`) in one Kafka transaction,
     one transaction per cycle; `transactional.id = <service>-<instance_id>`; the consumer reads
     `read_committed` with auto-commit off;
   - `at-least-once`: idempotent producer; offsets are committed only after every record of the
     cycle is delivered (flush) and `before_commit` succeeded.

No transaction is open while `consume` runs, so a rebalance never meets a half-done transaction:
the previous cycle has committed (or aborted) before the next `consume` can serve a revocation.

Errors (librdkafka classes): retriable -> retry the call; abortable (`txn_requires_abort`) -> abort,
`processor.on_abort()`, rewind every assigned partition to its committed offset, redo; fatal or
fenced -> close the producer, create a new one (`init_transactions` again, which also fences/finishes
our previous transaction), `on_abort`, rewind; after `MAX_PRODUCER_RESTARTS` restarts within
`PRODUCER_RESTART_WINDOW_S` the loop raises `LoopFatalError` and the service exits non-zero for the
orchestrator. A consumer that cannot go on (a fatal consumer error such as a static member fenced
after a broker restart, or committed offsets that stay unreadable for the rewind) is replaced
inside the loop: closed, every partition revoked from the processor, a new consumer with the same
`group.instance.id` subscribed (its assignment restores state as usual); after
`MAX_CONSUMER_RESTARTS` replacements within `CONSUMER_RESTART_WINDOW_S` the loop raises
`LoopFatalError`.

Transactional calls that reach the broker (`init_transactions`, `send_offsets_to_transaction`,
`commit_transaction`, `abort_transaction`) run in the producer's own daemon thread with a deadline
(`TXN_CALL_DEADLINE_S`, above librdkafka's own timeout): librdkafka can block in them forever after
a broker restart (confluentinc/librdkafka#5456). A call past its deadline counts as *hung*: the
producer is abandoned where it blocks (kept referenced, never touched again), a new one with the
same `transactional.id` is created - its `init_transactions` fences the old one and aborts its open
transaction - and the cycle is redone. The loop keeps its liveness heartbeat while it waits.
A transaction the coordinator had lost (a broker restart) is not aborted by that `init_transactions`:
after every `init_transactions` (start-up included) and before the new epoch produces, the loop
closes any transaction of an older epoch of its producer id still open on a partition it may
write to (`HangingTransactionResolver.resolve_older_epochs`, no age threshold) - otherwise the new
epoch's first marker there would close the old records too (`docs/reliability.md`, finding 8).

Hanging transactions (exactly-once only): every `loop.hanging_check_interval_s` the assigned input
partitions are checked for a transaction left open by a broker restart (`kafka.hanging`): found ones
get their missing marker, are logged, counted (`dp_hanging_transactions_total`) and reported in
`/health` as the non-critical dependency `kafka_transactions`.

An exception from `processor.process` is treated as a bug that one of the records
triggers: the batch is redone record by record and the record that raises becomes a
`processing_error` dead letter, so the partition keeps flowing.

Rebalances use the eager `range` assignor: with equal partition counts it gives a consumer the same
partition numbers of every input topic (co-partitioning, which the projection service's two
inputs and the per-partition state rely on). Newly assigned partitions are paused inside the
rebalance callback; the loop calls `processor.on_assign` (state restore) and only then resumes them.
Records already fetched in a consume call that served a rebalance are discarded (their partitions
were revoked, or are rewound).

Backpressure: when the producer queue holds more than `loop.pause_records` records, the assigned
partitions are paused and the producer drained to `loop.resume_records` before consuming again;
the consumer's own prefetch is bounded by `queued.max.messages.kbytes`. A slow `process` or
`before_commit` (sink) holds the cycle, so nothing more is consumed meanwhile (memory stays bounded
by one batch); after a third of `max.poll.interval.ms` the partitions are paused and the consumer is
polled to keep its group membership until the step finishes (`_guarded`).

Event-time alignment (`dataproc_shared.kafka.alignment`, on unless `loop.align_max_ahead_ms` is 0):
when the processor reports the event time each input partition reached (`BatchResult.event_time_ns`),
the loop pauses, after each committed cycle, the partitions more than that bound ahead of the slowest
partition that still has records waiting (cached high watermark above the position), and resumes
them as it catches up or runs dry. Those pauses survive the other pause/resume paths (backpressure,
slow steps); a rolled-back cycle's event times are discarded and a rewind makes every partition
report again before anything is paused; a rebalance forgets the state of the partitions involved.

Headers: `dp-correlation-id` and `dp-ingest-ns` are copied from an output's source record
(`OutRecord.source`, else the input of the same key in the batch) when the processor did not set
them; a source without a correlation id gives `<topic>-<partition>-<offset>` (stable across
replays), without an ingest time its Kafka timestamp.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import queue
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from dataproc_shared.audit import AuditEmitter, lifecycle_event
from dataproc_shared.config import Settings, consumer_config, producer_config
from dataproc_shared.deadletter import TRUNCATED_HEADER, dead_letter_audit_event, dead_letter_record
from dataproc_shared.errors import DataProcError
from dataproc_shared.kafka.alignment import Alignment, HeldRecords, Quota
from dataproc_shared.kafka.hanging import HangingTransactionResolver
from dataproc_shared.kafka.retry import Retry
from dataproc_shared.metrics import ServiceMetrics, observe_many
from dataproc_shared.processor import Processor
from dataproc_shared.records import (
    CORRELATION_HEADER,
    INGEST_TIME_HEADER,
    AuditEvent,
    BatchResult,
    DeadLetter,
    DeadLetterReason,
    Headers,
    InRecord,
    OutRecord,
)

log = structlog.get_logger(__name__)

#: Optional header with the event time (ns since the epoch) of an output; feeds `dp_event_latency_seconds`.
EVENT_TIME_HEADER = "dp-event-ns"
#: Producer restarts (fatal/fenced) tolerated within `PRODUCER_RESTART_WINDOW_S` before giving up.
MAX_PRODUCER_RESTARTS = 3
PRODUCER_RESTART_WINDOW_S = 300.0
#: Outputs of one cycle up to this count are queued in the producer on the event loop's thread.
INLINE_PRODUCE_MAX = 256
#: Consumer lag is refreshed this often.
LAG_INTERVAL_S = 10.0
#: Longest wait for the committed offset of a partition not consumed since its assignment (lag).
LAG_LOOKUP_TIMEOUT_S = 5.0
#: Timeout of one blocking transactional call before it is retried (librdkafka needs a finite one).
TXN_CALL_TIMEOUT_S = 30.0
#: Attempts at closing older producer epochs' transactions after `init_transactions`.
OLDER_EPOCH_CHECK_ATTEMPTS = 3
#: A transactional call still blocked this long after it started is abandoned with its producer.
TXN_CALL_DEADLINE_S = TXN_CALL_TIMEOUT_S + 15.0
#: Longest wait for the committed offset of a partition not consumed yet (event-time alignment);
#: on a timeout the cycle goes on and the look-up is tried again after the next cycle.
ALIGN_LOOKUP_TIMEOUT_S = 5.0
#: Longest wait between keep-alive polls while a slow processor step runs.
KEEPALIVE_MAX_S = 30.0
#: How often a retriable error is retried before the cycle is aborted.
RETRIES = 5
#: Rewinds to the committed offsets tried after a rolled-back cycle before the consumer is replaced.
REWIND_ATTEMPTS = 3
#: Wait for the committed offsets in one rewind attempt. A healthy group coordinator answers in
#: milliseconds; a consumer whose `committed()` times out against a healthy broker (seen after
#: broker restarts) never recovers, so the attempts (about 33 s with their backoff, more than a
#: broker restart takes) are kept short before the consumer is replaced.
REWIND_COMMITTED_TIMEOUT_S = 10.0
#: Consumer replacements (fatal consumer error, committed offsets unreadable) tolerated within
#: `CONSUMER_RESTART_WINDOW_S`; one more ends the loop (`LoopFatalError`).
MAX_CONSUMER_RESTARTS = 3
CONSUMER_RESTART_WINDOW_S = 300.0
#: An input partition with records waiting whose position has not moved this long is logged
#: (only with librdkafka statistics on, `statistics.interval.ms`: a stall diagnostic).
STUCK_PARTITION_S = 30.0
#: A consumer being replaced that has not closed after this long is left behind (kept referenced).
CONSUMER_CLOSE_DEADLINE_S = 30.0

_FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})

T = TypeVar("T")
ErrorClass = Literal["retriable", "abortable", "fatal", "hung"]
RebalanceKind = Literal["assign", "revoke", "lost"]
TP = tuple[str, int]


class LoopError(DataProcError):
    """Base of the loop's errors."""


class LoopFatalError(LoopError):
    """The loop cannot continue (producer keeps failing fatally); the process should exit non-zero."""


class _ConsumerFailed(LoopError):
    """Internal: the consumer cannot go on (fatal consumer error, committed offsets unreadable).

    The loop replaces it (`KafkaLoop._replace_consumer`) unless that happened too often already.
    """


class _CycleFailed(LoopError):
    """Internal: the current cycle must be rolled back; `kind` says how."""

    def __init__(self, kind: ErrorClass, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(error: KafkaError) -> ErrorClass:
    """The librdkafka error class of `error`: fenced and fatal errors first, then abortable, retriable."""
    if error.fatal() or error.code() in _FENCED_CODES:
        return "fatal"
    if error.txn_requires_abort():
        return "abortable"
    if error.retriable():
        return "retriable"
    return "abortable"


def _retriable_call(exc: BaseException) -> bool:
    return isinstance(exc, _CycleFailed) and exc.kind == "retriable"


def _cycle_failed(exc: BaseException) -> bool:
    return isinstance(exc, _CycleFailed)


def _kafka_or_cycle_error(exc: BaseException) -> bool:
    return isinstance(exc, _CycleFailed | KafkaException)


def _kafka_error(exc: BaseException) -> bool:
    return isinstance(exc, KafkaException)


#: How the loop retries (`dataproc_shared.kafka.retry`): a client call failing with a retriable error,
_CALL_RETRY = Retry(RETRIES, lambda n: min(0.1 * 2 ** (n - 1), 2.0), _retriable_call,
                    "retrying kafka call", "info")
#: the check of older producer epochs after `init_transactions` (given up with a warning),
_OLDER_EPOCH_RETRY = Retry(OLDER_EPOCH_CHECK_ATTEMPTS, lambda n: 1.0 * n,
                           event="older producer epochs not checked")
#: the replacement of a failed or abandoned producer,
_PRODUCER_RETRY = Retry(RETRIES, lambda n: 1.0 * n, _kafka_or_cycle_error, "producer restart failed")
#: the rewind to the committed offsets after a rolled-back cycle,
_REWIND_RETRY = Retry(REWIND_ATTEMPTS, lambda n: min(1.0 * n, 10.0), _cycle_failed, "rewind failed, retrying")
#: and one seek of that rewind.
_SEEK_RETRY = Retry(RETRIES, lambda n: 0.1 * n, _kafka_error)


class _CallRunner:
    """Runs one client's blocking calls in a daemon thread that the loop can walk away from."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue())
        #: the client call in progress inside a job (`timed`): its name and when it started (monotonic)
        self.busy: tuple[str, float] | None = None
        #: set by `give_up`: no further `timed` call starts (the loop has walked away from the runner)
        self.given_up = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `call()` for the runner's thread; its future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((call, future))
        return future

    def call(self, call: Callable[[], T], deadline_s: float) -> T:
        """`call()` in the runner's thread; `TimeoutError` when it has not returned by `deadline_s`."""
        return self.submit(call).result(timeout=deadline_s)

    def timed(self, what: str, call: Callable[[], T]) -> T:
        """`call()` (in the runner's thread, inside a job), shown in `busy` while it runs.

        Not started once the runner was given up (`_CycleFailed("hung")`): a job walked away from
        must not go on, e.g. commit after its offsets call came back late.
        """
        with self._lock:
            if self.given_up:
                raise _CycleFailed("hung", f"{what}: not called, the loop walked away from this producer")
            self.busy = (what, time.monotonic())
        try:
            return call()
        finally:
            self.busy = None

    def give_up(self, deadline_s: float) -> str | None:
        """When the call in progress has run `deadline_s` or longer: no further call starts; its name."""
        with self._lock:
            busy = self.busy
            if busy is None or time.monotonic() - busy[1] < deadline_s:
                return None
            self.given_up = True
            return busy[0]

    def stop(self) -> None:
        """Let the thread end after the call it runs (if any) returns."""
        self._queue.put(None)


def _error_of(exc: KafkaException) -> KafkaError | None:
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, KafkaError) else None


class LoopListener(Protocol):
    """Hooks the loop calls (implemented by the health server)."""

    def assigned(self, partitions: Collection[TP]) -> None:
        """The assignment changed; the partitions listed are restored and being consumed."""

    def heartbeat(self) -> None:
        """The loop is alive (called every cycle)."""


class _NoListener:
    def assigned(self, partitions: Collection[TP]) -> None:
        pass

    def heartbeat(self) -> None:
        pass


def _headers(raw: Any) -> Headers:
    """confluent-kafka headers (a list of pairs, or a dict) as `Headers`; values as bytes."""
    pairs = raw.items() if isinstance(raw, dict) else raw
    return tuple((k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs)


@dataclass(slots=True)
class _Batch:
    """Per-cycle bookkeeping: records and, per partition, the first and last offsets."""

    records: list[InRecord] = field(default_factory=list)
    first: dict[TP, int] = field(default_factory=dict)
    last: dict[TP, int] = field(default_factory=dict)

    def offsets(self) -> list[TopicPartition]:
        """Next offsets to commit (last consumed + 1) per partition."""
        return [TopicPartition(t, p, off + 1) for (t, p), off in self.last.items()]

    @classmethod
    def of(cls, records: list[InRecord]) -> _Batch:
        """A batch of `records` (each partition's in offset order), with its offsets per partition."""
        batch = cls(records)
        first, last = batch.first, batch.last
        for rec in records:
            tp = (rec.topic, rec.partition)
            first.setdefault(tp, rec.offset)
            last[tp] = rec.offset
        return batch


class KafkaLoop:
    """Consume -> process -> produce -> commit, under the configured processing guarantee."""

    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        *,
        input_topics: Sequence[str],
        metrics: ServiceMetrics,
        audit: AuditEmitter | None = None,
        listener: LoopListener | None = None,
        clock: Callable[[], float] = time.time,
        deadletter_max_bytes: int | None = None,
    ) -> None:
        """`clock` gives seconds since the epoch (latency metrics, dead-letter timestamps).

        `deadletter_max_bytes`: the dead-letter topic's message size limit (default: the configured
        `topics.deadletter_message_limit`); a larger dead letter is truncated to fit.
        """
        self._settings = settings
        self._opts = settings.loop
        self._exactly_once = settings.loop.guarantee == "exactly-once"
        self._processor = processor
        self._topics = list(input_topics)
        self._metrics = _Metrics(metrics)
        self._audit = audit
        self._listener: LoopListener = listener or _NoListener()
        self._clock = clock
        self._service = settings.service
        self._deadletter_topic = settings.topics.deadletter
        self._deadletter_max_bytes = min(deadletter_max_bytes or settings.topics.deadletter_message_limit,
                                         settings.topics.deadletter_message_limit)
        self._transactional_id = f"{settings.service}-{settings.instance_id}"
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._runner: _CallRunner | None = None
        #: producers abandoned in a hung call (kept referenced: destroying one would block too)
        self._abandoned: list[tuple[Producer, _CallRunner]] = []
        self._hanging = HangingTransactionResolver.from_settings(settings, metrics)
        self._next_hanging = time.monotonic() + settings.loop.hanging_check_interval_s
        self._hanging_task: asyncio.Task[None] | None = None
        self._assigned: set[TP] = set()
        self._events: list[tuple[RebalanceKind, list[TP]]] = []
        self._restarts: list[float] = []
        self._consumer_restarts: list[float] = []
        #: consumers whose close did not return while being replaced (kept referenced)
        self._abandoned_consumers: list[tuple[Consumer, _CallRunner]] = []
        self._next_tick = 0.0
        self._next_lag = 0.0
        self._failures = 0
        self._delivery_errors: list[str] = []
        self._consumer_fatal: KafkaError | None = None
        #: per input partition: application offset, since when (s) and when last reported stuck
        self._stats_seen: dict[TP, tuple[int, float, float]] = {}
        self.committed_cycles = 0
        self.paused_for_slow_steps = 0
        self._alignment = (
            Alignment(self._opts.align_max_ahead_ms * 1_000_000, self._opts.align_max_pause_ms * 1_000_000)
            if self._opts.align_max_ahead_ms > 0 else None
        )
        self._held = (HeldRecords(self._opts.align_hold_records, self._opts.align_hold_bytes)
                      if self._alignment is not None else None)
        self._align_start: dict[TP, int] = {}
        #: committed offset of each partition not consumed since its assignment (lag), -1: none
        self._lag_start: dict[TP, int] = {}
        self._topic_names: dict[str, bytes] = {}
        #: the consumer's group metadata for `send_offsets_to_transaction`, kept between cycles:
        #: reading it is a round trip to librdkafka's main thread. Forgotten with every rebalance
        #: event, consumer replacement and rolled-back cycle (a stale generation would only make
        #: the broker refuse the offsets, which rolls the cycle back).
        self._group_metadata: Any = None

    @property
    def _c(self) -> Consumer:
        if self._consumer is None:
            raise LoopError("the loop is not running")
        return self._consumer

    @property
    def _p(self) -> Producer:
        if self._producer is None:
            raise LoopError("the loop is not running")
        return self._producer

    # ---- public -------------------------------------------------------------------------------

    @property
    def assigned(self) -> frozenset[TP]:
        """Partitions currently assigned and restored."""
        return frozenset(self._assigned)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down cleanly (finish the cycle, commit, close)."""
        await asyncio.to_thread(self._start_clients)
        self._emit(lifecycle_event("start", guarantee=self._opts.guarantee, topics=self._topics,
                                   transactional_id=self._transactional_id if self._exactly_once else ""))
        self._next_tick = time.monotonic() + self._opts.tick_interval_ms / 1000
        try:
            while not stop.is_set():
                try:
                    await self._cycle()
                except _ConsumerFailed as exc:
                    await self._replace_consumer(str(exc))
        finally:
            await self._close()

    # ---- clients ------------------------------------------------------------------------------

    def _start_clients(self) -> None:
        self._producer = self._new_producer()
        self._consumer = self._new_consumer()
        log.info("loop started", service=self._service, topics=self._topics, guarantee=self._opts.guarantee)

    def _new_consumer(self) -> Consumer:
        conf = consumer_config(self._settings, **{
            "partition.assignment.strategy": "range",
            # Static membership: a restarted instance takes its partitions back without waiting for
            # the session timeout of its previous incarnation.
            "group.instance.id": self._transactional_id,
        })
        callbacks: dict[str, Any] = {"error_cb": self._cb_consumer_error}
        if int(conf.get("statistics.interval.ms", 0) or 0) > 0:
            callbacks["stats_cb"] = self._cb_stats
        consumer = Consumer({**conf, **callbacks})
        consumer.subscribe(self._topics, on_assign=self._cb_assign, on_revoke=self._cb_revoke,
                           on_lost=self._cb_lost)
        return consumer

    async def _replace_consumer(self, reason: str) -> None:
        """Close the consumer and subscribe a new one, as a restarted process would.

        For a consumer that cannot go on: a fatal error (librdkafka fences its own static member
        that rejoined after a session timeout during a broker restart) or committed offsets that
        stay unreadable for the rewind. No transaction is open (the failure ends a cycle before
        `begin_transaction`, or after its abort). The processor hears of the revocation of every
        partition; the new consumer (same `group.instance.id`: it takes the member's place at once)
        gets its assignment through the usual rebalance path: paused, `on_assign` (state restore)
        and resumed, positions from the committed offsets. More than `MAX_CONSUMER_RESTARTS`
        replacements within `CONSUMER_RESTART_WINDOW_S`: `LoopFatalError` (the process exits).
        """
        now = time.monotonic()
        self._consumer_restarts = [t for t in self._consumer_restarts
                                   if now - t < CONSUMER_RESTART_WINDOW_S] + [now]
        if len(self._consumer_restarts) > MAX_CONSUMER_RESTARTS:
            raise LoopFatalError(f"{reason} (consumer replaced {len(self._consumer_restarts) - 1} times "
                                 f"within {CONSUMER_RESTART_WINDOW_S:.0f}s)")
        log.warning("replacing the consumer", service=self._service, reason=reason[:500],
                    replacements=len(self._consumer_restarts))
        old, self._consumer = self._consumer, None
        if old is not None:
            runner = _CallRunner(f"{self._service}-consumer-close")
            try:
                await self._beating(asyncio.to_thread(runner.call, old.close, CONSUMER_CLOSE_DEADLINE_S))
                runner.stop()
            except concurrent.futures.TimeoutError:
                self._abandoned_consumers.append((old, runner))
                log.warning("consumer left behind: close did not return", service=self._service,
                            deadline_s=CONSUMER_CLOSE_DEADLINE_S)
            except (KafkaException, RuntimeError) as exc:
                runner.stop()
                log.info("closing a failed consumer", service=self._service, error=str(exc))
        del old
        parts = sorted(self._assigned)
        self._assigned.clear()
        self._events.clear()
        self._group_metadata = None
        self._consumer_fatal = None
        self._stats_seen = {}
        self._lag_start.clear()
        if parts:
            self._metrics.rebalance("lost")
            self._forget_alignment(parts)
            self._metrics.forget_lag(parts)
            await self._processor.on_revoke(parts)
        self._listener.assigned(frozenset())
        self._consumer = await asyncio.to_thread(self._new_consumer)
        log.info("consumer replaced", service=self._service, revoked=parts)

    def _new_producer(self) -> Producer:
        overrides: dict[str, str | int | float | bool] = {"partitioner": "murmur2_random"}
        if self._exactly_once:
            conf = producer_config(self._settings, self._transactional_id, **overrides)
        else:
            conf = producer_config(self._settings, None, **overrides)
        producer = Producer({**conf, "error_cb": self._cb_error})
        self._runner = _CallRunner(f"{self._service}-txn")
        if self._exactly_once:
            self._retry(lambda: producer.init_transactions(TXN_CALL_TIMEOUT_S), "init_transactions",
                        deadline=True)
            self._close_older_epochs()
        return producer

    def _output_topics(self) -> list[str]:
        """Every topic this service may write to in a transaction (known up front or seen so far).

        The chain topics after the inputs, dead letters, the audit topic, the service's configured
        changelogs and any topic produced to in this process. Partitions that no producer of ours
        ever wrote to cost nothing but a line in one `DescribeProducers` request.
        """
        t = self._settings.topics
        topics = {t.normalized, t.enriched, t.bars, self._deadletter_topic, *self._topic_names}
        if self._audit is not None and self._audit.kafka_topic:
            topics.add(self._audit.kafka_topic)
        for name in type(t).model_fields:
            value = getattr(t, name)
            own = name.startswith(f"{self._service}_") and name.endswith("_changelog")
            if own and isinstance(value, str):
                topics.add(value)
        return sorted(topics - set(self._topics))

    def _close_older_epochs(self) -> None:
        """Resolve transactions left open by older epochs of this producer id (finding 8).

        Runs after every `init_transactions` (start, replacement after an abandoned or failed
        producer), before the new epoch produces; a failed check is retried, then logged.
        """
        fields = {"service": self._service, "transactional_id": self._transactional_id}
        try:
            _OLDER_EPOCH_RETRY.run(
                lambda: self._hanging.resolve_older_epochs(self._transactional_id, self._output_topics()),
                log_fields=fields)
        except Exception as exc:
            log.warning("older producer epochs not checked", error=str(exc),
                        attempt=_OLDER_EPOCH_RETRY.attempts, **fields)

    def _cb_consumer_error(self, err: KafkaError) -> None:
        # librdkafka hands a fatal consumer error (e.g. fenced by a consumer with the same
        # group.instance.id: it will never consume again) to `consume` as a `_FATAL` message, and
        # may raise it here too; wherever it shows up, the next cycle ends the loop
        if err.fatal() or err.code() == KafkaError._FATAL:
            self._consumer_fatal = err
        self._cb_error(err)

    def _cb_stats(self, raw: str) -> None:
        """Statistics of librdkafka (with `statistics.interval.ms` set only): report stuck partitions.

        A diagnostic for stalls: an assigned input partition with records below its last stable
        offset whose application position has not moved for `STUCK_PARTITION_S` (librdkafka's
        clock of the statistics, so a burst of queued statistics counts as the time it covers) is
        logged with librdkafka's own view of it (fetch state, positions, queued records) and whether
        the alignment holds it paused, again every `STUCK_PARTITION_S` while it stays so.
        """
        try:
            stats = json.loads(raw)
            now_s = int(stats["ts"]) / 1e6
        except (ValueError, KeyError, TypeError):
            return
        seen: dict[TP, tuple[int, float, float]] = {}
        held = self._alignment.held() if self._alignment is not None else frozenset()
        fields = ("app_offset", "next_offset", "committed_offset", "ls_offset", "hi_offset", "fetchq_cnt")
        for topic in self._topics:
            for key, part in stats.get("topics", {}).get(topic, {}).get("partitions", {}).items():
                tp = (topic, int(key))
                if tp[1] < 0 or tp not in self._assigned:
                    continue
                values = {name: int(part.get(name, -1)) for name in fields}
                # not consumed since the assignment: librdkafka has no position, the committed one counts
                app = values["app_offset"] if values["app_offset"] >= 0 else values["committed_offset"]
                before = self._stats_seen.get(tp)
                since, warned = (now_s, 0.0) if before is None or before[0] != app else before[1:]
                if values["ls_offset"] > max(app, 0) and now_s - since >= STUCK_PARTITION_S \
                        and now_s - warned >= STUCK_PARTITION_S:
                    log.warning("consumer partition not advancing", service=self._service, topic=topic,
                                partition=tp[1], fetch_state=part.get("fetch_state"),
                                stuck_s=round(now_s - since, 1), held=tp in held, **values)
                    warned = now_s
                seen[tp] = (app, since, warned)
        self._stats_seen = seen

    def _cb_error(self, err: KafkaError) -> None:
        log.warning("kafka client error", service=self._service, error=str(err), fatal=err.fatal())

    def _retry(self, call: Callable[[], Any], what: str, *, deadline: bool = False) -> Any:
        """Run a blocking client call, retrying retriable errors; raise `_CycleFailed` otherwise.

        With `deadline`, the call runs in the producer's runner thread and is given up after
        `TXN_CALL_DEADLINE_S` (`_CycleFailed("hung")`).
        """
        runner = self._runner

        def attempt() -> Any:
            try:
                if deadline and runner is not None:
                    return runner.call(call, TXN_CALL_DEADLINE_S)
                return call()
            except concurrent.futures.TimeoutError as exc:
                raise _CycleFailed("hung", f"{what}: no answer within {TXN_CALL_DEADLINE_S:.0f}s") from exc
            except KafkaException as exc:
                err = _error_of(exc)
                raise _CycleFailed(classify(err) if err is not None else "fatal", f"{what}: {exc}") from exc

        try:
            return _CALL_RETRY.run(attempt, log_fields={"call": what})
        except _CycleFailed as exc:
            if exc.kind == "retriable":  # retries used up: roll the cycle back
                raise _CycleFailed("abortable", str(exc)) from exc.__cause__
            raise

    async def _await_job(self, runner: _CallRunner, job: Callable[[], T]) -> T:
        """Run `job` in the producer's runner thread and await it on the event loop, keeping `/live` up.

        One thread hand-off each way (a worker thread waiting for the runner would add two). The
        job's client calls go through `runner.timed`: one still running `TXN_CALL_DEADLINE_S` after
        it started counts as hung (`_CycleFailed("hung")`) and the job is walked away from.
        """
        loop = asyncio.get_running_loop()
        waiting = asyncio.wrap_future(runner.submit(job))
        hung: list[str] = []
        timer: list[asyncio.TimerHandle] = []

        def beat() -> None:
            stuck = runner.give_up(TXN_CALL_DEADLINE_S)
            if stuck is not None:
                hung.append(stuck)
                waiting.cancel()  # the runner's call goes on; its result is never looked at
                return
            self._heartbeat()
            timer[0] = loop.call_later(1.0, beat)

        timer.append(loop.call_later(1.0, beat))
        try:
            return await waiting
        except asyncio.CancelledError:
            if hung:
                message = f"{hung[0]}: no answer within {TXN_CALL_DEADLINE_S:.0f}s"
                raise _CycleFailed("hung", message) from None
            raise
        finally:
            timer[0].cancel()

    # ---- rebalance callbacks (run inside consume, in the worker thread) ------------------------

    def _cb_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        if partitions:
            # Nothing of these partitions is fetched until the processor has restored their state.
            consumer.pause(partitions)
        self._events.append(("assign", [(tp.topic, tp.partition) for tp in partitions]))

    def _cb_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("revoke", [(tp.topic, tp.partition) for tp in partitions]))

    def _cb_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("lost", [(tp.topic, tp.partition) for tp in partitions]))

    # ---- the cycle ----------------------------------------------------------------------------

    async def _cycle(self) -> None:
        consumer = self._c
        if self._consumer_fatal is not None:
            raise _ConsumerFailed(f"consumer failed: {self._consumer_fatal}")
        self._heartbeat()
        await self._backpressure()
        waited = time.perf_counter()
        if self._holding():
            batch, seen = await asyncio.to_thread(self._consume_aligned, consumer)
            started = time.perf_counter()
            if batch.records:
                self._metrics.step("consume", started - waited)
            if self._events:
                await self._handle_rebalance([], seen)
                return
        else:
            # What is fetched already is taken on the event loop's thread (no wait); only a wait for
            # the first record goes to a worker thread (two thread wake-ups saved per busy cycle).
            msgs = consumer.consume(self._opts.batch_size, 0)
            if not msgs and not self._events:
                msgs = await asyncio.to_thread(self._consume, consumer)
            started = time.perf_counter()
            if msgs:
                # the wait that ended with records (idle waits say nothing about latency)
                self._metrics.step("consume", started - waited)
            if self._events:
                await self._handle_rebalance(msgs)
                return
            batch = self._to_batch(msgs)
            if batch.records and self._alignment is not None and len(self._alignment.waiting) > 1:
                batch, seen = self._cut_to_shares(consumer, batch, len(msgs))
                if self._events:
                    await self._handle_rebalance([], seen)
                    return
        result = BatchResult()
        if batch.records:
            self._metrics.consumed(batch.records)
            result = await self._process(batch.records)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + self._opts.tick_interval_ms / 1000
            result.extend(await self._processor.on_tick())
        if batch.records:
            self._metrics.step("process", time.perf_counter() - started)
        cycles = self.committed_cycles
        if batch.records or result.outputs or result.dead_letters or result.audit:
            await self._commit_cycle(batch, result, started)
        if self._alignment is not None:
            # A rolled-back cycle's event times are not reached any more (the input was rewound).
            await self._align(result.event_time_ns if self.committed_cycles > cycles else {}, batch.last)
        if self._exactly_once and now >= self._next_hanging and self._hanging_task is None:
            self._next_hanging = now + self._opts.hanging_check_interval_s
            self._hanging_task = asyncio.create_task(self._check_hanging(), name="hanging-transactions")
        if now >= self._next_lag:
            self._next_lag = now + LAG_INTERVAL_S
            lags = await asyncio.to_thread(self._update_lag)
            on_lag = getattr(self._processor, "on_lag", None)
            if on_lag is not None and lags:
                await on_lag(lags)

    def _consume(self, consumer: Consumer) -> list[Message]:
        """Wait up to `batch_timeout_ms` for the first record, then add what is already fetched.

        The batch is never held back waiting to fill up: under a backlog the prefetched queue fills
        it at once, under light load a record is processed as soon as it arrives (latency), and
        records that arrive while a cycle commits make the next batch (batching follows load).
        """
        msgs: list[Message] = consumer.consume(1, self._opts.batch_timeout_ms / 1000)
        if msgs and self._opts.batch_size > 1:
            msgs.extend(consumer.consume(self._opts.batch_size - 1, 0))
        return msgs

    def _heartbeat(self) -> None:
        self._metrics.tick(self._clock())
        self._listener.heartbeat()

    def _to_batch(self, msgs: Iterable[Message]) -> _Batch:
        """`InRecord`s of the consumed messages of assigned partitions, with per-partition offsets.

        The per-record hot path of every service: locals only, positional construction, and the
        first/last offsets bookkept once per run of one partition's records (consume hands them
        out in runs), not once per record.
        """
        batch = _Batch()
        records, first, last = batch.records, batch.first, batch.last
        append = records.append
        assigned = self._assigned
        new = InRecord
        run: TP | None = None
        offset = 0
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._consume_error(err)
                continue
            tp = (msg.topic(), msg.partition())
            if tp not in assigned:
                continue
            offset = msg.offset() or 0
            if tp != run:
                if run is not None:
                    last[run] = records[-1].offset
                run = tp
                first.setdefault(tp, offset)
            raw = msg.headers()
            append(new(tp[0], tp[1], offset, msg.key(), msg.value(), msg.timestamp()[1],
                       _headers(raw) if raw else ()))
        if run is not None:
            last[run] = offset
        return batch

    def _consume_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal() or err.code() == KafkaError._FATAL:
            # e.g. fenced by another consumer with the same group.instance.id
            raise _ConsumerFailed(f"consumer failed: {err}")
        log.warning("consume error", service=self._service, error=str(err))

    async def _process(self, records: list[InRecord]) -> BatchResult:
        try:
            return await self._guarded(self._processor.process(records), "process")
        except Exception as exc:
            log.warning("process failed, redoing the batch record by record", service=self._service,
                        records=len(records), error=repr(exc))
        await self._processor.on_abort()
        result = BatchResult()
        for rec in records:
            try:
                result.extend(await self._processor.process([rec]))
            except Exception as exc:
                log.warning("record failed processing", service=self._service, topic=rec.topic,
                            partition=rec.partition, offset=rec.offset, error=repr(exc))
                result.dead_letters.append(
                    DeadLetter(rec, DeadLetterReason.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}")
                )
        return result

    # ---- commit -------------------------------------------------------------------------------

    async def _commit_cycle(self, batch: _Batch, result: BatchResult, started: float) -> None:
        try:
            produced = await self._produce_and_commit(batch, result)
        except _CycleFailed as exc:
            await self._recover(exc.kind, str(exc))
            return
        self._failures = 0
        self.committed_cycles += 1
        self._metrics.committed(batch, produced, time.perf_counter() - started, self._clock())
        if self._audit is not None:
            for event in produced.audit:
                self._audit.emit(event, skip_kafka=produced.audit_in_txn)
            if produced.audit_in_txn:
                self._audit.count_written("kafka", len(produced.audit))

    async def _produce_and_commit(self, batch: _Batch, result: BatchResult) -> _Produced:
        producer = self._p
        failed_at = datetime.fromtimestamp(self._clock(), UTC)
        produced = _Produced(audit_in_txn=self._exactly_once and self._audit is not None
                             and self._audit.kafka_topic is not None)
        self._delivery_errors = []
        step = time.perf_counter()
        if self._exactly_once:
            # no broker round trip (librdkafka's main thread answers): no worker thread needed
            self._retry(producer.begin_transaction, "begin_transaction")
        records = self._collect(batch, result, produced, failed_at)
        await self._produce(records)
        sink = time.perf_counter()
        producing = sink - step
        try:
            extra = await self._guarded(self._processor.before_commit(), "before_commit")
        except Exception as exc:
            raise _CycleFailed("abortable", f"before_commit: {exc!r}") from exc
        step = time.perf_counter()
        self._metrics.step("before_commit", step - sink)
        extra_records = self._collect(batch, extra, produced, failed_at)
        audit_records = self._audit_records(batch, produced)
        await self._produce(extra_records + audit_records)
        self._metrics.step("produce", producing + time.perf_counter() - step)
        if self._events:
            # A keep-alive poll served a rebalance: the partitions may have a new owner already,
            # which must not see this cycle half-way. Roll back; the next cycle applies the change.
            raise _CycleFailed("abortable", "rebalance during the cycle")
        if self._exactly_once:
            await self._commit_transaction(batch.offsets())
        else:
            await asyncio.to_thread(self._flush_and_commit, batch.offsets())
        return produced

    def _collect(self, batch: _Batch, result: BatchResult, produced: _Produced,
                 failed_at: datetime) -> list[OutRecord]:
        out = self._propagate_headers(batch.records, result.outputs)
        for dl in result.dead_letters:
            record = dead_letter_record(dl, service=self._service, failed_at=failed_at,
                                        topic=self._deadletter_topic, max_bytes=self._deadletter_max_bytes)
            if any(name == TRUNCATED_HEADER for name, _ in record.headers):
                log.warning("dead letter payload truncated to fit the dead-letter topic",
                            service=self._service, topic=dl.source.topic, partition=dl.source.partition,
                            offset=dl.source.offset, payload_bytes=len(dl.source.value or b""),
                            max_bytes=self._deadletter_max_bytes)
            out.append(record)
            produced.dead_letters.append(dl)
            produced.audit.append(dead_letter_audit_event(dl))
        produced.outputs.extend(o for o in out if o.topic != self._deadletter_topic)
        produced.audit.extend(result.audit)
        produced.deduplicated += result.deduplicated
        return out

    def _audit_records(self, batch: _Batch, produced: _Produced) -> list[OutRecord]:
        """One audit event per input partition of the batch; all audit events as transaction records."""
        dead_by_tp: dict[TP, int] = {}
        for dl in produced.dead_letters:
            tp = (dl.source.topic, dl.source.partition)
            dead_by_tp[tp] = dead_by_tp.get(tp, 0) + 1
        counts: dict[TP, int] = {}
        for rec in batch.records:
            tp = (rec.topic, rec.partition)
            counts[tp] = counts.get(tp, 0) + 1
        for (topic, partition), n in counts.items():
            produced.audit.append(AuditEvent(
                event_type="batch_committed",
                source_topic=topic,
                source_partition=partition,
                offset_from=batch.first[(topic, partition)],
                offset_to=batch.last[(topic, partition)],
                details={"in": n, "dead_lettered": dead_by_tp.get((topic, partition), 0),
                         "batch_in": len(batch.records), "batch_out": len(produced.outputs),
                         "batch_dead_lettered": len(produced.dead_letters),
                         "batch_deduplicated": produced.deduplicated,
                         "guarantee": self._opts.guarantee},
            ))
        if produced.audit_in_txn and self._audit is not None:
            return self._audit.kafka_records(produced.audit)
        return []

    def _propagate_headers(self, inputs: list[InRecord], outputs: list[OutRecord]) -> list[OutRecord]:
        """Outputs with the tracing headers of their source record.

        The source is `OutRecord.source`, else the input of the same key (the n-th output of a key
        takes the n-th input of that key).
        """
        by_key: dict[bytes | None, list[InRecord]] | None = None
        used: dict[bytes | None, int] = {}
        with_headers = self._with_headers
        result = []
        for out in outputs:
            source = out.source
            if source is None:
                if by_key is None:
                    by_key = {}
                    for rec in inputs:
                        by_key.setdefault(rec.key, []).append(rec)
                candidates = by_key.get(out.key)
                if candidates:
                    n = used.get(out.key, 0)
                    used[out.key] = n + 1
                    source = candidates[min(n, len(candidates) - 1)]
            result.append(with_headers(out, source) if source is not None else out)
        return result

    def _with_headers(self, out: OutRecord, source: InRecord | None) -> OutRecord:
        if source is None:
            return out
        if not out.headers and not source.headers:
            # The common case of a raw input: both tracing headers derived from the source.
            return OutRecord(out.topic, out.key, out.value, out.partition, (
                (CORRELATION_HEADER, b"%s-%d-%d" % (self._topic_bytes(source.topic), source.partition,
                                                     source.offset)),
                (INGEST_TIME_HEADER, b"%d" % (source.timestamp_ms * 1_000_000)),
            ), source)
        has_cid = has_ingest = False
        for name, _ in out.headers:
            if name == CORRELATION_HEADER:
                has_cid = True
            elif name == INGEST_TIME_HEADER:
                has_ingest = True
        if has_cid and has_ingest:
            return out
        extra: list[tuple[str, bytes]] = []
        cid = ingest = None
        for name, value in source.headers:
            if name == CORRELATION_HEADER and cid is None:
                cid = value
            elif name == INGEST_TIME_HEADER and ingest is None:
                ingest = value
        if not has_cid:
            extra.append((CORRELATION_HEADER,
                          cid if cid is not None else b"%s-%d-%d" % (self._topic_bytes(source.topic),
                                                                      source.partition, source.offset)))
        if not has_ingest:
            extra.append((INGEST_TIME_HEADER,
                          ingest if ingest is not None else b"%d" % (source.timestamp_ms * 1_000_000)))
        return OutRecord(topic=out.topic, key=out.key, value=out.value, partition=out.partition,
                         headers=out.headers + tuple(extra), source=source)

    def _topic_bytes(self, topic: str) -> bytes:
        encoded = self._topic_names.get(topic)
        if encoded is None:
            encoded = self._topic_names[topic] = topic.encode()
        return encoded

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    async def _produce(self, records: Sequence[OutRecord]) -> None:
        """Queue `records` in the producer: small sets on the loop's thread, larger ones in a worker.

        `produce` only queues (no broker round trip); a worker-thread hand-off costs more CPU and
        wakes-ups than queueing a few records, which is what a cycle under light load has.
        """
        if len(records) <= INLINE_PRODUCE_MAX:
            self._produce_all(records)
        else:
            await asyncio.to_thread(self._produce_all, records)

    def _produce_all(self, records: Sequence[OutRecord]) -> None:
        producer = self._p
        on_delivery = None if self._exactly_once else self._delivered
        try:
            for r in records:
                headers: list[tuple[str, str | bytes | None]] | None = list(r.headers) if r.headers else None
                while True:
                    try:
                        if r.partition is None:
                            producer.produce(r.topic, r.value, r.key, headers=headers,
                                             on_delivery=on_delivery)
                        else:
                            producer.produce(r.topic, r.value, r.key, partition=r.partition,
                                             headers=headers, on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
        except KafkaException as exc:
            err = _error_of(exc)
            kind = classify(err) if err is not None else "fatal"
            raise _CycleFailed("abortable" if kind == "retriable" else kind, f"produce: {exc}") from exc

    async def _commit_transaction(self, offsets: list[TopicPartition]) -> None:
        """Send the offsets to the transaction and commit it: one job in the producer's runner thread."""
        producer, runner = self._p, self._runner
        if runner is None:
            raise LoopError("the loop is not running")
        metadata = self._group_metadata
        if offsets and metadata is None:
            metadata = self._group_metadata = self._c.consumer_group_metadata()

        def commit() -> None:
            step = time.perf_counter()
            if offsets:
                self._retry(lambda: runner.timed("send_offsets_to_transaction", lambda: (
                    producer.send_offsets_to_transaction(offsets, metadata, TXN_CALL_TIMEOUT_S))),
                    "send_offsets_to_transaction")
                sent = time.perf_counter()
                self._metrics.step("send_offsets", sent - step)
                step = sent
            self._retry(lambda: runner.timed("commit_transaction", lambda: (
                producer.commit_transaction(TXN_CALL_TIMEOUT_S))), "commit_transaction")
            self._metrics.step("commit", time.perf_counter() - step)

        await self._await_job(runner, commit)

    def _flush_and_commit(self, offsets: list[TopicPartition]) -> None:
        producer, consumer = self._p, self._c
        remaining = producer.flush(TXN_CALL_TIMEOUT_S)
        if remaining or self._delivery_errors:
            raise _CycleFailed("abortable", f"delivery failed: {remaining} undelivered, "
                                            f"errors {self._delivery_errors[:3]}")
        if offsets:
            self._retry(lambda: consumer.commit(offsets=offsets, asynchronous=False), "commit")

    # ---- recovery -----------------------------------------------------------------------------

    async def _recover(self, kind: ErrorClass, message: str) -> None:
        self._failures += 1
        self._group_metadata = None
        log.warning("cycle rolled back", service=self._service, error_class=kind, error=message,
                    consecutive=self._failures)
        if self._exactly_once and kind not in ("fatal", "hung"):
            producer = self._p
            try:
                await self._beating(asyncio.to_thread(
                    self._retry, lambda: producer.abort_transaction(TXN_CALL_TIMEOUT_S), "abort_transaction",
                    deadline=True))
            except _CycleFailed as exc:
                log.warning("abort failed", service=self._service, error=str(exc))
                kind = "hung" if exc.kind == "hung" else "fatal"
        if kind in ("fatal", "hung"):
            self._metrics.transaction("failed")
            await self._restart_producer(abandon=kind == "hung")
        else:
            self._metrics.transaction("aborted")
        self._emit(AuditEvent(event_type="transaction_aborted", outcome="aborted", reason=kind,
                              details={"error": message[:500]}))
        await self._processor.on_abort()
        await self._rewind_until_done()
        self._rewound_alignment()
        self._lag_start.clear()
        await asyncio.sleep(min(0.05 * 2 ** min(self._failures, 7), 5.0))

    async def _restart_producer(self, *, abandon: bool = False) -> None:
        """Replace the producer.

        The old one is closed first - never two producers with our transactional id alive at
        once - unless it is `abandon`ed in a hung call (then the new one's `init_transactions`
        fences it).
        """
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < PRODUCER_RESTART_WINDOW_S] + [now]
        if len(self._restarts) > MAX_PRODUCER_RESTARTS:
            raise LoopFatalError(f"producer failed fatally {len(self._restarts)} times "
                                 f"within {PRODUCER_RESTART_WINDOW_S:.0f}s")
        old, runner = self._producer, self._runner
        self._producer = self._runner = None
        if old is not None and runner is not None:
            if not abandon:
                try:
                    await asyncio.to_thread(runner.call, functools.partial(_close_producer, old),
                                            TXN_CALL_DEADLINE_S)
                except concurrent.futures.TimeoutError:
                    abandon = True
            if abandon:
                self._abandoned.append((old, runner))
                self._metrics.abandoned()
                log.warning("producer abandoned in a hung call", service=self._service,
                            transactional_id=self._transactional_id, abandoned=len(self._abandoned))
            else:
                runner.stop()
        del old
        try:
            self._producer = await _PRODUCER_RETRY.run_async(
                lambda: self._beating(asyncio.to_thread(self._new_producer)),
                log_fields={"service": self._service})
        except (_CycleFailed, KafkaException) as exc:
            raise LoopFatalError(f"producer could not be recreated: {exc}") from exc
        log.info("producer recreated", service=self._service, transactional_id=self._transactional_id)

    async def _rewind_until_done(self) -> None:
        """`_rewind`, retried while the broker cannot tell the committed offsets (e.g. restarting).

        The cycle cannot go on without them; giving up would exit the process for a condition that
        passes by itself. `/live` stays up meanwhile; after `REWIND_ATTEMPTS` the loop gives up.
        """
        async def resolve_group() -> None:
            if self._exactly_once:
                # committed offsets that never become readable: an open offset commit of a
                # transaction whose marker a broker restart lost
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._hanging.resolve_group, self._settings.group_id)

        try:
            await _REWIND_RETRY.run_async(lambda: self._beating(asyncio.to_thread(self._rewind)),
                                          between=resolve_group, log_fields={"service": self._service})
        except _CycleFailed as exc:
            # a consumer whose committed() keeps timing out against a healthy broker (seen after
            # broker restarts): a new consumer starts from the committed offsets by itself
            raise _ConsumerFailed(f"cannot rewind to the committed offsets: {exc}") from exc

    def _rewind(self) -> None:
        """Seek every assigned partition back to its committed offset (the start of the failed cycle).

        With a rebalance pending (served during a keep-alive poll) there is nothing to rewind: the
        new assignment starts from the committed offsets.
        """
        consumer = self._c
        if not self._assigned or self._events:
            return
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        committed = self._retry(lambda: consumer.committed(tps, timeout=REWIND_COMMITTED_TIMEOUT_S),
                                "committed")
        targets = [
            TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in committed
        ]
        self._seek(targets)

    def _seek(self, targets: list[TopicPartition]) -> None:
        consumer = self._c
        for tp in targets:
            try:
                _SEEK_RETRY.run(functools.partial(consumer.seek, tp))
            except KafkaException as exc:
                raise LoopFatalError(f"cannot rewind {tp.topic}[{tp.partition}]: {exc}") from exc

    # ---- rebalance ----------------------------------------------------------------------------

    async def _handle_rebalance(self, msgs: list[Message], seen: dict[TP, int] | None = None) -> None:
        """Apply the rebalance events served by the last consume call.

        `seen`: first offset per partition of the records the cycle took out of the consumer or the
        held records (alignment) before the rebalance; like `msgs`, they are read again.
        """
        consumer = self._c
        events, self._events = self._events, []
        self._group_metadata = None
        first_seen: dict[TP, int] = self._drop_held(seen)
        for msg in msgs:
            err = msg.error()
            if err is not None and (err.fatal() or err.code() == KafkaError._FATAL):
                # a fatal consumer error that arrived with the rebalance (e.g. static member fenced)
                raise _ConsumerFailed(f"consumer failed: {err}")
            topic, partition = msg.topic(), msg.partition()
            if msg.error() is None and topic is not None and partition is not None:
                first_seen.setdefault((topic, partition), msg.offset() or 0)
        fresh: set[TP] = set()
        for kind, parts in events:
            self._metrics.rebalance(kind)
            self._emit(lifecycle_event("rebalance", change=kind, partitions=[f"{t}[{p}]" for t, p in parts]))
            log.info("partitions " + kind, service=self._service, partitions=parts)
            self._forget_alignment(parts)
            for tp in parts:
                self._lag_start.pop(tp, None)
            if kind == "assign":
                fresh.update(parts)
                await self._beating(self._processor.on_assign(parts))
                self._assigned.update(parts)
            else:
                self._assigned.difference_update(parts)
                fresh.difference_update(parts)
                self._metrics.forget_lag(parts)
                await self._processor.on_revoke(parts)
        # Records fetched before the rebalance are dropped; a partition that stayed assigned goes back.
        back = [TopicPartition(t, p, off) for (t, p), off in first_seen.items()
                if (t, p) in self._assigned and (t, p) not in fresh]
        if back:
            await asyncio.to_thread(self._seek, back)
        if fresh and self._alignment is not None:
            self._alignment.assigned(fresh)
        if fresh:
            await asyncio.to_thread(consumer.resume, [TopicPartition(t, p) for t, p in sorted(fresh)])
        self._listener.assigned(frozenset(self._assigned))

    # ---- hanging transactions, liveness while waiting -----------------------------------------

    async def _check_hanging(self) -> None:
        """Resolve hanging transactions on the assigned input partitions; report them in /health."""
        try:
            by_topic: dict[str, list[int]] = {}
            for topic, partition in sorted(self._assigned):
                by_topic.setdefault(topic, []).append(partition)
            found = []
            for topic, parts in by_topic.items():
                found += await asyncio.to_thread(self._hanging.resolve, topic, parts)
            # the group's committed offsets: a transaction's offset commit left open there blocks the
            # rewind after every rolled-back cycle
            found += await asyncio.to_thread(self._hanging.resolve_group, self._settings.group_id)
            report = getattr(self._listener, "report", None)
            if report is not None:
                if found:
                    report("kafka_transactions", False, "; ".join(t.describe() for t in found)[:500],
                           critical=False)
                else:
                    report("kafka_transactions", True, critical=False)
        except Exception as exc:
            log.info("hanging transaction check failed", service=self._service, error=str(exc))
        finally:
            self._hanging_task = None

    async def _beating(self, step: Awaitable[T]) -> T:
        """Await `step` (a restore, a transactional call with its own deadline) keeping `/live` up."""
        task = asyncio.ensure_future(step)
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return task.result()
            self._heartbeat()

    # ---- slow steps: keep the group membership while consumption is paused ---------------------

    async def _guarded(self, step: Awaitable[T], what: str) -> T:
        """Await a processor step; when it is slow, pause consumption and keep polling.

        A slow sink (in `before_commit`) or transform must not cost the group membership
        (`max.poll.interval.ms`): after a third of that interval the assigned partitions are paused
        and the consumer is polled periodically (no records are delivered while paused) until the
        step finishes, then they are resumed. A rebalance served meanwhile makes the transaction's
        offset commit fail (stale generation), which rolls the cycle back as usual. The step is
        awaited directly and the keep-alive is a timer (a step that ends in time costs no task).
        """
        interval = min(self._opts.max_poll_interval_ms / 3000, KEEPALIVE_MAX_S)
        finished = asyncio.Event()
        keeper: asyncio.Task[None] | None = None

        def slow() -> None:
            nonlocal keeper
            keeper = asyncio.create_task(self._keep_membership(what, interval, finished))

        timer = asyncio.get_running_loop().call_later(interval, slow)
        try:
            return await step
        finally:
            timer.cancel()
            if keeper is not None:
                finished.set()
                await keeper

    async def _keep_membership(self, what: str, interval: float, finished: asyncio.Event) -> None:
        """`_guarded`'s keep-alive: pause, poll every `interval` until `finished`, resume.

        The partitions the alignment holds paused in the client stay paused.
        """
        paused: list[TopicPartition] = []
        try:
            if self._assigned:
                paused = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
                await asyncio.to_thread(self._c.pause, paused)
                self.paused_for_slow_steps += 1
                log.info("slow step: consumption paused", service=self._service, step=what,
                         partitions=len(paused))
            while not finished.is_set():
                await asyncio.to_thread(self._keepalive_poll)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), interval)
        finally:
            resume = self._not_held(paused)
            if resume and not self._events:
                with contextlib.suppress(KafkaException):
                    await asyncio.to_thread(self._c.resume, resume)

    def _keepalive_poll(self) -> None:
        msg = self._c.poll(0)
        if msg is None:
            return
        err = msg.error()
        if err is not None:
            if err.fatal() or err.code() == KafkaError._FATAL:
                self._consumer_fatal = err  # raised by the next cycle
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        if topic is not None and partition is not None and offset is not None:
            # Not expected while paused; put it back so the next cycle reads it again.
            with contextlib.suppress(KafkaException):
                self._c.seek(TopicPartition(topic, partition, offset))

    # ---- event-time alignment of input partitions (dataproc_shared.kafka.alignment) -----------

    async def _align(self, reached: dict[TP, int], offsets: dict[TP, int]) -> None:
        """Take the processor's event times and hold/release partitions per the alignment.

        A held partition is not paused in the client (that would purge its prefetched records): its
        records are kept by `HeldRecords` as they are consumed (`_consume_aligned`). Offsets to
        commit always come from the batch, so they never pass a held record.
        """
        alignment = self._alignment
        if alignment is None:
            return
        alignment.report(reached, offsets)
        if not self._events and alignment.needs_check(self._assigned):
            await asyncio.to_thread(self._apply_alignment, alignment)
        self._metrics.alignment(alignment, self._held)

    def _apply_alignment(self, alignment: Alignment) -> None:
        decision = alignment.decide(self._waiting(), time.monotonic_ns())
        if decision.pause or decision.resume:
            log.debug("alignment", service=self._service, held=sorted(decision.pause),
                      released=sorted(decision.resume))

    def _holding(self) -> bool:
        """Whether the cycle uses `_consume_aligned`: while the alignment holds partitions or records.

        Shares alone (two or more partitions waiting, nothing held) do not need it: the batch is
        consumed as usual and cut to the shares only where it breaks one (`_cut_to_shares`).
        """
        alignment, held = self._alignment, self._held
        return alignment is not None and held is not None and (bool(alignment.paused) or held.active())

    def _consume_aligned(self, consumer: Consumer) -> tuple[_Batch, dict[TP, int]]:
        """The cycle's input while the alignment holds partitions or records (worker thread).

        First the held records of released partitions (up to `batch_size`), then consumed records
        (`_fill`). With two or more partitions waiting the batch is built to their shares
        (`Alignment.quotas`): the partitions without one are held, whatever the holds say.

        Returns the batch and, per partition, the first offset the cycle took out of the consumer
        or the held records (for `_handle_rebalance` when a consume call served a rebalance).
        """
        alignment, held = self._alignment, self._held
        if alignment is None or held is None:
            return _Batch(), {}
        size = self._opts.batch_size
        quotas = alignment.quotas(size)
        quota = Quota(quotas) if quotas else None
        holding: Collection[TP] = quota.closed() if quota is not None else alignment.paused
        records = held.release(holding, size, quota)
        seen: dict[TP, int] = {}
        for rec in records:
            seen.setdefault((rec.topic, rec.partition), rec.offset)
        self._fill(consumer, held, records, seen, holding, quota,
                   0.0 if records else self._opts.batch_timeout_ms / 1000)
        self._apply_hold_bounds(consumer, held)
        return _Batch.of(records), seen

    def _cut_to_shares(self, consumer: Consumer, batch: _Batch,
                       consumed: int) -> tuple[_Batch, dict[TP, int]]:
        """A batch consumed as usual while two or more partitions wait, cut to their shares where needed.

        Within every share (`Alignment.cut`; with a live feed the common case: the batch holds every
        record fetched) it stays as it is, which is what building it to the shares would give. Else
        the records past a partition's share go to `HeldRecords` and, when the consumer handed out
        all that was asked for (`consumed` messages), the batch is filled up without waiting, as
        `_consume_aligned` does. Returns the batch and the first offset taken per partition.
        """
        alignment, held = self._alignment, self._held
        if alignment is None or held is None:
            return batch, {}
        size = self._opts.batch_size
        quotas = alignment.cut(size, batch.first, batch.last)
        if quotas is None:
            return batch, {}
        quota = Quota(quotas)
        holding = quota.closed()
        seen = dict(batch.first)
        records = held.route(batch.records, holding, quota)
        if consumed >= size:
            self._fill(consumer, held, records, seen, holding, quota, 0.0)
        self._apply_hold_bounds(consumer, held)
        return _Batch.of(records), seen

    def _fill(self, consumer: Consumer, held: HeldRecords, records: list[InRecord], seen: dict[TP, int],
              holding: Collection[TP], quota: Quota | None, timeout: float) -> None:
        """Consume into `records` up to `batch_size`, keeping back in `held` what must wait.

        Kept: records of `holding`, of partitions with earlier records held, past their `quota`.
        `timeout` is the wait for the first record (0: none). While the batch is not full and the
        consumer handed out all that was asked for, it is asked again without waiting, so held
        records do not shrink the batch. A partition whose held records pass the bound is paused in
        the client (at once, so its prefetch stops filling the buffer) and resumed once they are
        below half of it. `seen` gets the first offset consumed per partition.
        """
        size = self._opts.batch_size
        while len(records) < size and not self._events:
            want = 1 if timeout else size - len(records)
            msgs: list[Message] = consumer.consume(want, timeout)
            timeout = 0.0
            fresh = self._to_batch(msgs).records
            for rec in fresh:
                seen.setdefault((rec.topic, rec.partition), rec.offset)
            records += held.route(fresh, holding, quota)
            self._apply_hold_bounds(consumer, held)
            if len(msgs) < want:
                break

    def _apply_hold_bounds(self, consumer: Consumer, held: HeldRecords) -> None:
        pause, resume = held.bound_changes()
        try:
            if pause:
                consumer.pause([TopicPartition(t, p) for t, p in sorted(pause)])
            if resume:
                consumer.resume([TopicPartition(t, p) for t, p in sorted(resume)])
        except KafkaException as exc:
            # A partition that is going away with a rebalance the next consume serves; the
            # rebalance forgets its alignment state.
            log.info("alignment: pause/resume failed", service=self._service, error=str(exc))
        if pause:
            log.debug("alignment: held records over the bound, partitions paused", service=self._service,
                      partitions=sorted(pause), held=len(held))

    def _drop_held(self, seen: dict[TP, int] | None) -> dict[TP, int]:
        """Forget every held record; the lowest offset per partition among them and `seen`."""
        first = dict(seen or {})
        if self._held is not None:
            for tp, offset in self._held.drop().items():
                first[tp] = min(offset, first.get(tp, offset))
        return first

    def _waiting(self) -> set[TP]:
        """Assigned partitions with records waiting: cached high watermark above the position.

        The cached high watermark is the one of the last fetch response (no broker round trip). A
        partition not consumed yet has no position: its committed offset stands in (looked up once).
        A partition without a fetch response yet counts as waiting until it has an event time.
        """
        consumer = self._c
        waiting: set[TP] = set()
        if not self._assigned:
            return waiting
        try:
            for tp in consumer.position([TopicPartition(t, p) for t, p in sorted(self._assigned)]):
                key = (tp.topic, tp.partition)
                wm = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
                if wm is None or wm[1] < 0:
                    # not fetched yet: waiting until it has reported (or its first fetch says empty)
                    if self._alignment is not None and key not in self._alignment.event_ns:
                        waiting.add(key)
                    continue
                low, high = wm
                position = tp.offset if tp.offset >= 0 else self._start_offset(key, low)
                if high > position:
                    waiting.add(key)
        except KafkaException as exc:
            log.info("alignment: position look-up failed", service=self._service, error=str(exc))
        if self._held is not None:
            waiting |= self._held.waiting()
        return waiting

    def _start_offset(self, tp: TP, low: int) -> int:
        """Committed offset of a partition not consumed since its assignment (else `low`)."""
        start = self._align_start.get(tp)
        if start is None:
            committed = self._c.committed([TopicPartition(*tp)], timeout=ALIGN_LOOKUP_TIMEOUT_S)
            start = committed[0].offset if committed and committed[0].offset >= 0 else low
            self._align_start[tp] = start
        return max(start, low)

    def _forget_alignment(self, parts: list[TP]) -> None:
        if self._alignment is not None:
            self._alignment.forget(parts)
            if self._held is not None:
                self._held.forget(parts)
            for tp in parts:
                self._align_start.pop(tp, None)
            self._metrics.alignment(self._alignment, self._held)

    def _rewound_alignment(self) -> None:
        """After a rewind to the committed offsets: the held records are dropped (they are read again).

        With a rebalance pending, `_rewind` did not seek: the held records stay for
        `_handle_rebalance`, which drops them and seeks back the partitions that stay assigned.
        """
        if self._alignment is not None:
            self._alignment.rewound()
            self._align_start.clear()
            if self._held is not None and not self._events:
                self._held.drop()

    def _not_held(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        """`tps` without the partitions paused in the client for the alignment (too many held)."""
        if self._held is None or not self._held.paused:
            return tps
        held = self._held.paused
        return [tp for tp in tps if (tp.topic, tp.partition) not in held]

    # ---- backpressure, lag --------------------------------------------------------------------

    async def _backpressure(self) -> None:
        producer, consumer = self._p, self._c
        if len(producer) <= self._opts.pause_records:
            return
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        log.info("pausing consumption: producer queue full", service=self._service, queued=len(producer))
        await asyncio.to_thread(consumer.pause, tps)
        try:
            while len(producer) > self._opts.resume_records:
                await asyncio.to_thread(producer.poll, 0.1)
                self._heartbeat()
        finally:
            await asyncio.to_thread(consumer.resume, self._not_held(tps))

    def _lag_start_offset(self, tp: TP, low: int) -> int:
        """Where a partition not consumed since its assignment stands: its committed offset.

        librdkafka reports no position (-1001) until a partition's first record is consumed. A
        partition whose records were all processed before the assignment (a restart, a rebalance,
        a replaced consumer) would otherwise show its whole length as lag (from the low
        watermark), for as long as nothing new arrives - the broker-profile "stall" of seed 3 that
        was a lag of 14 on a fully processed raw partition. Looked up once per assignment.
        """
        start = self._lag_start.get(tp)
        if start is None:
            committed = self._c.committed([TopicPartition(*tp)], timeout=LAG_LOOKUP_TIMEOUT_S)
            start = committed[0].offset if committed and committed[0].offset >= 0 else -1
            self._lag_start[tp] = start
        return max(start, low)

    def _update_lag(self) -> dict[tuple[str, int], int]:
        """Refresh `dp_consumer_lag`; returns the lag of every assigned partition it could tell."""
        consumer = self._c
        lags: dict[tuple[str, int], int] = {}
        if not self._assigned:
            return lags
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in sorted(self._assigned)])
            for tp in positions:
                # Cached: the high watermark of the last fetch response, no broker round trip.
                wm = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
                if wm is None:
                    continue
                low, high = wm
                pos = tp.offset if tp.offset >= 0 else self._lag_start_offset((tp.topic, tp.partition), low)
                if high >= 0 and pos >= 0:
                    lags[(tp.topic, tp.partition)] = max(0, high - pos)
                    self._metrics.lag(tp.topic, tp.partition, max(0, high - pos))
        except KafkaException as exc:
            log.info("lag update failed", service=self._service, error=str(exc))
        return lags

    # ---- shutdown -----------------------------------------------------------------------------

    def _emit(self, event: AuditEvent) -> None:
        if self._audit is not None:
            self._audit.emit(event)

    async def _close(self) -> None:
        consumer, producer = self._consumer, self._producer
        if self._hanging_task is not None:
            self._hanging_task.cancel()
        if producer is not None:
            await asyncio.to_thread(producer.flush, 10.0)
        if self._runner is not None:
            self._runner.stop()
        if consumer is not None:
            # close() serves the final revocation; the processor hears about it after.
            await asyncio.to_thread(consumer.close)
            if self._assigned:
                parts = sorted(self._assigned)
                self._assigned.clear()
                await self._processor.on_revoke(parts)
            self._events.clear()
        self._listener.assigned(frozenset())
        self._emit(lifecycle_event("stop", committed_cycles=self.committed_cycles))
        log.info("loop stopped", service=self._service, committed_cycles=self.committed_cycles)


@dataclass(slots=True)
class _Produced:
    """What one cycle produced, for metrics and audit after the commit."""

    audit_in_txn: bool
    outputs: list[OutRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    deduplicated: int = 0


class _Metrics:
    """The loop's recording calls on `ServiceMetrics`."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._m = metrics
        self._steps: dict[str, Any] = {}
        # children recorded every cycle, looked up once (`ServiceMetrics.child` sorts the labels)
        m = metrics
        self._committed = m.child(m.transactions, outcome="committed")
        self._batch_size = m.child(m.batch_size)
        self._processing = m.child(m.processing_seconds)
        self._ingest = m.child(m.ingest_latency)
        self._event = m.child(m.event_latency)
        self._heartbeat = m.child(m.loop_last_tick)
        self._align_paused = m.child(m.alignment_paused)
        self._align_held = m.child(m.alignment_held_records)
        self._align_counters = {
            "pauses": m.child(m.alignment_pauses), "guard_resumes": m.child(m.alignment_guard_resumes),
            "shared": m.child(m.alignment_shared_batches), "whole": m.child(m.alignment_whole_batches),
            "client_pauses": m.child(m.alignment_client_pauses)}
        #: the values last exported of `Alignment`'s and `HeldRecords`' counts
        self._align_seen: dict[str, int] = {}
        self._in: dict[str, Any] = {}
        self._out: dict[str, Any] = {}

    def step(self, name: str, seconds: float) -> None:
        """Wall time of one step of a cycle (`dp_cycle_step_seconds`)."""
        child = self._steps.get(name)
        if child is None:
            child = self._steps[name] = self._m.child(self._m.cycle_step_seconds, step=name)
        child.observe(seconds)

    def consumed(self, records: list[InRecord]) -> None:
        counts: dict[str, int] = {}
        for rec in records:
            counts[rec.topic] = counts.get(rec.topic, 0) + 1
        for topic, n in counts.items():
            child = self._in.get(topic)
            if child is None:
                child = self._in[topic] = self._m.child(self._m.messages_in, topic=topic)
            child.inc(n)

    def committed(self, batch: _Batch, produced: _Produced, seconds: float, now_s: float) -> None:
        m = self._m
        self._committed.inc()
        if batch.records:
            self._batch_size.observe(len(batch.records))
            self._processing.observe(seconds)
        per_topic: dict[str, int] = {}
        ingest: list[bytes] = []
        event: list[bytes] = []
        for out in produced.outputs:
            topic = out.topic
            per_topic[topic] = per_topic.get(topic, 0) + 1
            for name, value in out.headers:
                if name == INGEST_TIME_HEADER:
                    ingest.append(value)
                elif name == EVENT_TIME_HEADER:
                    event.append(value)
        now_ns = int(now_s * 1e9)
        if ingest:
            observe_many(self._ingest, _seconds_since(now_ns, ingest))
        if event:
            observe_many(self._event, _seconds_since(now_ns, event))
        for topic, n in per_topic.items():
            child = self._out.get(topic)
            if child is None:
                child = self._out[topic] = m.child(m.messages_out, topic=topic)
            child.inc(n)
        for dl in produced.dead_letters:
            m.record_dead_letter(str(dl.reason))
        m.record_duplicates(produced.deduplicated)

    def transaction(self, outcome: str) -> None:
        self._m.record_transaction(outcome)

    def rebalance(self, kind: str) -> None:
        self._m.record_rebalance(kind)

    def alignment(self, alignment: Alignment, held: HeldRecords | None) -> None:
        """The alignment's state and counts (`dp_alignment_*`): gauges set, counters advanced."""
        seen = self._align_seen
        counts = (("pauses", alignment.pauses), ("guard_resumes", alignment.guard_resumes),
                  ("shared", alignment.shared_batches), ("whole", alignment.whole_batches),
                  ("client_pauses", held.client_pauses if held is not None else 0))
        for name, value in counts:
            if value != seen.get(name, 0):
                self._align_counters[name].inc(value - seen.get(name, 0))
                seen[name] = value
        paused, held_records = len(alignment.paused), len(held) if held is not None else 0
        if (paused, held_records) != (seen.get("paused"), seen.get("held")):
            self._align_paused.set(paused)
            self._align_held.set(held_records)
            seen["paused"], seen["held"] = paused, held_records

    def lag(self, topic: str, partition: int, lag: int) -> None:
        self._m.set_lag(topic, partition, lag)

    def forget_lag(self, parts: list[TP]) -> None:
        for topic, partition in parts:
            with contextlib.suppress(KeyError):
                self._m.forget_partition(topic, partition)

    def abandoned(self) -> None:
        self._m.record_abandoned_producer()

    def tick(self, now_s: float) -> None:
        self._heartbeat.set(now_s)


def _close_producer(producer: Producer) -> None:
    """Drop what a failed producer still holds and close it (before a new one takes its id).

    A producer in a fatal state may raise from any of these calls; closing goes on regardless. The
    client's warnings meanwhile (`close` warns when the open transaction cannot be aborted) are
    logged, never raised, whatever the process's warning filters say (where warnings are errors,
    the client would fail the call with a SystemError). The warning filters are process-wide:
    another thread's warning issued during these calls is logged here too.
    """
    for step in (producer.purge, lambda: producer.flush(0), producer.close):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                step()
            except (KafkaException, RuntimeError) as exc:
                log.info("closing a failed producer", error=str(exc), cause=repr(exc.__cause__))
        for warning in caught:
            log.warning("closing a failed producer: client warning", category=warning.category.__name__,
                        warning=str(warning.message))


def _seconds_since(now_ns: int, raws: list[bytes]) -> list[float]:
    """Seconds from each header value (epoch ns as ASCII) to `now_ns`, >= 0; unparsable ones skipped."""
    seconds = []
    for raw in raws:
        try:
            then = int(raw)
        except ValueError:
            continue
        seconds.append(max(0.0, (now_ns - then) / 1e9))
    return seconds
