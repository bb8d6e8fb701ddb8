"""Unit tests of the enrichment processor around the transform (no server: a fake reference source)."""

from __future__ import annotations

import asyncio
import contextlib

from dataproc_shared import avro
from dataproc_shared.records import BatchResult, DeadLetterReason, InRecord
from enrichment.app import EnrichmentProcessor
from enrichment.settings import EnrichmentOptions, EnrichmentSettings
from enrichment.transform import (
    AppliedChange,
    ChangeOp,
    Instrument,
    ReferenceCache,
    ReferenceSnapshot,
    RefTable,
    RowChange,
    Venue,
)

XNYS = Venue("XNYS", "NYSE", "America/New_York", True)
IBM = Instrument("XNYS.IBM", "XNYS", "IBM", "IBM", "equity", "USD", 0.01, 1.0, True)
AIG = Instrument("XNYS.AIG", "XNYS", "AIG", "AIG", "equity", "USD", 0.01, 1.0, True)


class FakeSource:
    def __init__(self) -> None:
        self.cache = ReferenceCache()
        self.cache.load(ReferenceSnapshot((XNYS,), (IBM,)))
        self._current = asyncio.Event()

    @property
    def current(self) -> bool:
        return self._current.is_set()

    def set_current(self, value: bool) -> None:
        if value:
            self._current.set()
        else:
            self._current.clear()

    async def wait_current(self, within_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._current.wait(), within_s)
        except TimeoutError:
            return False
        return True


class CountingMetrics:
    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.changes: list[tuple[str, str]] = []
        self.holds: list[float] = []

    def cache_size(self, table: str, rows: int) -> None:
        self.sizes[table] = rows

    def change_applied(self, table: str, op: str) -> None:
        self.changes.append((table, op))

    def held(self, seconds: float) -> None:
        self.holds.append(seconds)


def _settings() -> EnrichmentSettings:
    return EnrichmentSettings(service="enrichment", enrichment=EnrichmentOptions(hold_slice_s=0.05))


def _tick(symbol: str, offset: int) -> InRecord:
    value = avro.encode(
        "normalized_tick",
        {
            "venue": "XNYS",
            "symbol": symbol,
            "kind": "TRADE",
            "ts_ns": 1_763_900_000_000_000_000,
            "seq": None,
            "trade_id": None,
            "price": 10.0,
            "size": 1.0,
            "bid": None,
            "ask": None,
            "bid_size": None,
            "ask_size": None,
            "ingest_ns": 1_763_900_000_000_000_001,
            "source_partition": 0,
            "source_offset": offset,
        },
    )
    return InRecord("normalized", 0, offset, f"XNYS:{symbol}".encode(), value, 0)


async def test_enriches_with_avro_and_marks_event_time() -> None:
    source = FakeSource()
    source.set_current(True)
    proc = EnrichmentProcessor(_settings(), source)
    result = await proc.process([_tick("IBM", 0), _tick("NOPE", 1)])
    (out,) = result.outputs
    value = avro.decode(out.value or b"", "enriched_tick")
    assert value["instrument_id"] == "XNYS.IBM"
    assert value["venue_timezone"] == "America/New_York"
    assert ("dp-event-ns", b"1763900000000000000") in out.headers
    assert [d.reason for d in result.dead_letters] == [DeadLetterReason.UNKNOWN_INSTRUMENT]


async def test_miss_while_not_current_waits_then_resolves_against_the_fresh_cache() -> None:
    source = FakeSource()
    beats: list[int] = []
    metrics = CountingMetrics()
    proc = EnrichmentProcessor(_settings(), source, metrics=metrics, heartbeat=lambda: beats.append(1))
    task = asyncio.create_task(proc.process([_tick("IBM", 0), _tick("AIG", 1)]))
    await asyncio.sleep(0.3)
    assert not task.done()  # held: neither produced nor dead-lettered
    assert len(beats) >= 2  # the loop is kept alive while it waits on purpose
    # the database comes back with AIG in it
    source.cache.apply(RowChange(RefTable.INSTRUMENTS, AIG.instrument_id, AIG))
    source.set_current(True)
    result = await asyncio.wait_for(task, 2)
    assert isinstance(result, BatchResult)
    assert [avro.decode(o.value or b"", "enriched_tick")["instrument_id"] for o in result.outputs] == [
        "XNYS.IBM",
        "XNYS.AIG",
    ]
    assert result.dead_letters == []
    assert len(metrics.holds) == 1
    assert metrics.holds[0] >= 0.25


async def test_held_batch_is_cancelled_cleanly_on_shutdown() -> None:
    source = FakeSource()
    proc = EnrichmentProcessor(_settings(), source)
    task = asyncio.create_task(proc.process([_tick("NOPE", 0)]))
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_changes_are_counted_and_audited_with_the_next_tick() -> None:
    source = FakeSource()
    metrics = CountingMetrics()
    proc = EnrichmentProcessor(_settings(), source, metrics=metrics)
    proc.on_changes([], "initial")
    change = AppliedChange(RefTable.INSTRUMENTS, ChangeOp.DEACTIVATE, "XNYS.IBM", IBM, IBM)
    proc.on_changes([change], "notify")
    assert metrics.changes == [("instruments", "deactivate")]
    assert metrics.sizes == {"venues": 1, "instruments": 1}
    tick = await proc.on_tick()
    assert [e.event_type for e in tick.audit] == ["reference_loaded", "reference_change"]
    assert tick.audit[1].details["op"] == "deactivate"
    assert (await proc.on_tick()).audit == []


async def test_audit_events_of_an_aborted_cycle_go_out_again() -> None:
    source = FakeSource()
    source.set_current(True)
    proc = EnrichmentProcessor(_settings(), source)
    change = AppliedChange(RefTable.INSTRUMENTS, ChangeOp.UPDATE, "XNYS.IBM", IBM, IBM)
    proc.on_changes([change], "notify")
    first = await proc.process([_tick("IBM", 0)])
    assert len(first.audit) == 1
    await proc.before_commit()
    await proc.on_abort()  # the transaction with the audit event was aborted
    again = await proc.process([_tick("IBM", 0)])
    assert [e.details["key"] for e in again.audit] == ["XNYS.IBM"]
    await proc.before_commit()  # committed this time: the next cycle hands out nothing
    assert (await proc.process([_tick("IBM", 1)])).audit == []
    await proc.on_abort()  # an abort of a later cycle does not bring back committed events
    assert (await proc.on_tick()).audit == []
