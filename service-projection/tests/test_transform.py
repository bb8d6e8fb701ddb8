from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from projection.transform import (
    BadInput,
    Bar,
    HashWrite,
    KeyType,
    PendingWrites,
    SeriesWrite,
    Side,
    Tick,
    apply_hash_write,
    apply_series_write,
    bar_from_record,
    bar_member,
    bar_writes,
    order_key,
    tick_from_record,
    tick_writes,
)

TS = 1_763_908_200_123_456_789


def trade(ts: int = TS, seq: int | None = 1, price: float = 71.25, size: float = 3.0,
          trade_id: str | None = "T-1", iid: str = "CL-Z6") -> Tick:
    return Tick(instrument_id=iid, venue="XNYM", symbol="CLZ6", currency="USD", is_trade=True,
                ts_ns=ts, seq=seq, trade_id=trade_id, price=price, size=size)


def quote(ts: int = TS, seq: int | None = None, bid: float | None = 71.24, ask: float | None = 71.26,
          bid_size: float | None = 10.0, ask_size: float | None = 12.0, iid: str = "CL-Z6") -> Tick:
    return Tick(instrument_id=iid, venue="XNYM", symbol="CLZ6", currency="USD", is_trade=False,
                ts_ns=ts, seq=seq, bid=bid, ask=ask, bid_size=bid_size, ask_size=ask_size)


def bar(window_start_ms: int = 1_763_908_200_000, version: int = 1, is_final: bool = False,
        close: float = 71.3, interval: str = "1m", iid: str = "CL-Z6") -> Bar:
    return Bar(instrument_id=iid, venue="XNYM", symbol="CLZ6", currency="USD", interval=interval,
               window_start_ms=window_start_ms, window_end_ms=window_start_ms + 60_000, open=71.25,
               high=71.5, low=71.0, close=close, volume=7.0, vwap=71.2, trade_count=3, is_final=is_final,
               version=version, first_ts_ns=window_start_ms * 1_000_000,
               last_ts_ns=window_start_ms * 1_000_000 + 5)


