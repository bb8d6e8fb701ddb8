"""Unit tests of the pure enrichment logic (no server)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from dataproc_shared.records import BatchResult, DeadLetterReason, InRecord
from enrichment.transform import (
    AppliedChange,
    ChangeOp,
    Enricher,
    Hold,
    Instrument,
    NotificationError,
    ReferenceCache,
    ReferenceSnapshot,
    RefTable,
    ReloadRequest,
    Resolution,
    RowChange,
    Venue,
    audit_for_change,
    enriched_value,
    parse_notification,
)
from hypothesis import given, settings
from hypothesis import strategies as st

XNYS = Venue("XNYS", "New York Stock Exchange", "America/New_York", True)
EPEX = Venue("EPEX", "EPEX Spot", "Europe/Paris", True)
IBM = Instrument("XNYS.IBM", "XNYS", "IBM", "IBM", "equity", "USD", 0.01, 1.0, True)
OLD = Instrument("XNYS.OLD", "XNYS", "OLD", "OLD", "equity", "USD", 0.01, 1.0, False)
DEH = Instrument("EPEX.DE-H14", "EPEX", "DE-H14", "DE Power H14", "power", "EUR", 0.01, None, True)


def _encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _decode(raw: bytes) -> Mapping[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError("not an object")
    return value


def _tick(venue: str, symbol: str, **extra: Any) -> dict[str, Any]:
    tick: dict[str, Any] = {
        "venue": venue,
        "symbol": symbol,
        "kind": "TRADE",
        "ts_ns": 1_700_000_000_000_000_000,
        "seq": None,
        "trade_id": "T1",
        "price": 101.5,
        "size": 3.0,
        "bid": None,
        "ask": None,
        "bid_size": None,
        "ask_size": None,
        "ingest_ns": 1_700_000_000_100_000_000,
        "source_partition": 2,
        "source_offset": 77,
    }
    tick.update(extra)
    return tick


def _record(value: bytes | None, offset: int = 0, partition: int = 3) -> InRecord:
    return InRecord(
        topic="normalized",
        partition=partition,
        offset=offset,
        key=b"K",
        value=value,
        timestamp_ms=0,
        headers=(("dp-correlation-id", b"c1"),),
    )


def _cache(*instruments: Instrument) -> ReferenceCache:
    cache = ReferenceCache()
    cache.load(ReferenceSnapshot((XNYS, EPEX), instruments))
    return cache


def _encode_out(_raw: bytes, tick: Mapping[str, Any], instrument: Instrument, venue: Venue) -> bytes:
    return _encode(enriched_value(tick, instrument, venue))


def _enricher(cache: ReferenceCache) -> Enricher:
    return Enricher(cache, output_topic="enriched", decode=_decode, encode=_encode_out)


def test_known_tick_is_enriched_on_the_input_partition_with_key_and_headers() -> None:
    enricher = _enricher(_cache(IBM))
    record = _record(_encode(_tick("XNYS", "IBM")))
    result = enricher.enrich([record], cache_current=True)
    assert isinstance(result, BatchResult)
    assert result.dead_letters == []
    (out,) = result.outputs
    assert (out.topic, out.partition, out.key) == ("enriched", 3, b"K")
    assert out.headers == (("dp-correlation-id", b"c1"),)
    assert out.source is record  # the loop's header propagation takes the tracing headers from it
    value = _decode(out.value or b"")
    assert value["instrument_id"] == "XNYS.IBM"
    assert value["venue_timezone"] == "America/New_York"
    assert value["currency"] == "USD"
    assert value["tick_size"] == 0.01
    assert value["price"] == 101.5
    assert value["source_offset"] == 77
    assert "symbol" in value
    assert value["venue_symbol"] == "IBM"


def test_event_time_header_is_added_when_asked() -> None:
    enricher = Enricher(
        _cache(IBM),
        output_topic="enriched",
        decode=_decode,
        encode=_encode_out,
        event_time_header="dp-event-ns",
    )
    result = enricher.enrich([_record(_encode(_tick("XNYS", "IBM")))], cache_current=True)
    assert isinstance(result, BatchResult)
    assert result.outputs[0].headers == (
        ("dp-correlation-id", b"c1"),
        ("dp-event-ns", b"1700000000000000000"),
    )


def test_negative_power_price_passes_through() -> None:
    enricher = _enricher(_cache(DEH))
    result = enricher.enrich([_record(_encode(_tick("EPEX", "DE-H14", price=-12.5)))], cache_current=True)
    assert isinstance(result, BatchResult)
    value = _decode(result.outputs[0].value or b"")
    assert value["price"] == -12.5
    assert value["multiplier"] is None
    assert value["asset_class"] == "power"


def test_unknown_and_inactive_are_dead_lettered_when_cache_is_current() -> None:
    enricher = _enricher(_cache(IBM, OLD))
    batch = [
        _record(_encode(_tick("XNYS", "NOPE")), 0),
        _record(_encode(_tick("XNYS", "OLD")), 1),
        _record(_encode(_tick("XNYS", "IBM")), 2),
    ]
    result = enricher.enrich(batch, cache_current=True)
    assert isinstance(result, BatchResult)
    assert [d.reason for d in result.dead_letters] == [
        DeadLetterReason.UNKNOWN_INSTRUMENT,
        DeadLetterReason.INACTIVE_INSTRUMENT,
    ]
    assert [d.source.offset for d in result.dead_letters] == [0, 1]
    assert len(result.outputs) == 1


def test_inactive_venue_makes_its_instruments_inactive() -> None:
    cache = _cache(IBM)
    cache.apply(RowChange(RefTable.VENUES, "XNYS", Venue("XNYS", "NYSE", "America/New_York", False)))
    result = _enricher(cache).enrich([_record(_encode(_tick("XNYS", "IBM")))], cache_current=True)
    assert isinstance(result, BatchResult)
    assert result.dead_letters[0].reason is DeadLetterReason.INACTIVE_INSTRUMENT
    assert "venue XNYS" in result.dead_letters[0].detail


def test_miss_while_cache_not_current_holds_the_batch() -> None:
    enricher = _enricher(_cache(IBM, OLD))
    batch = [
        _record(_encode(_tick("XNYS", "IBM")), 0),
        _record(_encode(_tick("XNYS", "NOPE")), 1),
        _record(_encode(_tick("XNYS", "OLD")), 2),
    ]
    held = enricher.enrich(batch, cache_current=False)
    assert isinstance(held, Hold)
    assert [r.offset for r in held.waiting] == [1, 2]
    assert held.first.offset == 1


def test_hits_are_served_from_a_stale_cache() -> None:
    enricher = _enricher(_cache(IBM))
    result = enricher.enrich([_record(_encode(_tick("XNYS", "IBM")))], cache_current=False)
    assert isinstance(result, BatchResult)
    assert len(result.outputs) == 1


def test_undecodable_records_are_dead_lettered_even_when_stale() -> None:
    enricher = _enricher(_cache(IBM))
    batch = [_record(b"\xc3\x01garbage", 0), _record(None, 1), _record(_encode({"venue": "X"}), 2)]
    result = enricher.enrich(batch, cache_current=False)
    assert isinstance(result, BatchResult)
    assert [d.reason for d in result.dead_letters] == [DeadLetterReason.UNDECODABLE] * 3


def test_update_changes_the_next_lookup_and_listing_moves() -> None:
    cache = _cache(IBM)
    moved = Instrument("XNYS.IBM", "XNYS", "IBM.N", "IBM", "equity", "USD", 0.005, 1.0, True)
    applied = cache.apply(RowChange(RefTable.INSTRUMENTS, "XNYS.IBM", moved))
    assert applied is not None
    assert applied.op is ChangeOp.UPDATE
    assert cache.lookup("XNYS", "IBM").resolution is Resolution.UNKNOWN
    found = cache.lookup("XNYS", "IBM.N")
    assert found.instrument == moved


def test_apply_classifies_ops_and_ignores_repeats() -> None:
    cache = _cache()
    ins = cache.apply(RowChange(RefTable.INSTRUMENTS, IBM.instrument_id, IBM))
    assert ins is not None
    assert ins.op is ChangeOp.INSERT
    assert cache.apply(RowChange(RefTable.INSTRUMENTS, IBM.instrument_id, IBM)) is None
    inactive = Instrument(**{**_fields(IBM), "active": False})
    deact = cache.apply(RowChange(RefTable.INSTRUMENTS, IBM.instrument_id, inactive))
    assert deact is not None
    assert deact.op is ChangeOp.DEACTIVATE
    assert cache.lookup("XNYS", "IBM").resolution is Resolution.INACTIVE
    dele = cache.apply(RowChange(RefTable.INSTRUMENTS, IBM.instrument_id, None))
    assert dele is not None
    assert dele.op is ChangeOp.DELETE
    assert dele.before == inactive
    assert cache.instrument_count == 0
    assert cache.apply(RowChange(RefTable.INSTRUMENTS, IBM.instrument_id, None)) is None


def test_load_returns_the_diff() -> None:
    cache = _cache(IBM, OLD)
    changed = Instrument(**{**_fields(IBM), "currency": "EUR"})
    diff = cache.load(ReferenceSnapshot((XNYS, EPEX), (changed, DEH)))
    ops = {(c.table, c.key): c.op for c in diff}
    assert ops == {
        (RefTable.INSTRUMENTS, "XNYS.IBM"): ChangeOp.UPDATE,
        (RefTable.INSTRUMENTS, "XNYS.OLD"): ChangeOp.DELETE,
        (RefTable.INSTRUMENTS, "EPEX.DE-H14"): ChangeOp.INSERT,
    }
    assert cache.load(cache.snapshot()) == []


def test_audit_event_names_table_op_and_instrument() -> None:
    change = AppliedChange(RefTable.INSTRUMENTS, ChangeOp.INSERT, IBM.instrument_id, None, IBM)
    event = audit_for_change(change, source="notify")
    assert event.event_type == "reference_change"
    assert event.instrument == "XNYS.IBM"
    assert event.details["op"] == "insert"
    assert event.details["after"]["currency"] == "USD"
    assert event.details["before"] is None


def test_parse_notification() -> None:
    row = {
        "instrument_id": "XNYS.IBM",
        "venue": "XNYS",
        "venue_symbol": "IBM",
        "symbol": "IBM",
        "asset_class": "equity",
        "currency": "USD",
        "tick_size": 0.01,
        "multiplier": 1,
        "active": True,
        "updated_at": "2026-01-01T00:00:00Z",
    }
    change = parse_notification({"table": "instruments", "op": "UPDATE", "key": "XNYS.IBM", "row": row})
    assert change == RowChange(RefTable.INSTRUMENTS, "XNYS.IBM", IBM)
    deleted = parse_notification({"table": "venues", "op": "DELETE", "key": "XNYS", "row": None})
    assert deleted == RowChange(RefTable.VENUES, "XNYS", None)
    assert parse_notification({"table": "venues", "op": "TRUNCATE"}) == ReloadRequest(RefTable.VENUES)
    with pytest.raises(NotificationError):
        parse_notification({"table": "trades", "op": "INSERT", "key": "x", "row": {}})
    with pytest.raises(NotificationError):
        parse_notification({"table": "venues", "op": "INSERT", "key": "x", "row": {"mic": "X"}})


def _fields(i: Instrument) -> dict[str, Any]:
    return {name: getattr(i, name) for name in Instrument.__slots__}


# -- property: any sequence of row changes leaves the cache equal to the table it mirrors --------

_ids = st.sampled_from(["A", "B", "C", "D"])
_symbols = st.sampled_from(["S1", "S2", "S3", "S4", "S5"])


@st.composite
def _changes(draw: st.DrawFn) -> list[tuple[str, str | None, bool]]:
    return draw(
        st.lists(
            st.tuples(_ids, st.one_of(st.none(), _symbols), st.booleans()),
            max_size=40,
        )
    )


@settings(max_examples=200, deadline=None)
@given(ops=_changes())
def test_cache_follows_row_changes(ops: list[tuple[str, str | None, bool]]) -> None:
    cache = _cache()
    table: dict[str, Instrument] = {}
    for iid, symbol, active in ops:
        if symbol is None:
            table.pop(iid, None)
            cache.apply(RowChange(RefTable.INSTRUMENTS, iid, None))
            continue
        if any(i.venue_symbol == symbol and k != iid for k, i in table.items()):
            continue  # the table's unique (venue, venue_symbol) refuses it
        row = Instrument(iid, "XNYS", symbol, symbol, "equity", "USD", 0.01, 1.0, active)
        table[iid] = row
        cache.apply(RowChange(RefTable.INSTRUMENTS, iid, row))
    assert cache.snapshot().instruments == tuple(table[k] for k in sorted(table))
    for symbol in ["S1", "S2", "S3", "S4", "S5"]:
        owner = next((i for i in table.values() if i.venue_symbol == symbol), None)
        found = cache.lookup("XNYS", symbol)
        if owner is None:
            assert found.resolution is Resolution.UNKNOWN
        else:
            assert found.instrument == owner
            assert found.resolution is (Resolution.FOUND if owner.active else Resolution.INACTIVE)
        # the fast path agrees with lookup
        resolved = cache.resolve("XNYS", symbol)
        if found.resolution is Resolution.FOUND:
            assert resolved == (found.instrument, found.venue)
        else:
            assert resolved is None
    # a full reload of the same content changes nothing; a reload into an empty cache inserts all
    assert cache.load(ReferenceSnapshot((XNYS, EPEX), tuple(table.values()))) == []
    fresh = ReferenceCache()
    inserted = fresh.load(cache.snapshot())
    assert all(c.op is ChangeOp.INSERT for c in inserted)
    assert len(inserted) == len(table) + 2
