"""The aggregation `Processor`: windowing core + changelog state + ClickHouse sink, inside the Kafka loop.

Per transaction (the loop's order): `process` applies each record to the windowing core (final bars
and late trades are decided per record), then emits paced updates; `on_tick` closes the windows of
idle partitions whose close has passed on the wall clock and emits paced updates; `before_commit`
inserts the transaction's bars and late trades into ClickHouse and returns the state changes as
changelog records, so outputs, state and input offsets commit together. `on_abort` reloads the state
from the changelog and drops unflushed rows.

The window state lives in the engine only: the `ChangelogStore` reads the changelog on assignment
and after an abort, and its copy is dropped once the engine has loaded it; the engine's coalesced
`changes` become the changelog records directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import structlog
from dataproc_shared.errors import AvroError
from dataproc_shared.records import BatchResult, DeadLetter, DeadLetterReason, InRecord, OutRecord
from dataproc_shared.state import ChangelogStore

from aggregation.codec import BadTickError, decode_tick, encode_bar, late_rows
from aggregation.sink import BarSink
from aggregation.transform import Bar, ChangelogFormat, WindowConfig, WindowEngine

log = structlog.get_logger(__name__)

#: Output header with the bar's latest trade time (feeds `dp_event_latency_seconds`).
EVENT_TIME_HEADER = "dp-event-ns"


def _iso_ns(ns: int) -> str:
    """An epoch-ns time as ISO-8601 UTC with milliseconds, for logs."""
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


class IdleMetrics:
    """Metrics of the idle timer (`docs/metrics.md`), in the service's registry."""

    def __init__(self, metrics: Any) -> None:
        """`metrics` is the service's `ServiceMetrics`."""
        self._metrics = metrics
        self.closed = metrics.counter(
            "dp_idle_closed_windows_total",
            "Windows closed by the idle timer (their close had passed on the wall clock).", ["interval"])
        self.waiting = metrics.gauge(
            "dp_idle_open_windows",
            "Windows open on idle partitions, waiting for their close on the wall clock.")

    def observe(self, closed: list[Bar], waiting: int) -> None:
        """One timer run: the bars it closed and the windows idle partitions still hold."""
        counts: dict[str, int] = {}
        for b in closed:
            counts[b.interval] = counts.get(b.interval, 0) + 1
        for interval, n in counts.items():
            self._metrics.child(self.closed, interval=interval).inc(n)
        self._metrics.child(self.waiting).set(waiting)