def apply_all(writes: list[HashWrite | SeriesWrite]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for w in writes:
        if isinstance(w, HashWrite):
            apply_hash_write(state.setdefault(w.key, {}), w)
        else:
            apply_series_write(state.setdefault(w.key, {}), w)
    return state


def test_order_key_sorts_like_tuples() -> None:
    values = [(-5, 3), (-5, 4), (0, -(1 << 63)), (0, 0), (1, -1), (TS, 2), (TS, 10), ((1 << 63) - 1, 0)]
    keys = [order_key(*v) for v in values]
    assert keys == sorted(keys)
    assert len({len(k) for k in keys}) == 1


def test_trade_write_fields() -> None:
    [w] = tick_writes(trade())
    assert w.key == "md:tick:CL-Z6"
    assert w.key_type is KeyType.TICK
    assert w.side is Side.TRADE
    assert dict(w.fields) == {
        "instrument_id": "CL-Z6", "venue": "XNYM", "symbol": "CLZ6", "currency": "USD",
        "trade_ts": str(TS), "trade_price": "71.25", "trade_size": "3.0", "trade_id": "T-1", "trade_seq": "1",
    }
    assert w.deletes == ()
    assert w.maxima == (("ts", TS),)
    assert orjson.loads(w.announcement) == {
        "type": "tick", "key": "md:tick:CL-Z6", "instrument_id": "CL-Z6", "side": "trade", "ts": TS}


def test_trade_without_seq_or_id_deletes_stale_fields() -> None:
    [w] = tick_writes(trade(seq=None, trade_id=None))
    assert set(w.deletes) == {"trade_id", "trade_seq"}
    state: dict[str, str] = {}
    apply_hash_write(state, tick_writes(trade(ts=TS - 1))[0])
    assert state["trade_id"] == "T-1"
    assert apply_hash_write(state, w)
    assert "trade_id" not in state
    assert "trade_seq" not in state


def test_quote_sides_are_separate_writes() -> None:
    writes = tick_writes(quote())
    assert [w.side for w in writes] == [Side.BID, Side.ASK]
    assert dict(writes[0].fields)["bid"] == "71.24"
    assert dict(writes[1].fields)["ask_size"] == "12.0"
    assert ("quote_ts", TS) in writes[0].maxima
    assert [w.side for w in tick_writes(quote(ask=None, ask_size=None))] == [Side.BID]


def test_one_sided_quotes_build_the_top_of_book() -> None:
    state: dict[str, str] = {}
    for w in [*tick_writes(quote(ts=TS, bid=1.0, ask=None)),
              *tick_writes(quote(ts=TS + 5, bid=None, ask=2.0)),
              *tick_writes(trade(ts=TS + 2))]:
        assert apply_hash_write(state, w)
    assert (state["bid"], state["ask"], state["trade_price"]) == ("1.0", "2.0", "71.25")
    assert state["ts"] == str(TS + 5)
    assert state["quote_ts"] == str(TS + 5)
    assert state["trade_ts"] == str(TS + 2)


def test_older_tick_is_refused_per_side() -> None:
    state: dict[str, str] = {}
    assert apply_hash_write(state, tick_writes(trade(ts=TS, price=2.0))[0])
    assert not apply_hash_write(state, tick_writes(trade(ts=TS - 1, price=1.0))[0])
    assert not apply_hash_write(state, tick_writes(trade(ts=TS, seq=0, price=1.0))[0])
    assert state["trade_price"] == "2.0"
    # an older quote still applies: the quote side is ordered on its own
    assert apply_hash_write(state, tick_writes(quote(ts=TS - 100))[0])
    assert state["ts"] == str(TS)
    assert state["quote_ts"] == str(TS - 100)


def test_missing_seq_sorts_before_any_seq() -> None:
    state: dict[str, str] = {}
    assert apply_hash_write(state, tick_writes(trade(seq=-5, price=2.0))[0])
    assert not apply_hash_write(state, tick_writes(trade(seq=None, price=1.0))[0])


def test_equal_time_later_arrival_wins_and_replay_is_not_applied() -> None:
    state: dict[str, str] = {}
    first, second = tick_writes(trade(price=1.0), arrival=7)[0], tick_writes(trade(price=2.0), arrival=8)[0]
    assert apply_hash_write(state, first)
    assert apply_hash_write(state, second)
    assert state["trade_price"] == "2.0"
    assert not apply_hash_write(state, first)
    assert not apply_hash_write(state, second)
    # same order key, different values (a rewritten input): the later write wins
    assert apply_hash_write(state, tick_writes(trade(price=3.0), arrival=8)[0])
    assert state["trade_price"] == "3.0"


def test_bar_writes_update_and_final() -> None:
    [w] = bar_writes(bar())
    assert isinstance(w, HashWrite)
    assert w.key == "md:bar:CL-Z6:1m"
    fields = dict(w.fields)
    assert fields["is_final"] == "0"
    assert fields["version"] == "1"
    assert fields["window_start"] == "1763908200000"
    assert fields["close"] == "71.3"
    final = bar_writes(bar(is_final=True, version=4), max_final_bars=7)
    assert len(final) == 2
    series = final[1]
    assert isinstance(series, SeriesWrite)
    assert series.key == "md:bars:CL-Z6:1m"
    assert series.score == 1_763_908_200_000
    assert series.max_len == 7
    member = orjson.loads(series.member)
    assert member["version"] == 4
    assert member["is_final"] is True
    assert series.member == bar_member(bar(is_final=True, version=4))
    assert orjson.loads(series.announcement)["type"] == "bars"


def test_bar_hash_monotonic() -> None:
    state: dict[str, str] = {}
    assert apply_hash_write(state, bar_writes(bar(version=2))[0])  # type: ignore[arg-type]
    assert not apply_hash_write(state, bar_writes(bar(version=1, close=1.0))[0])  # type: ignore[arg-type]
    # the final emission wins over an update with the same version
    assert apply_hash_write(state, bar_writes(bar(version=2, is_final=True))[0])  # type: ignore[arg-type]
    assert not apply_hash_write(state, bar_writes(bar(version=2))[0])  # type: ignore[arg-type]
    # a newer window replaces, whatever its version
    assert apply_hash_write(state, bar_writes(bar(window_start_ms=1_763_908_260_000, version=1))[0])  # type: ignore[arg-type]
    assert not apply_hash_write(state, bar_writes(bar(version=9, is_final=True))[0])  # type: ignore[arg-type]
    assert state["window_start"] == "1763908260000"


def test_series_replace_same_window_and_trim() -> None:
    series: dict[str, int] = {}
    base = 1_763_908_200_000
    for i in range(5):
        w = bar_writes(bar(window_start_ms=base + i * 60_000, is_final=True, version=1), max_final_bars=3)[1]
        assert isinstance(w, SeriesWrite)
        assert apply_series_write(series, w)
    assert sorted(series.values()) == [base + 120_000, base + 180_000, base + 240_000]
    newer = bar_writes(bar(window_start_ms=base + 180_000, is_final=True, version=2, close=9.0), 3)[1]
    assert isinstance(newer, SeriesWrite)
    assert apply_series_write(series, newer)
    assert len(series) == 3
    assert newer.member in series
    older = bar_writes(bar(window_start_ms=base + 180_000, is_final=True, version=1, close=8.0), 3)[1]
    assert isinstance(older, SeriesWrite)
    assert not apply_series_write(series, older)
    assert not apply_series_write(series, newer)  # identical: nothing to do
    too_old = bar_writes(bar(window_start_ms=base, is_final=True, version=1), 3)[1]
    assert isinstance(too_old, SeriesWrite)
    assert not apply_series_write(series, too_old)
    assert len(series) == 3


def test_pending_writes_coalesce_to_newest() -> None:
    pending = PendingWrites()
    pending.extend(tick_writes(trade(ts=TS + 1, price=2.0)))
    pending.extend(tick_writes(trade(ts=TS, price=1.0)))
    pending.extend(tick_writes(quote(ts=TS)))
    pending.extend(bar_writes(bar(version=3, is_final=True)))
    pending.extend(bar_writes(bar(version=2)))
    assert pending.added == 7
    writes = pending.writes()
    assert len(pending) == len(writes) == 5
    by_side = {(w.key, w.side): w for w in writes if isinstance(w, HashWrite)}
    assert dict(by_side["md:tick:CL-Z6", Side.TRADE].fields)["trade_price"] == "2.0"
    assert dict(by_side["md:bar:CL-Z6:1m", Side.BAR].fields)["version"] == "3"
    pending.clear()
    assert len(pending) == 0


def test_records_decode() -> None:
    rec = {"instrument_id": "I1", "venue": "XNYM", "symbol": "CL", "currency": "USD", "kind": "QUOTE",
           "ts_ns": TS, "seq": None, "bid": 1, "ask": None, "bid_size": 2.5, "ask_size": None,
           "trade_id": None, "price": None, "size": None}
    t = tick_from_record(rec)
    assert (t.is_trade, t.bid, t.ask, t.bid_size) == (False, 1.0, None, 2.5)
    with pytest.raises(BadInput):
        tick_from_record({**rec, "bid": None})
    with pytest.raises(BadInput):
        tick_from_record({**rec, "kind": "OTHER"})
    with pytest.raises(BadInput):
        tick_from_record({**rec, "ts_ns": "x"})
    b = bar(is_final=True)
    values = {"instrument_id": b.instrument_id, "venue": b.venue, "symbol": b.symbol, "currency": b.currency,
              "interval": b.interval, "window_start_ms": b.window_start_ms, "window_end_ms": b.window_end_ms,
              "open": b.open, "high": b.high, "low": b.low, "close": b.close, "volume": b.volume,
              "vwap": b.vwap, "trade_count": b.trade_count, "is_final": True, "version": b.version,
              "first_ts_ns": b.first_ts_ns, "last_ts_ns": b.last_ts_ns, "max_ingest_ns": 0}
    assert bar_from_record(values) == b
    with pytest.raises(BadInput):
        bar_from_record({**values, "is_final": None})


# --- properties: order of arrival cannot change the final state ---

ticks_st = st.builds(
    lambda ts, seq, kind, px: trade(ts=TS + ts, seq=seq, price=px) if kind else quote(
        ts=TS + ts, seq=seq, bid=px if kind is None else None, ask=px + 1),
    st.integers(0, 20), st.none() | st.integers(0, 3), st.none() | st.booleans(),
    st.floats(-100, 100, allow_nan=False),
)
bars_st = st.builds(
    lambda w, v, f, c: bar(window_start_ms=1_763_908_200_000 + w * 60_000, version=v, is_final=f, close=c),
    st.integers(0, 6), st.integers(1, 4), st.booleans(), st.floats(0, 10, allow_nan=False),
)


def _unique_orders(writes: list[HashWrite | SeriesWrite]) -> list[HashWrite | SeriesWrite]:
    # ties between different values are decided by arrival order, so keep one write per order key
    seen: dict[tuple[str, str], HashWrite | SeriesWrite] = {}
    for w in writes:
        if isinstance(w, HashWrite):
            k = (w.key, w.order_field + w.order)
        else:
            k = (w.key, f"{w.score}:{w.version}")
        seen.setdefault(k, w)
    return list(seen.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(ticks_st, max_size=12), st.lists(bars_st, max_size=10), st.randoms(use_true_random=False))
def test_final_state_independent_of_order(ticks: list[Tick], bars: list[Bar], rnd: Any) -> None:
    writes: list[HashWrite | SeriesWrite] = []
    for t in ticks:
        writes.extend(tick_writes(t))
    for b in bars:
        writes.extend(bar_writes(b, max_final_bars=4))
    writes = _unique_orders(writes)
    expected = apply_all(writes)
    shuffled = list(writes)
    rnd.shuffle(shuffled)
    assert apply_all(shuffled) == expected
    # a replay of everything changes nothing
    state = apply_all(writes)
    for w in writes:
        sub = state.setdefault(w.key, {})
        assert not (apply_hash_write(sub, w) if isinstance(w, HashWrite) else apply_series_write(sub, w))
    assert state == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(ticks_st, max_size=12), st.lists(bars_st, max_size=10))
