"""The Prometheus metrics of a service (`docs/metrics.md`), in one registry per service.

The runtime creates one `ServiceMetrics` per process and hands it to the loop, the sinks, the audit
emitter, the health server and the service's own code. Every metric carries the `service` label,
filled in here; other labels are bounded (topic, partition, reason, interval, ... never an
instrument id). A service adds its own metrics through `counter`, `gauge` and `histogram`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

#: Latency buckets in seconds, 1 ms to 60 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Buckets of one step of the loop's cycle, in seconds, 0.1 ms to 10 s.
STEP_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
#: Records-per-batch buckets.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000)
#: Content type of `ServiceMetrics.render()`.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Every metric of `docs/metrics.md` for one service, registered in its own registry."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series double the series count and no dashboard uses them (process-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.service = service
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}

        c, g, h = self.counter, self.gauge, self.histogram
        self.messages_in = c("dp_messages_in_total", "Records consumed.", ["topic"])
        self.messages_out = c("dp_messages_out_total", "Records produced (committed batches).", ["topic"])
        self.dead_letters = c("dp_dead_letters_total", "Records dead-lettered.", ["reason"])
        self.duplicates = c("dp_duplicates_total", "Records dropped as duplicates.")
        self.batch_size = h("dp_batch_size", "Records per processed batch.", buckets=BATCH_SIZE_BUCKETS)
        self.cycle_step_seconds = h(
            "dp_cycle_step_seconds", "Wall time of one step of a loop cycle (consume wait, process, "
            "produce, before_commit, send_offsets, commit).", ["step"], buckets=STEP_BUCKETS)
        self.processing_seconds = h(
            "dp_processing_seconds", "Wall time to process one batch (transform + produce + commit)."
        )
        self.event_latency = h("dp_event_latency_seconds", "Now minus the record's event time, at output.")
        self.ingest_latency = h(
            "dp_ingest_latency_seconds",
            "Now minus the raw record's ingest time (end-to-end so far), at output.",
        )
        self.consumer_lag = g("dp_consumer_lag", "High watermark minus position.", ["topic", "partition"])
        self.transactions = c("dp_transactions_total", "Kafka transactions / commits.", ["outcome"])
        self.hanging_transactions = c(
            "dp_hanging_transactions_total",
            "Hanging transactions found on a needed partition, by action (commit/abort marker written, "
            "left to its coordinator, failed).", ["action"])
        self.abandoned_producers = c(
            "dp_abandoned_producers_total",
            "Transactional producers abandoned because a transactional call exceeded its deadline.")
        self.rebalances = c("dp_rebalances_total", "Partition rebalances.", ["kind"])
        self.alignment_paused = g(
            "dp_alignment_paused_partitions", "Input partitions paused by event-time alignment."
        )
        self.alignment_pauses = c(
            "dp_alignment_pauses_total", "Input partitions paused by event-time alignment (each pause)."
        )
        self.alignment_guard_resumes = c(
            "dp_alignment_guard_resumes_total", "Alignment holds ended by the starvation guard.")
        self.alignment_shared_batches = c(
            "dp_alignment_shared_batches_total",
            "Batches built to or cut to the event-time alignment's shares of the waiting partitions.")
        self.alignment_whole_batches = c(
            "dp_alignment_whole_batches_total",
            "Batches with two or more input partitions waiting taken whole (each within its share).")
        self.alignment_held_records = g(
            "dp_alignment_held_records", "Input records kept back by event-time alignment.")
        self.alignment_client_pauses = c(
            "dp_alignment_client_pauses_total",
            "Input partitions paused in the Kafka client because the records held of them passed the bound.")
        self.audit_queue_depth = g("dp_audit_queue_depth", "Audit events waiting.")
        self.audit_dropped = c("dp_audit_dropped_total", "Audit events dropped because the queue was full.")
        self.audit_written = c("dp_audit_written_total", "Audit events written per sink.", ["sink"])
        self.audit_sink_dropped = c(
            "dp_audit_sink_dropped_total",
            "Audit events a sink dropped: their delivery failed and its retry buffer was full.", ["sink"])
        self.dependency_up = g("dp_dependency_up", "1 when the dependency answers, else 0.", ["dependency"])
        self.loop_last_tick = g(
            "dp_loop_last_tick_timestamp_seconds", "Last time the processing loop ticked."
        )
        self.late_trades = c(
            "dp_late_trades_total", "Trades for a closed window (aggregation).", ["interval"]
        )
        self.bars_emitted = c("dp_bars_emitted_total", "Bar emissions (aggregation).", ["interval", "final"])
        self.open_windows = g("dp_open_windows", "Windows held in memory (aggregation).")
        self.clickhouse_rows_written = c(
            "dp_clickhouse_rows_written_total", "Rows inserted into ClickHouse.", ["table"]
        )
        self.redis_writes = c(
            "dp_redis_writes_total", "Projection writes (stale = refused as older).", ["key_type", "outcome"]
        )
        self.reference_cache_size = g("dp_reference_cache_size", "Rows in the enrichment cache.", ["table"])
        self.reference_changes = c(
            "dp_reference_changes_total", "Reference-data changes applied live.", ["table", "op"]
        )

    # ---- defining metrics ------------------------------------------------------------------------------

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter in this service's registry, labelled `service` + `labels`."""
        return Counter(name, documentation, ["service", *labels], registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge in this service's registry, labelled `service` + `labels`."""
        return Gauge(name, documentation, ["service", *labels], registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        """A histogram in this service's registry, labelled `service` + `labels` (latency buckets)."""
        return Histogram(name, documentation, ["service", *labels], registry=self.registry, buckets=buckets)

    def child(self, metric: MetricWrapperBase, **labels: str | int | bool) -> Any:
        """`metric.labels(service=..., **labels)`, cached (cheap on the hot path)."""
        key = (id(metric), tuple(sorted((k, str(v).lower() if isinstance(v, bool) else str(v))
                                        for k, v in labels.items())))
        found = self._children.get(key)
        if found is None:
            found = metric.labels(service=self.service, **dict(key[1]))
            self._children[key] = found
        return found

    # ---- recording (the runtime's hot path) ------------------------------------------------------------

    def record_in(self, topic: str, count: int = 1) -> None:
        """`count` records consumed from `topic`."""
        self.child(self.messages_in, topic=topic).inc(count)

    def record_out(self, topic: str, count: int = 1) -> None:
        """`count` records produced to `topic` in a committed batch."""
        self.child(self.messages_out, topic=topic).inc(count)

    def record_dead_letter(self, reason: str, count: int = 1) -> None:
        """`count` records dead-lettered with `reason`."""
        self.child(self.dead_letters, reason=reason).inc(count)

    def record_duplicates(self, count: int) -> None:
        """`count` records dropped as duplicates."""
        if count:
            self.child(self.duplicates).inc(count)

    def record_batch(self, size: int, seconds: float) -> None:
        """One processed batch of `size` records that took `seconds`."""
        self.child(self.batch_size).observe(size)
        self.child(self.processing_seconds).observe(seconds)

    def record_latencies(
        self, event_ns: int | None, ingest_ns: int | None, now_ns: int | None = None
    ) -> None:
        """Event-time and ingest-time latency of one output record (epoch nanoseconds)."""
        now = time.time_ns() if now_ns is None else now_ns
        if event_ns is not None:
            self.child(self.event_latency).observe(max(0.0, (now - event_ns) / 1e9))
        if ingest_ns is not None:
            self.child(self.ingest_latency).observe(max(0.0, (now - ingest_ns) / 1e9))

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Consumer lag of one assigned partition."""
        self.child(self.consumer_lag, topic=topic, partition=partition).set(lag)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the lag series of a revoked partition."""
        key = (id(self.consumer_lag), tuple(sorted({"topic": topic, "partition": str(partition)}.items())))
        if self._children.pop(key, None) is not None:
            self.consumer_lag.remove(self.service, topic, str(partition))

    def record_transaction(self, outcome: str) -> None:
        """A transaction / commit ended with `outcome` (`committed`, `aborted`, `failed`)."""
        self.child(self.transactions, outcome=outcome).inc()

    def record_hanging_transaction(self, action: str) -> None:
        """A hanging transaction was found; `action`: `commit`, `abort`, `left`, `failed`."""
        self.child(self.hanging_transactions, action=action).inc()

    def record_abandoned_producer(self) -> None:
        """A transactional producer was abandoned in a hung call."""
        self.child(self.abandoned_producers).inc()

    def record_rebalance(self, kind: str, count: int = 1) -> None:
        """A rebalance event `kind` (`assign`, `revoke`, `lost`)."""
        self.child(self.rebalances, kind=kind).inc(count)

    def set_dependency(self, dependency: str, up: bool) -> None:
        """Whether `dependency` answers."""
        self.child(self.dependency_up, dependency=dependency).set(1 if up else 0)

    def heartbeat(self, now: float | None = None) -> None:
        """The processing loop ticked."""
        self.child(self.loop_last_tick).set(time.time() if now is None else now)

    # ---- exposition -------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """Observe every value (none NaN) on a histogram child, as one `observe` per value would.

    One lock round per bucket touched instead of two per value (the loop observes a latency per
    output record). Uses prometheus_client's histogram layout (`_upper_bounds`, one non-cumulative
    counter per bucket in `_buckets`, `_sum`); without it, falls back to `observe` per value.
    `test_metrics.py` checks that both give the same exposition (the sum may differ in the last
    bits: it is added once per batch).
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    if not values:
        return
    total.inc(sum(values))
    # `observe` counts a value in the first bucket whose bound is >= it (the last one is +Inf).
    for index, count in Tally(bisect_left(bounds, value) for value in values).items():
        buckets[index].inc(count)