class AggregationProcessor:
    """Enriched ticks -> bars on Kafka and in ClickHouse, with recoverable window state."""

    def __init__(
        self,
        *,
        config: WindowConfig,
        input_topic: str,
        bars_topic: str,
        store: ChangelogStore,
        sink: BarSink | None = None,
        metrics: Any | None = None,
        clock: Callable[[], int] = time.time_ns,
        changelog_format: ChangelogFormat = "instrument",
    ) -> None:
        """`metrics` is the service's `ServiceMetrics`; `clock` gives wall-clock epoch nanoseconds.

        `changelog_format` is the format the window state is written in (both are read).
        """
        self.engine = WindowEngine(config, clock, changelog_format)
        self._config = config
        self._input_topic = input_topic
        self._bars_topic = bars_topic
        self._store = store
        self._sink = sink
        self._metrics = metrics
        self._lengths = {i.name: i.length_ns for i in config.intervals}
        # Input partitions assigned (their state restored into the engine).
        self._owned: set[int] = set()
        self._idle = IdleMetrics(metrics) if metrics is not None else None

    # ---- life cycle --------------------------------------------------------------------------------
    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """Restore the window state of the assigned input partitions from the changelog."""
        mine = [p for t, p in partitions if t == self._input_topic]
        await self._load(mine)
        self._owned.update(mine)
        log.info("windows restored", partitions=mine, open_windows=self.engine.open_windows())
        self._gauge()

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Forget the state of revoked partitions."""
        mine = [p for t, p in partitions if t == self._input_topic]
        self._owned.difference_update(mine)
        for p in mine:
            self.engine.drop_partition(p)
        self._gauge()

    async def on_abort(self) -> None:
        """Drop uncommitted changes: reload every owned partition from the changelog."""
        if self._sink is not None:
            self._sink.discard()
        for p in self.engine.partitions:
            self.engine.drop_partition(p)
        await self._load(sorted(self._owned))
        log.warning("transaction aborted: window state reloaded", open_windows=self.engine.open_windows())
        self._gauge()

    async def _load(self, partitions: list[int]) -> None:
        """Read the partitions' changelog into the engine (the store keeps no copy)."""
        store = self._store
        await store.restore(partitions)
        try:
            for p in partitions:
                self.engine.restore_partition(p, ((k.encode(), v) for k, v in store.items(p)))
        finally:
            store.drop(partitions)

    # ---- records and timers ------------------------------------------------------------------------
    async def process(self, batch: list[InRecord]) -> BatchResult:
        """Apply each record in order; finals and late trades per record, then paced updates."""
        result = BatchResult()
        engine = self.engine
        ranges: dict[int, tuple[int, int]] = {}
        for rec in batch:
            seen = ranges.get(rec.partition)
            ranges[rec.partition] = (rec.offset if seen is None else seen[0], rec.offset)
            if rec.value is None:
                result.dead_letters.append(DeadLetter(rec, DeadLetterReason.UNDECODABLE, "empty value"))
                continue
            try:
                tick = decode_tick(rec.value, rec.partition, rec.offset)
            except (AvroError, BadTickError, KeyError, TypeError, ValueError) as exc:
                result.dead_letters.append(DeadLetter(rec, DeadLetterReason.UNDECODABLE, str(exc)[:500]))
                continue
            applied = engine.apply(tick)
            if applied.finals:
                self._emit(applied.finals, result)
            late = applied.late
            if late is not None:
                detail = (f"trade at ts_ns={tick.ts_ns} for closed window(s) {','.join(late.intervals)}; "
                          f"partition watermark ts_ns={late.watermark_ns}")
                result.dead_letters.append(DeadLetter(rec, DeadLetterReason.LATE_TRADE, detail))
                if self._sink is not None:
                    self._sink.add_late(late_rows(late, self._lengths))
                if self._metrics is not None:
                    for name in late.intervals:
                        self._metrics.child(self._metrics.late_trades, interval=name).inc()
        if self._sink is not None:
            for p, (a, b) in ranges.items():
                self._sink.note_input(p, a, b)
        self._emit(engine.flush_updates(), result)
        self._gauge()
        return result

    async def on_lag(self, lags: dict[tuple[str, int], int]) -> None:
        """A partition with records still waiting is busy, not idle: its windows stay open."""
        for (_topic, partition), lag in lags.items():
            if lag > 0:
                self.engine.mark_busy(partition)

    async def on_tick(self) -> BatchResult:
        """Close the ended windows of idle partitions (wall clock) and emit due updates."""
        result = BatchResult()
        engine = self.engine
        closed = engine.close_idle()
        waiting, next_close = engine.idle_open_windows()
        if closed:
            # the windows idle partitions keep open have not reached their close on the wall clock
            log.info("idle partitions closed", bars=len(closed),
                     partitions=sorted({b.source_partition for b in closed}), still_open=waiting,
                     next_close=None if next_close is None else _iso_ns(next_close))
        if self._idle is not None:
            self._idle.observe(closed, waiting)
        self._emit(closed, result)
        self._emit(self.engine.flush_updates(), result)
        self._gauge()
        return result

    async def before_commit(self) -> BatchResult:
        """Insert the transaction's rows into ClickHouse, then hand over the state changes."""
        if self._sink is not None and self._sink.pending:
            await asyncio.to_thread(self._sink.flush)
        topic = self._store.topic
        engine = self.engine
        return BatchResult(outputs=[
            OutRecord(topic, key, value, p) for p in engine.partitions for key, value in engine.changes(p)
        ])

    def _emit(self, bars: list[Bar], result: BatchResult) -> None:
        if not bars:
            return
        topic = self._bars_topic
        append = result.outputs.append
        counts: dict[tuple[str, bool], int] = {}
        for b in bars:
            append(OutRecord(topic, b.source_key.encode(), encode_bar(b), b.source_partition,
                             ((EVENT_TIME_HEADER, b"%d" % b.last_ts_ns),)))
            label = (b.interval, b.is_final)
            counts[label] = counts.get(label, 0) + 1
        if self._metrics is not None:
            for (interval, final), n in counts.items():
                self._metrics.child(self._metrics.bars_emitted, interval=interval, final=final).inc(n)
        if self._sink is not None:
            self._sink.add_bars(bars)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.open_windows).set(self.engine.open_windows())