def test_coalescing_gives_same_state(ticks: list[Tick], bars: list[Bar]) -> None:
    writes: list[HashWrite | SeriesWrite] = []
    for t in ticks:
        writes.extend(tick_writes(t))
    for b in bars:
        writes.extend(bar_writes(b, max_final_bars=4))
    # split into two batches at every point: coalescing each batch must not change the outcome
    for cut in itertools.islice(range(len(writes) + 1), 0, None, 3):
        pending = PendingWrites()
        state: dict[str, Any] = {}
        for batch in (writes[:cut], writes[cut:]):
            pending.extend(batch)
            for w in pending.writes():
                sub = state.setdefault(w.key, {})
                apply_hash_write(sub, w) if isinstance(w, HashWrite) else apply_series_write(sub, w)
            pending.clear()
        assert state == apply_all(writes)


def _rec(topic: str, value: bytes | None, offset: int = 0) -> Any:
    from dataproc_shared.records import InRecord
    return InRecord(topic=topic, partition=0, offset=offset, key=b"XNYM:CLZ6", value=value, timestamp_ms=0)


def test_project_records_routes_topics_and_dead_letters_bad_input() -> None:
    from dataproc_shared import avro
    from dataproc_shared.records import DeadLetterReason
    from projection.transform import InputTopics, project_records

    tick = {"instrument_id": "I1", "venue": "XNYM", "venue_symbol": "CLZ6", "symbol": "CL",
            "asset_class": "fut", "currency": "USD", "tick_size": None, "multiplier": None,
            "venue_timezone": "UTC", "kind": "TRADE",
            "ts_ns": TS, "seq": None, "trade_id": None, "price": 1.5, "size": 2.0, "bid": None, "ask": None,
            "bid_size": None, "ask_size": None, "ingest_ns": TS, "source_partition": 0, "source_offset": 1}
    b = bar(is_final=True, iid="I1")
    bar_rec = {"instrument_id": "I1", "venue": "XNYM", "symbol": "CL", "currency": "USD", "interval": "1m",
               "window_start_ms": b.window_start_ms, "window_end_ms": b.window_end_ms,
               "open": 1.0, "high": 2.0,
               "low": 0.5, "close": 1.5, "volume": 3.0, "vwap": 1.2, "trade_count": 2, "is_final": True,
               "version": 3, "first_ts_ns": 1, "last_ts_ns": 2, "max_ingest_ns": 3, "source_partition": 0,
               "offset_from": 0, "offset_to": 1}
    topics = InputTopics(ticks="ticks-t", bars="bars-t")
    pending = PendingWrites()
    batch = [
        _rec("ticks-t", avro.encode("enriched_tick", tick), 5),
        _rec("bars-t", avro.encode("bar", bar_rec), 6),
        _rec("ticks-t", b"not avro", 7),
        _rec("ticks-t", None, 8),
        _rec("ticks-t", avro.encode("enriched_tick", {**tick, "kind": "QUOTE"}), 9),  # quote without sides
        _rec("other", b"x", 10),
    ]
    dead = project_records(batch, topics, avro.decode, pending, max_final_bars=9)
    assert [(d.source.offset, d.reason) for d in dead] == [
        (7, DeadLetterReason.UNDECODABLE), (8, DeadLetterReason.UNDECODABLE), (9, DeadLetterReason.BAD_FIELD),
        (10, DeadLetterReason.PROCESSING_ERROR)]
    writes = pending.writes()
    assert [type(w).__name__ for w in writes] == ["HashWrite", "HashWrite", "SeriesWrite"]
    trade_write = writes[0]
    assert isinstance(trade_write, HashWrite)
    assert trade_write.order == order_key(TS, -(1 << 63), 5)
    series = writes[2]
    assert isinstance(series, SeriesWrite)
    assert series.max_len == 9
    assert series.version == 3
