"""Wiring of the enrichment service: the `Processor` the Kafka loop drives, around the pure transform.

`EnrichmentProcessor.process` joins a batch with the reference cache. When a record misses a cache
that is not current (PostgreSQL unreachable) the batch is held inside `process`: nothing of it is
produced or committed, no further input is consumed, and it is re-evaluated as soon as the cache is
current again. A shutdown meanwhile cancels the wait: the held batch was never committed, so it is
consumed again after the restart. Reference changes applied to the cache are counted and audited;
their audit events leave with the next batch or idle tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog
from dataproc_shared.errors import ConfigError
from dataproc_shared.kafka.loop import EVENT_TIME_HEADER
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import AuditEvent, BatchResult, InRecord
from dataproc_shared.service import ServiceContext

from enrichment.codec import TickCodec
from enrichment.refstore import ReferenceStore
from enrichment.settings import EnrichmentSettings
from enrichment.transform import AppliedChange, Enricher, Hold, ReferenceCache, RefTable

log = structlog.get_logger(__name__)


class ReferenceSource(Protocol):
    """What the processor needs of the reference store (`ReferenceStore` implements it)."""

    @property
    def cache(self) -> ReferenceCache:
        """The cache to enrich from."""
        ...

    @property
    def current(self) -> bool:
        """Whether a miss can be trusted."""
        ...

    async def wait_current(self, within_s: float | None = None) -> bool:
        """Wait until the cache is current; False when `within_s` passed first."""
        ...


class ReferenceMetrics(Protocol):
    """The service's reference-data metrics (`dp_reference_cache_size`, `dp_reference_changes_total`)."""

    def cache_size(self, table: str, rows: int) -> None:
        """Set the number of cached rows of `table`."""

    def change_applied(self, table: str, op: str) -> None:
        """Count one change applied to the cache."""

    def held(self, seconds: float) -> None:
        """A batch waited `seconds` for the reference database."""


class NoMetrics:
    """`ReferenceMetrics` that records nothing (unit tests)."""

    def cache_size(self, table: str, rows: int) -> None:
        """Do nothing."""

    def change_applied(self, table: str, op: str) -> None:
        """Do nothing."""

    def held(self, seconds: float) -> None:
        """Do nothing."""


