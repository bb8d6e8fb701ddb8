"""The normalization service's `Processor`: the pure transform, its dedup state and its metrics.

State: the dedup memory of each assigned input partition lives in a `DedupWindow`; its changes
are mirrored into a `ChangelogStore` (`normalization.dedup.changelog.v1`) in `before_commit`, so
they ride in the same Kafka transaction as the outputs and the input offsets. On assignment and
after an aborted transaction the windows are rebuilt from the changelog, i.e. from committed state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from confluent_kafka.admin import AdminClient
from dataproc_shared.config import admin_config, kafka_common_config
from dataproc_shared.errors import ConfigError
from dataproc_shared.kafka.hanging import HangingTransactionResolver
from dataproc_shared.partitioning import partition_for
from dataproc_shared.records import BatchResult, InRecord
from dataproc_shared.state import ChangelogStore

from normalization.codec import tick_encoder
from normalization.dedup import DedupEntry, DedupWindow
from normalization.settings import NormalizationSettings
from normalization.transform import Normalizer, NormalizerConfig

log = structlog.get_logger(__name__)

NS_PER_S = 1_000_000_000


def output_partitions(settings: NormalizationSettings) -> int:
    """Partition count the output partition is computed for."""
    return settings.normalization.output_partitions or settings.topics.partitions


def check_output_partitions(settings: NormalizationSettings, timeout_s: float = 30.0) -> None:
    """Fail unless the output topic exists with the partition count the service computes with."""
    admin = AdminClient(admin_config(settings))
    topic = settings.topics.normalized
    metadata = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise ConfigError(f"output topic {topic} does not exist; create the topics first (dptools.topics)")
    actual, wanted = len(metadata.partitions), output_partitions(settings)
    if actual != wanted:
        raise ConfigError(
            f"output topic {topic} has {actual} partitions, the service computes partitions for {wanted} "
            "(DATA_PROC_TOPICS__PARTITIONS / DATA_PROC_NORMALIZATION__OUTPUT_PARTITIONS)"
        )


class DedupMetrics:
    """Metrics of the dedup memory (`docs/metrics.md`), in the service's registry."""

    def __init__(self, metrics: Any) -> None:
        """`metrics` is the service's `ServiceMetrics`."""
        self._metrics = metrics
        self.evictions = metrics.counter(
            "dp_dedup_evictions_total",
            "Dedup entries dropped before a duplicate could match them.",
            ["cause"],
        )
        self.entries = metrics.gauge("dp_dedup_entries", "Trades remembered for de-duplication.")

    def evicted(self, cause: str, count: int) -> None:
        """`count` entries left the memory by `cause` (`expired` or `capacity`)."""
        if count:
            self._metrics.child(self.evictions, cause=cause).inc(count)

    def set_entries(self, count: int) -> None:
        """Current number of remembered trades."""
        self._metrics.child(self.entries).set(count)


class NormalizationProcessor:
    """Raw ticks -> normalized Avro ticks, dead letters and counted duplicates (see module docstring)."""

    def __init__(
        self,
        settings: NormalizationSettings,
        *,
        store: ChangelogStore,
        metrics: Any | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """`metrics` is the service's `ServiceMetrics` (optional); `clock` gives epoch ns."""
        opts = settings.normalization
        self._input_topic = settings.topics.raw
        self._store = store
        self._metrics = DedupMetrics(metrics) if metrics is not None else None
        self.normalizer = Normalizer(
            NormalizerConfig(
                output_topic=settings.topics.normalized,
                output_partitions=output_partitions(settings),
                max_future_skew_ns=round(opts.max_future_skew_s * NS_PER_S),
                dedup_window_ns=round(opts.dedup_window_s * NS_PER_S),
                dedup_max_entries=opts.dedup_max_entries,
            ),
            encode=tick_encoder(),
            partitioner=partition_for,
            clock=clock,
        )
        self._evictions_seen: dict[int, tuple[int, int]] = {}

    @classmethod
    def from_settings(
        cls, settings: NormalizationSettings, metrics: Any | None = None
    ) -> NormalizationProcessor:
        """The processor with its changelog store, as the service runs it."""
        store = ChangelogStore(
            topic=settings.topics.changelog("normalization", "dedup"),
            kafka_config=kafka_common_config(settings),
            codec="bytes",
            hanging=HangingTransactionResolver.from_settings(settings, metrics),
        )
        return cls(settings, store=store, metrics=metrics)

    # --- Processor protocol ----------------------------------------------------------------------

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """Restore the dedup memory of the new input partitions from the changelog."""
        owned = self._own(partitions)
        if not owned:
            return
        await self._store.restore(owned)
        for partition in owned:
            self._rebuild(partition)
        self._update_gauge()

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Forget the memory of partitions that went away."""
        owned = self._own(partitions)
        self._store.drop(owned)
        for partition in owned:
            self.normalizer.drop_partition(partition)
            self._evictions_seen.pop(partition, None)
        self._update_gauge()

    async def process(self, batch: list[InRecord]) -> BatchResult:
        """Normalize one batch."""
        return self.normalizer.process(batch)

    async def on_tick(self) -> BatchResult:
        """No timers; refreshes the memory gauge."""
        self._update_gauge()
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        """The dedup changes of this transaction, as changelog records joining it."""
        for partition, window in self.normalizer.windows.items():
            for key, entry in window.pending_changes():
                if entry is None:
                    self._store.delete(partition, key)
                else:
                    self._store.put(partition, key, entry.encode())
            window.clear_pending()
            self._count_evictions(partition, window)
        return BatchResult(outputs=self._store.pending_changes())

    async def on_abort(self) -> None:
        """Drop uncommitted dedup changes: reload the committed state of every owned partition."""
        await self._store.reload()
        for partition in list(self.normalizer.windows):
            if partition not in self._store.partitions:
                self.normalizer.drop_partition(partition)
        for partition in self._store.partitions:
            self._rebuild(partition)
        log.info("dedup state reloaded after abort", partitions=sorted(self._store.partitions))

    # --- internals -------------------------------------------------------------------------------

    def _own(self, partitions: Iterable[tuple[str, int]]) -> list[int]:
        return sorted(p for topic, p in partitions if topic == self._input_topic)

    def _rebuild(self, partition: int) -> None:
        self.normalizer.restore_partition(
            partition, ((key, DedupEntry.decode(value)) for key, value in self._store.items(partition))
        )
        window = self.normalizer.window(partition)
        self._evictions_seen[partition] = (window.expired, window.evicted)

    def _count_evictions(self, partition: int, window: DedupWindow) -> None:
        if self._metrics is None:
            return
        expired, evicted = self._evictions_seen.get(partition, (0, 0))
        self._metrics.evicted("expired", window.expired - expired)
        self._metrics.evicted("capacity", window.evicted - evicted)
        self._evictions_seen[partition] = (window.expired, window.evicted)

    def _update_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.set_entries(sum(len(w) for w in self.normalizer.windows.values()))
