"""`PendingWrites.add_tick` / `add_bar` (deferred writes) against the eager path they replace.

The eager path is `extend(tick_writes(tick_from_record(record), arrival))` and
`extend(bar_writes(bar_from_record(record), max_final_bars))`: for any sequence of records, both
must leave the same surviving writes, in the same order, raise `BadInput` on the same records and
count the same number of added writes.
"""

from __future__ import annotations

from typing import Any

from dataproc_shared import avro
from dataproc_shared.records import InRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from projection.transform import (
    BadInput,
    InputTopics,
    PendingWrites,
    bar_from_record,
    bar_writes,
    field_decoder,
    project_records,
    tick_from_record,
    tick_writes,
)

TS = 1_763_908_200_123_456_789
WINDOW = 1_763_908_200_000
LONG_MAX = 2**63 - 1

prices = st.one_of(st.none(), st.sampled_from([71.25, -3.5, 0.0, 1e300]), st.integers(-5, 5))
odd = st.sampled_from(["", None, True, "x", 2**64, -(2**63) - 1, 1.5])


@st.composite
def tick_records(draw: st.DrawFn) -> dict[str, Any]:
    record: dict[str, Any] = {
        "instrument_id": draw(st.sampled_from(["CL-Z6", "ES-H7"])),
        "venue": "XNYM", "venue_symbol": "CLZ6", "symbol": "CLZ6", "asset_class": "energy",
        "currency": draw(st.sampled_from(["USD", ""])), "tick_size": None, "multiplier": None,
        "venue_timezone": "UTC",
        "kind": draw(st.sampled_from(["TRADE", "QUOTE"])),
        "ts_ns": TS + draw(st.integers(0, 3)) * draw(st.sampled_from([1, LONG_MAX // 4])),
        "seq": draw(st.one_of(st.none(), st.integers(0, 2), st.just(LONG_MAX))),
        "trade_id": draw(st.sampled_from([None, "T-1", "T-2"])),
        "price": draw(prices), "size": draw(prices), "bid": draw(prices), "ask": draw(prices),
        "bid_size": draw(prices), "ask_size": draw(prices),
        "ingest_ns": TS, "source_partition": 0, "source_offset": 0,
    }
    if draw(st.integers(0, 9)) == 0:  # now and then a field the decoder would never produce
        record[draw(st.sampled_from(sorted(record)))] = draw(odd)
    return record


@st.composite
def bar_records(draw: st.DrawFn) -> dict[str, Any]:
    start = WINDOW + draw(st.integers(0, 2)) * 60_000
    record: dict[str, Any] = {
        "instrument_id": draw(st.sampled_from(["CL-Z6", "ES-H7"])), "venue": "XNYM", "symbol": "CLZ6",
        "currency": "USD", "interval": draw(st.sampled_from(["1m", "5m"])),
        "window_start_ms": start, "window_end_ms": start + 60_000,
        "open": 1.0, "high": 2.0, "low": 0.5, "close": draw(st.sampled_from([1.5, 1.75])),
        "volume": 3.0, "vwap": 1.25, "trade_count": 2, "is_final": draw(st.booleans()),
        "version": draw(st.integers(0, 3)), "first_ts_ns": TS, "last_ts_ns": TS + 1,
        "max_ingest_ns": TS, "source_partition": 0, "offset_from": 0, "offset_to": 1,
    }
    if draw(st.integers(0, 9)) == 0:
        record[draw(st.sampled_from(sorted(record)))] = draw(odd)
    return record


def _eager(pending: PendingWrites, kind: str, record: dict[str, Any], arrival: int, max_len: int) -> None:
    if kind == "tick":
        pending.extend(tick_writes(tick_from_record(record), arrival))
    else:
        pending.extend(bar_writes(bar_from_record(record), max_len))


def _deferred(pending: PendingWrites, kind: str, record: dict[str, Any], arrival: int, max_len: int) -> None:
    if kind == "tick":
        pending.add_tick(record, arrival)
    else:
        pending.add_bar(record, max_len)


def _outcome(pending: PendingWrites, kind: str, record: dict[str, Any], arrival: int, deferred: bool) -> str:
    try:
        (_deferred if deferred else _eager)(pending, kind, record, arrival, 5)
    except BadInput as exc:
        return str(exc)
    except TypeError as exc:  # an integer beyond 64 bits does not make JSON, on either path
        return f"TypeError: {exc}"
    return "ok"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("tick"), tick_records(), st.sampled_from([0, 1, 2, LONG_MAX]),
                                    st.booleans()),
                          st.tuples(st.just("bar"), bar_records(), st.just(0), st.booleans())),
                max_size=40))
def test_deferred_writes_equal_eager_writes(records: list[tuple[str, dict[str, Any], int, bool]]) -> None:
    eager, deferred = PendingWrites(), PendingWrites()
    for kind, record, arrival, mixed in records:
        expected = _outcome(eager, kind, record, arrival, deferred=False)
        # `mixed`: the record goes through the eager path on the deferred side too, so deferred and
        # built writes compete for the same key in one batch.
        assert _outcome(deferred, kind, record, arrival, deferred=not mixed) == expected
    assert deferred.writes() == eager.writes()
    assert deferred.added == eager.added
    assert len(deferred) == len(eager)


def test_a_superseded_tick_is_never_built() -> None:
    pending = PendingWrites()
    base = {"instrument_id": "CL-Z6", "venue": "XNYM", "symbol": "CLZ6", "currency": "USD", "kind": "TRADE",
            "ts_ns": TS, "seq": None, "trade_id": None, "price": 1.0, "size": 1.0, "bid": None, "ask": None,
            "bid_size": None, "ask_size": None}
    pending.add_tick(base, 1)
    pending.add_tick({**base, "ts_ns": TS + 1, "price": 2.0}, 2)
    [write] = pending.writes()
    assert dict(write.fields)["trade_price"] == "2.0"
    assert pending.added == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("tick"), tick_records()),
                          st.tuples(st.just("bar"), bar_records())), max_size=30),
       st.integers(0, 10))
def test_field_decoder_projects_what_the_full_decoder_does(records: list[tuple[str, dict[str, Any]]],
                                                           cut: int) -> None:
    """The service's decoder (only the fields the projection reads) against `avro.decode`."""
    topics = InputTopics(ticks="t", bars="b")
    batch = []
    for offset, (kind, record) in enumerate(records):
        schema = "enriched_tick" if kind == "tick" else "bar"
        try:
            value = avro.encode(schema, record)
        except avro.EncodeError:
            continue  # a field the decoder would never produce
        if offset == cut:
            value = value[:-3]  # one undecodable message
        batch.append(InRecord("t" if kind == "tick" else "b", 0, offset, b"k", value, 0))
    full, fields = PendingWrites(), PendingWrites()
    dead_full = project_records(batch, topics, avro.decode, full)
    dead_fields = project_records(batch, topics, field_decoder(avro.default_registry()), fields)
    assert fields.writes() == full.writes()
    assert [(d.source.offset, d.reason) for d in dead_fields] == [
        (d.source.offset, d.reason) for d in dead_full]