class ServiceReferenceMetrics:
    """`ReferenceMetrics` on the service's `ServiceMetrics` registry."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._m = metrics
        self._held = metrics.histogram(
            "dp_enrichment_held_seconds", "Time a batch waited for the reference database (enrichment)."
        )

    def cache_size(self, table: str, rows: int) -> None:
        """Set `dp_reference_cache_size{table}`."""
        self._m.child(self._m.reference_cache_size, table=table).set(rows)

    def change_applied(self, table: str, op: str) -> None:
        """Count one change in `dp_reference_changes_total{table, op}`."""
        self._m.child(self._m.reference_changes, table=table, op=op).inc()

    def held(self, seconds: float) -> None:
        """Observe one held batch in `dp_enrichment_held_seconds`."""
        self._m.child(self._held).observe(seconds)


class EnrichmentProcessor:
    """The enrichment `Processor`: reference store + enricher + held batches + change audit."""

    def __init__(
        self,
        settings: EnrichmentSettings,
        store: ReferenceSource,
        *,
        metrics: ReferenceMetrics | None = None,
        heartbeat: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`heartbeat` is called while a batch is held: the loop waits on purpose, it is not stalled."""
        self._settings = settings
        self._store = store
        self._metrics = metrics or NoMetrics()
        self._heartbeat = heartbeat
        self._monotonic = monotonic
        self._codec = TickCodec()
        self._enricher = Enricher(
            store.cache,
            output_topic=settings.topics.enriched,
            decode=self._codec.read,
            encode=self._codec.encode,
            event_time_header=EVENT_TIME_HEADER,
        )
        self._pending_audit: list[AuditEvent] = []
        # audit events handed to the loop in the current cycle / in the cycle being committed:
        # an aborted cycle puts them back, so each reference change is audited by a committed cycle
        self._in_flight: list[AuditEvent] = []
        self._committing: list[AuditEvent] = []

    def on_changes(self, changes: list[AppliedChange], source: str) -> None:
        """Count and audit changes applied to the cache (the store's change listener)."""
        cache = self._store.cache
        if source == "initial":
            self._pending_audit.append(
                AuditEvent(
                    event_type="reference_loaded",
                    details={"venues": cache.venue_count, "instruments": cache.instrument_count},
                )
            )
        else:
            for change in changes:
                self._metrics.change_applied(change.table.value, change.op.value)
            self._pending_audit.extend(self._enricher.audit_changes(changes, source=source))
        self._update_sizes(cache)

    def _update_sizes(self, cache: ReferenceCache) -> None:
        self._metrics.cache_size(RefTable.VENUES.value, cache.venue_count)
        self._metrics.cache_size(RefTable.INSTRUMENTS.value, cache.instrument_count)

    # ---- Processor ----------------------------------------------------------------------------

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """Nothing to restore: the service keeps no per-partition state."""

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Nothing to hand over."""

    async def process(self, batch: list[InRecord]) -> BatchResult:
        """Enrich `batch`; hold it while a record cannot be decided (reference database unreachable)."""
        self._committing = []  # the previous cycle committed (an abort would have re-queued them)
        started: float | None = None
        while True:
            outcome = self._enricher.enrich(batch, cache_current=self._store.current)
            if not isinstance(outcome, Hold):
                break
            if started is None:
                started = self._monotonic()
                first = outcome.first
                log.warning(
                    "batch held: reference data not current",
                    topic=first.topic,
                    partition=first.partition,
                    offset=first.offset,
                    waiting=len(outcome.waiting),
                    batch=len(batch),
                )
            await self._store.wait_current(self._settings.enrichment.hold_slice_s)
            if self._heartbeat is not None:
                self._heartbeat()
        if started is not None:
            waited = self._monotonic() - started
            self._metrics.held(waited)
            log.info("held batch released", waited_s=round(waited, 3), batch=len(batch))
        outcome.audit.extend(self._drain_audit())
        return outcome

    async def on_tick(self) -> BatchResult:
        """Hand over audit events of reference changes that arrived while idle."""
        return BatchResult(audit=self._drain_audit())

    async def before_commit(self) -> BatchResult:
        """No external sink; the cycle's audit events are now being committed."""
        self._committing.extend(self._in_flight)
        self._in_flight = []
        return BatchResult()

    async def on_abort(self) -> None:
        """No tick state to forget; audit events of the aborted cycle go out again with the next one."""
        self._pending_audit = [*self._committing, *self._in_flight, *self._pending_audit]
        self._committing = []
        self._in_flight = []

    def _drain_audit(self) -> list[AuditEvent]:
        events, self._pending_audit = self._pending_audit, []
        self._in_flight.extend(events)
        return events


async def build_processor(context: ServiceContext) -> EnrichmentProcessor:
    """The processor factory of `run_service`: reference store, health checks, metrics, processor.

    Readiness waits for the first load of the cache (dependency `reference_cache`, critical); the
    PostgreSQL connection itself is a non-critical dependency (`postgres`): while it is down the
    service keeps serving from the cache and reports `degraded`.
    """
    settings = context.settings
    if not isinstance(settings, EnrichmentSettings):
        raise TypeError("enrichment needs EnrichmentSettings")
    if settings.postgres_dsn is None:
        raise ConfigError("DATA_PROC_POSTGRES_DSN: required by the enrichment service")
    store = ReferenceStore(
        settings.postgres_dsn.get_secret_value(),
        ReferenceCache(),
        options=settings.enrichment.store_options(),
    )
    processor = EnrichmentProcessor(
        settings,
        store,
        metrics=ServiceReferenceMetrics(context.metrics),
        heartbeat=context.health.heartbeat,
    )
    store.set_listener(processor.on_changes)
    await context.exit_stack.enter_async_context(store)

    async def cache_loaded() -> None:
        if not store.loaded:
            raise RuntimeError("reference data not loaded yet")

    async def postgres_connected() -> None:
        status = store.status()
        if not status.connected:
            raise RuntimeError(f"reference database unreachable ({status.last_error or 'connecting'})")

    context.health.add_check("reference_cache", cache_loaded, critical=True, interval_s=0.5)
    context.health.add_check("postgres", postgres_connected, critical=False, interval_s=1.0)
    return processor
