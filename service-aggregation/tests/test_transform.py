"""Unit and property tests of the pure windowing core (no servers)."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import pytest
from aggregation.transform import (
    META_KEY,
    NS_PER_MS,
    NS_PER_S,
    AggregationError,
    BadIntervalError,
    BadStateError,
    Bar,
    ChangelogFormat,
    Interval,
    Tick,
    WindowConfig,
    WindowEngine,
    decode_instrument_state,
    encode_instrument_state,
    instrument_changelog_key,
    parse_interval,
    window_changelog_key,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MIN = 60 * NS_PER_S


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * NS_PER_S

    def __call__(self) -> int:
        return self.now


def trade(ts_ns: int, price: float, size: float = 1.0, *, offset: int, seq: int | None = None,
          inst: str = "XNYM:CLZ6", partition: int = 0) -> Tick:
    venue, symbol = inst.split(":")
    return Tick(inst, venue, symbol, "USD", True, ts_ns, seq, price, size, 7, partition, offset)


def quote(ts_ns: int, *, offset: int, partition: int = 0, inst: str = "XNYM:CLZ6") -> Tick:
    venue, symbol = inst.split(":")
    return Tick(inst, venue, symbol, "USD", False, ts_ns, None, 0.0, 0.0, 7, partition, offset)


def cfg(*names: str, lateness_ms: int = 5000, idle_ms: int = 30_000, update_ms: int = 1000) -> WindowConfig:
    return WindowConfig.from_names(names or ("1m",), lateness_ms, idle_ms, update_ms)


# ---------------------------------------------------------------------------------------------- examples
def test_parse_interval() -> None:
    assert parse_interval("1m") == MIN
    assert parse_interval("5m") == 5 * MIN
    assert parse_interval("1h") == 60 * MIN
    assert parse_interval("250ms") == 250 * NS_PER_MS
    assert parse_interval("1d") == 1440 * MIN
    assert Interval.parse("1m").window_start(MIN + 5) == MIN
    assert Interval.parse("1m").window_start(-1) == -MIN
    for bad in ("", "0m", "1x", "m", "1.5m", "-1m"):
        with pytest.raises(BadIntervalError):
            parse_interval(bad)


def test_ohlcv_and_finalisation_on_watermark() -> None:
    eng = WindowEngine(cfg("1m"), FakeClock())
    base = 100 * MIN
    assert eng.apply(trade(base + 10 * NS_PER_S, 10.0, 2, offset=0)).finals == []
    eng.apply(trade(base + 20 * NS_PER_S, 12.0, 1, offset=1))
    eng.apply(trade(base + 5 * NS_PER_S, 9.0, 1, offset=2))  # earlier event time, arrives later
    eng.apply(trade(base + 59 * NS_PER_S, 11.0, 4, offset=3))
    # watermark reaches end + lateness exactly: still open
    assert eng.apply(quote(base + MIN + 5 * NS_PER_S, offset=4)).finals == []
    finals = eng.apply(quote(base + MIN + 5 * NS_PER_S + 1, offset=5)).finals
    assert len(finals) == 1
    b = finals[0]
    assert (b.open, b.high, b.low, b.close) == (9.0, 12.0, 9.0, 11.0)
    assert b.volume == 8.0
    assert b.vwap == pytest.approx((20 + 12 + 9 + 44) / 8)
    assert b.trade_count == 4
    assert b.is_final
    assert b.version == 5
    assert (b.window_start_ns, b.window_end_ns) == (base, base + MIN)
    assert (b.first_ts_ns, b.last_ts_ns) == (base + 5 * NS_PER_S, base + 59 * NS_PER_S)
    assert (b.source_partition, b.offset_from, b.offset_to) == (0, 0, 3)
    assert eng.open_windows() == 0


def test_tie_break_ts_then_seq_then_arrival() -> None:
    eng = WindowEngine(cfg("1m"), FakeClock())
    t = 10 * MIN + NS_PER_S
    eng.apply(trade(t, 3.0, seq=5, offset=10))
    eng.apply(trade(t, 1.0, seq=2, offset=11))
    eng.apply(trade(t, 2.0, seq=2, offset=12))  # same ts and seq: later arrival
    eng.apply(trade(t, 4.0, seq=None, offset=13))  # no seq sorts first at equal ts
    eng.apply(trade(t, 5.0, seq=5, offset=14))
    [bar] = eng.close_all(0)
    assert bar.open == 4.0
    assert bar.close == 5.0


def test_late_trade_is_reported_and_changes_nothing() -> None:
    eng = WindowEngine(cfg("1m", "5m", lateness_ms=1000), FakeClock())
    eng.apply(trade(3 * MIN + 1, 10.0, offset=0))
    closed = eng.apply(trade(4 * MIN + 2 * NS_PER_S, 11.0, offset=1)).finals
    assert [(b.interval, b.window_start_ns) for b in closed] == [("1m", 3 * MIN)]
    applied = eng.apply(trade(3 * MIN + 30 * NS_PER_S, 99.0, offset=2))
    assert applied.late is not None
    assert applied.late.intervals == ("1m",)  # still on time for the 5m window
    assert applied.finals == []
    finals = {b.interval: b for b in eng.close_all(0)}
    assert finals["5m"].high == 99.0
    assert finals["5m"].trade_count == 3
    assert finals["1m"].trade_count == 1
    assert finals["1m"].window_start_ns == 4 * MIN


def test_trade_for_a_never_opened_but_passed_window_is_late() -> None:
    eng = WindowEngine(cfg("1m", lateness_ms=0), FakeClock())
    eng.apply(quote(10 * MIN, offset=0))
    late = eng.apply(trade(8 * MIN, 1.0, offset=1)).late
    assert late is not None
    assert late.intervals == ("1m",)
    assert late.watermark_ns == 10 * MIN
    assert eng.open_windows() == 0


def test_a_partition_with_a_backlog_is_not_idle() -> None:
    clock = FakeClock()
    eng = WindowEngine(cfg("1m", idle_ms=10_000), clock)
    eng.apply(trade(10 * MIN, 1.0, offset=0))
    clock.now += 9 * NS_PER_S
    eng.mark_busy(0)  # records still waiting on partition 0: the consumer has just not reached them
    eng.mark_busy(7)  # a partition the engine has not seen: nothing to do
    clock.now += 9 * NS_PER_S
    assert eng.close_idle() == []
    clock.now += 2 * NS_PER_S
    assert [b.is_final for b in eng.close_idle()] == [True]


def test_idle_partition_closes_and_later_trades_for_closed_windows_are_late() -> None:
    clock = FakeClock()
    clock.now = 10_000 * NS_PER_S  # the event times below lie hours in the past: a replayed backlog
    eng = WindowEngine(cfg("1m", "1h", idle_ms=10_000), clock)
    eng.apply(trade(10 * MIN, 1.0, offset=0))
    eng.apply(trade(5 * MIN, 1.0, offset=0, partition=1, inst="X:B"))
    clock.now += 9 * NS_PER_S
    eng.apply(trade(10 * MIN + 1, 2.0, offset=1))  # partition 0 active again
    clock.now += 2 * NS_PER_S
    idle = eng.close_idle()
    assert sorted((b.source_partition, b.interval) for b in idle) == [(1, "1h"), (1, "1m")]
    assert all(b.is_final for b in idle)
    applied = eng.apply(trade(5 * MIN + 3, 9.0, offset=1, partition=1, inst="X:B"))
    assert applied.late is not None
    assert applied.late.intervals == ("1m", "1h")
    # the next minute is a new window for 1m, while the hour stays closed
    applied = eng.apply(trade(6 * MIN, 9.0, offset=2, partition=1, inst="X:B"))
    assert applied.late is not None
    assert applied.late.intervals == ("1h",)
    # another instrument on the idle-closed partition is not affected
    assert eng.apply(trade(5 * MIN + 4, 9.0, offset=3, partition=1, inst="X:C")).late is None


S = NS_PER_S


def live_engine(clock: FakeClock) -> WindowEngine:
    """A quiet live feed on partition 0: two trades of the minute [900 s, 960 s), the wall clock at
    957 s; the minute closes at 965 s, the hour [0, 3600 s) at 3605 s (5 s lateness)."""
    clock.now = 957 * S
    eng = WindowEngine(cfg("1m", "1h", idle_ms=10_000), clock)
    eng.apply(trade(950 * S, 1.0, offset=0))
    eng.apply(trade(955 * S, 2.0, offset=1))
    return eng


def test_idle_close_finalizes_only_the_windows_whose_close_has_passed_on_the_wall_clock() -> None:
    clock = FakeClock()
    eng = live_engine(clock)
    clock.now = 964 * S  # idle for 7 s only
    assert eng.close_idle() == []
    clock.now = 967 * S  # idle for 10 s: the minute's close (965 s) has passed, the hour's has not
    idle = eng.close_idle()
    assert [(b.interval, b.window_start_ns, b.is_final, b.trade_count, b.version) for b in idle] == [
        ("1m", 900 * S, True, 2, 3)]
    assert eng.open_windows() == 1
    assert eng.idle_open_windows() == (1, 3605 * S)
    clock.now = 3605 * S  # the hour's close reached, not passed
    assert eng.close_idle() == []
    clock.now += NS_PER_S  # one timer period later
    hour = eng.close_idle()
    assert [(b.interval, b.window_start_ns, b.is_final, b.trade_count, b.version) for b in hour] == [
        ("1h", 0, True, 2, 3)]
    assert eng.open_windows() == 0
    assert eng.idle_open_windows() == (0, None)


def test_a_trade_for_the_window_left_open_is_on_time_one_for_the_idle_closed_window_late() -> None:
    clock = FakeClock()
    eng = live_engine(clock)
    clock.now = 967 * S
    assert len(eng.close_idle()) == 1  # the minute
    clock.now = 1100 * S
    late = eng.apply(trade(958 * S, 3.0, offset=2)).late  # the idle-closed minute; the hour is open
    assert late is not None
    assert late.intervals == ("1m",)
    assert eng.apply(trade(1090 * S, 4.0, offset=3)).late is None  # a new minute of the same hour
    clock.now = 1109 * S  # active again: not idle before 1110 s, though the new minute's close...
    assert eng.close_idle() == []
    clock.now = 1146 * S  # ...(1145 s) has passed by now
    assert [(b.interval, b.trade_count) for b in eng.close_idle()] == [("1m", 1)]
    clock.now = 3606 * S
    hour = eng.close_idle()
    assert [(b.interval, b.trade_count, b.open, b.close, b.version) for b in hour] == [("1h", 4, 1.0, 4.0, 5)]


def test_restore_between_idle_closes_neither_reopens_nor_closes_twice() -> None:
    clock = FakeClock()
    eng = live_engine(clock)
    changelog: dict[bytes, bytes | None] = dict(eng.changes(0))
    clock.now = 967 * S
    assert [b.interval for b in eng.close_idle()] == ["1m"]
    changelog.update(eng.changes(0))
    # a restart: the minute stays closed, the hour open, with its trades
    again = WindowEngine(eng.config, clock)
    again.restore_partition(0, changelog.items())
    assert again.changes(0) == []
    assert again.open_windows() == 1
    clock.now = 1000 * S
    for engine in (eng, again):
        late = engine.apply(trade(959 * S, 9.0, offset=2)).late
        assert late is not None
        assert late.intervals == ("1m",)
        assert engine.apply(trade(990 * S, 5.0, offset=3)).late is None
    # the watermark (990 s) has passed the minute: its idle-closed record is dropped from the meta
    meta = orjson.loads(dict(again.changes(0))[META_KEY])
    assert meta == {"wm": 990 * S, "closed": []}
    clock.now = 3606 * S
    finals = eng.close_idle()
    assert again.close_idle() == finals
    assert [(b.interval, b.window_start_ns, b.trade_count, b.version) for b in finals] == [
        ("1m", 960 * S, 1, 2), ("1h", 0, 4, 5)]


def test_restore_after_the_idle_close_keeps_the_closed_window_late() -> None:
    clock = FakeClock()
    eng = live_engine(clock)
    clock.now = 967 * S
    eng.close_idle()
    changes = dict(eng.changes(0))
    closed = [["XNYM:CLZ6", "1m", 900 * S, 960 * S]]
    assert orjson.loads(changes[META_KEY]) == {"wm": 955 * S, "closed": closed}
    again = WindowEngine(eng.config, clock)
    again.restore_partition(0, changes.items())
    late = again.apply(trade(901 * S, 1.0, offset=2)).late
    assert late is not None
    assert late.intervals == ("1m",)


def test_event_times_ahead_of_the_wall_clock_wait_for_it() -> None:
    clock = FakeClock()  # 1000 s
    eng = WindowEngine(cfg("1m", idle_ms=10_000), clock)
    eng.apply(trade(1200 * S, 1.0, offset=0))  # 200 s ahead (clock skew): the minute closes at 1265 s
    clock.now = 1100 * S
    assert eng.close_idle() == []
    assert eng.idle_open_windows() == (1, 1265 * S)
    clock.now = 1266 * S
    assert [b.window_start_ns for b in eng.close_idle()] == [1200 * S]


def test_a_replayed_backlog_closes_everything_at_the_idle_timeout() -> None:
    clock = FakeClock()
    clock.now = 100_000 * S  # the event times below lie more than a day in the past
    eng = WindowEngine(cfg("1m", "5m", "1h", idle_ms=10_000), clock)
    eng.apply(trade(100 * S, 1.0, offset=0))
    eng.apply(trade(4000 * S, 2.0, offset=0, inst="X:B", partition=1))
    clock.now += 10 * S
    closed = eng.close_idle()
    assert len(closed) == 6
    assert all(b.is_final for b in closed)
    # in (window end, key) order, as the watermark would have closed them
    assert [b.window_end_ns for b in closed] == sorted(b.window_end_ns for b in closed)
    assert eng.open_windows() == 0
    assert eng.idle_open_windows() == (0, None)


def test_updates_are_paced_and_versions_grow() -> None:
    clock = FakeClock()
    eng = WindowEngine(cfg("1m", update_ms=1000), clock)
    eng.apply(trade(MIN, 1.0, offset=0))
    assert eng.flush_updates() == []  # less than 1 s since the partition started
    clock.now += NS_PER_S
    [u1] = eng.flush_updates()
    assert (u1.is_final, u1.version, u1.trade_count) == (False, 1, 1)
    eng.apply(trade(MIN + 1, 2.0, offset=1))
    eng.apply(trade(MIN + 2, 3.0, offset=2))
    assert eng.flush_updates() == []
    clock.now += NS_PER_S
    [u2] = eng.flush_updates()
    assert (u2.version, u2.close) == (3, 3.0)
    assert eng.flush_updates(force=True) == []  # nothing changed since
    [f] = eng.close_all(0)
    assert f.version == 4
    assert eng.flush_updates(force=True) == []  # a closed bar gets no update after its final


def test_updates_of_every_partition_fall_due_together() -> None:
    clock = FakeClock()
    eng = WindowEngine(cfg("1m", update_ms=1000), clock)
    eng.apply(trade(MIN, 1.0, offset=0, partition=0))
    clock.now += 600 * NS_PER_MS
    eng.apply(trade(MIN, 2.0, offset=0, partition=1, inst="X:B"))
    assert eng.flush_updates() == []
    clock.now += 400 * NS_PER_MS
    # one flush takes both partitions' changed bars, though partition 1 changed 0.4 s ago only
    assert sorted(b.source_partition for b in eng.flush_updates()) == [0, 1]
    eng.apply(trade(MIN + 1, 3.0, offset=1, partition=1, inst="X:B"))
    clock.now += 999 * NS_PER_MS
    assert eng.flush_updates() == []  # at most once per update interval per bar
    clock.now += 1 * NS_PER_MS
    [u] = eng.flush_updates()
    assert (u.source_partition, u.version, u.close) == (1, 2, 3.0)


def test_update_cadence_per_interval() -> None:
    clock = FakeClock()
    config = WindowConfig.from_names(("1m", "1h"), 5000, 30_000, 1000, {"1h": 5000})
    assert (config.update_every_ns("1m"), config.update_every_ns("1h")) == (NS_PER_S, 5 * NS_PER_S)
    eng = WindowEngine(config, clock)
    emitted: list[tuple[str, int]] = []
    for second in range(1, 11):
        eng.apply(trade(MIN + second, float(second), offset=second))
        clock.now += NS_PER_S
        emitted += [(b.interval, b.version) for b in eng.flush_updates()]
    assert [v for i, v in emitted if i == "1m"] == list(range(1, 11))
    # the hour's bar every 5 s, carrying every trade applied in between (versions count trades)
    assert [v for i, v in emitted if i == "1h"] == [5, 10]
    eng.apply(trade(MIN + 11, 11.0, offset=11))
    assert sorted(b.interval for b in eng.flush_updates(force=True)) == ["1h", "1m"]


def test_update_cadence_of_an_unknown_interval_is_refused() -> None:
    with pytest.raises(AggregationError, match="not a bar interval"):
        WindowConfig.from_names(("1m",), 5000, 30_000, 1000, {"5m": 1000})


def test_state_round_trip_through_changelog_entries() -> None:
    clock = FakeClock()
    eng = WindowEngine(cfg("1m", "5m"), clock)
    log: dict[bytes, bytes | None] = {}
    eng.apply(trade(MIN, 1.0, offset=0, seq=3))
    eng.apply(trade(MIN + 5, 2.5, 2, offset=1))
    eng.apply(trade(3 * MIN, 0.5, offset=2))
    log.update(eng.changes(0))
    assert eng.changes(0) == []
    restored = WindowEngine(cfg("1m", "5m"), clock)
    restored.restore_partition(0, log.items())
    assert restored.watermark(0) == 3 * MIN
    assert restored.open_windows() == eng.open_windows()
    for e in (eng, restored):
        e.apply(trade(3 * MIN + 1, 4.0, offset=3))
    assert restored.close_all(0) == eng.close_all(0)


def test_changes_are_one_entry_per_instrument_per_cycle() -> None:
    clock = FakeClock()
    eng = WindowEngine(cfg("1m", "5m", "1h"), clock)
    for i in range(50):
        eng.apply(trade(MIN + i * NS_PER_S // 10, 1.0 + i, offset=2 * i, inst="A:X"))
        eng.apply(trade(MIN + i * NS_PER_S // 10, 2.0, offset=2 * i + 1, inst="B:Y"))
    eng.apply(quote(MIN + 6 * NS_PER_S, offset=100))
    entries = dict(eng.changes(0))
    # 101 records, 6 open windows: one entry per instrument (all its intervals) and the metadata
    assert set(entries) == {b"i|A:X", b"i|B:Y", b"meta"}
    windows = decode_instrument_state(entries[b"i|A:X"] or b"")
    assert sorted((w.interval, w.start, w.count) for w in windows) == [
        ("1h", 0, 50), ("1m", MIN, 50), ("5m", 0, 50)]
    assert eng.changes(0) == []
    # a quote moves only the watermark; a trade of one instrument rewrites only that instrument
    eng.apply(quote(MIN + 7 * NS_PER_S, offset=101))
    assert [k for k, _ in eng.changes(0)] == [b"meta"]
    eng.apply(trade(MIN + 8 * NS_PER_S, 9.0, offset=102, inst="B:Y"))
    assert [k for k, _ in eng.changes(0)] == [b"i|B:Y", b"meta"]
    # the 1m windows close: both instruments are rewritten without them; closing all: tombstones
    eng.apply(quote(2 * MIN + 6 * NS_PER_S, offset=103))
    entries = dict(eng.changes(0))
    assert sorted(w.interval for w in decode_instrument_state(entries[b"i|A:X"] or b"")) == ["1h", "5m"]
    assert len(eng.close_all(0)) == 4
    entries = dict(eng.changes(0))
    assert entries[b"i|A:X"] is None
    assert entries[b"i|B:Y"] is None


def _window_with(**fields: object) -> object:
    eng = WindowEngine(cfg("1m"), FakeClock())
    eng.apply(trade(MIN, 1.0, offset=0))
    [(_, raw)] = [e for e in eng.changes(0) if e[0] != b"meta"]
    [w] = decode_instrument_state(raw or b"")
    for name, value in fields.items():
        setattr(w, name, value)
    return w


@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=6, max_size=6),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=14, max_size=14),
    st.text(max_size=12), st.text(max_size=12), st.booleans(),
)
def test_instrument_state_round_trips_bit_for_bit(
    floats: list[float], ints: list[int], name: str, symbol: str, other_strings: bool,
) -> None:
    f, n = floats, ints
    a = _window_with(instrument_id=name, interval="1m", start=n[0], end=n[1], open=f[0], high=f[1], low=f[2],
                     close=f[3], volume=f[4], pv=f[5], open_key=tuple(n[2:6]), close_key=tuple(n[6:10]),
                     count=n[10], max_ingest=n[11], off_from=n[12], off_to=n[13], symbol=symbol)
    b = _window_with(instrument_id=name, interval="5m", symbol=symbol + "!" if other_strings else symbol,
                     currency="EUR" if other_strings else "USD")
    raw = encode_instrument_state([a, b])  # type: ignore[list-item]
    got = decode_instrument_state(raw)
    assert len(got) == 2
    for want, have in zip((a, b), got, strict=True):
        for slot in type(have).__slots__:
            x, y = getattr(want, slot), getattr(have, slot)
            if isinstance(x, float):
                assert struct.pack("<d", x) == struct.pack("<d", y), slot
            else:
                assert x == y, slot
    assert math.isnan(got[0].open) == math.isnan(f[0])


def test_malformed_instrument_state_is_a_bad_state_error() -> None:
    eng = WindowEngine(cfg("1m", "5m"), FakeClock())
    eng.apply(trade(MIN, 1.0, offset=0))
    raw = dict(eng.changes(0))[b"i|XNYM:CLZ6"] or b""
    assert len(decode_instrument_state(raw)) == 2
    for cut in range(len(raw)):
        with pytest.raises(BadStateError):
            decode_instrument_state(raw[:cut])
    for bad in (b"\x02" + raw[1:], raw + b"\x00"):
        with pytest.raises(BadStateError):
            decode_instrument_state(bad)
    with pytest.raises(BadStateError):
        WindowEngine(cfg("1m"), FakeClock()).restore_partition(0, [(b"i|X", raw[:-3])])


@pytest.mark.parametrize(("old", "new"), [("window", "instrument"), ("instrument", "window")])
def test_a_changelog_in_the_other_format_restores_and_is_converted(old: ChangelogFormat,
                                                                    new: ChangelogFormat) -> None:
    clock = FakeClock()
    config = cfg("1m", "5m", "1h")
    before = WindowEngine(config, clock, old)
    log: dict[bytes, bytes | None] = {}
    ticks = [trade(MIN + i * NS_PER_S, 1.0 + i % 7, 1.0 + i % 3, offset=i, inst=("A:X", "B:Y", "C:Z")[i % 3])
             for i in range(200)]
    for t in ticks[:150]:
        before.apply(t)
    log.update(before.changes(0))
    assert all(k.startswith(b"w|" if old == "window" else b"i|") for k in log if k != b"meta")
    after = WindowEngine(config, clock, new)
    after.restore_partition(0, log.items())
    assert after.open_windows() == before.open_windows()
    # the first changes rewrite every restored instrument in the new format, old keys tombstoned
    conversion = after.changes(0)
    old_keys = {k for k, v in log.items() if v is not None and k != b"meta"}
    assert {k for k, v in conversion if v is None} == old_keys
    if new == "instrument":
        assert {k for k, v in conversion if v is not None} == {instrument_changelog_key(i)
                                                              for i in ("A:X", "B:Y", "C:Z")}
    else:
        assert {k for k, v in conversion if v is not None} == {window_changelog_key(k)
                                                              for k in after._parts[0].windows}
    log.update(conversion)
    assert after.changes(0) == []
    for t in ticks[150:]:
        before.apply(t)
        after.apply(t)
    log.update(after.changes(0))
    # a second restore from the converted log: no old keys left alive, same bars to the end
    again = WindowEngine(config, clock, new)
    again.restore_partition(0, log.items())
    assert again.changes(0) == []
    assert again.close_all(0) == after.close_all(0) == before.close_all(0)


# ---------------------------------------------------------------------------------- property-based
INSTRUMENTS = ("A:X", "A:Y", "B:Z")
PART_OF = {"A:X": 0, "A:Y": 1, "B:Z": 0}
PROP_CFG = WindowConfig.from_names(("1s", "5s", "1m"), allowed_lateness_ms=2000, idle_timeout_ms=5_000,
                                   update_interval_ms=500)
#: Wall-clock step of the fake clock per record in the property tests.
TICK_WALL_NS = 100 * NS_PER_MS


@dataclass(frozen=True)
class Idle:
    """The idle timer runs with the wall clock at `at_ns`, past the idle timeout since the last record."""

    at_ns: int


def walls(events: Sequence[Tick | Idle]) -> list[int]:
    """The wall clock at each event: an `Idle` sets it, each record moves it on by `TICK_WALL_NS`."""
    out: list[int] = []
    wall = 0
    for ev in events:
        wall = ev.at_ns if isinstance(ev, Idle) else wall + TICK_WALL_NS
        out.append(wall)
    return out


def _ref_bar(trades: list[Tick], interval: str, start: int, end: int) -> Bar:
    first = min(trades, key=lambda t: t.sort_key)
    last = max(trades, key=lambda t: t.sort_key)
    volume = 0.0
    pv = 0.0
    for t in trades:
        volume += t.size
        pv += t.price * t.size
    return Bar(first.instrument_id, first.venue, first.symbol, first.currency, interval, start, end,
               first.price, max(t.price for t in trades), min(t.price for t in trades), last.price, volume,
               pv / volume, len(trades), True, len(trades) + 1, first.ts_ns, last.ts_ns,
               max(t.ingest_ns for t in trades), first.partition, min(t.offset for t in trades),
               max(t.offset for t in trades), first.source_key)


def reference(events: list[Tick | Idle], config: WindowConfig) -> tuple[list[Bar], int]:
    """Final bars and late (trade, interval) count, computed naively from the whole sequence."""
    lateness = config.allowed_lateness_ns
    wm: dict[int, int] = {}
    closed_through: dict[tuple[int, str, str], int] = {}
    open_: dict[tuple[int, str, str, int], list[Tick]] = {}
    finals: list[Bar] = []
    late = 0

    def close(pred: int | None, idle_at: int | None = None) -> None:
        """Close by partition `pred`'s watermark; or, with `idle_at`, the windows every (idle)
        partition has whose close lies before that wall-clock time; or, with neither, everything."""
        for k in sorted(open_, key=lambda k: (k[3] + parse_interval(k[2]), k[1:])):
            p, inst, name, start = k
            end = start + parse_interval(name)
            if idle_at is not None:
                if end + lateness < idle_at:
                    finals.append(_ref_bar(open_.pop(k), name, start, end))
                    ck = (p, inst, name)
                    closed_through[ck] = max(closed_through.get(ck, start), start)
            elif pred is None or (p == pred and end + lateness < wm[p]):
                finals.append(_ref_bar(open_.pop(k), name, start, end))

    for ev in events:
        if isinstance(ev, Idle):
            close(None, ev.at_ns)
            continue
        p = ev.partition
        if ev.is_trade:
            for iv in config.intervals:
                start = iv.window_start(ev.ts_ns)
                end = start + iv.length_ns
                ct = closed_through.get((p, ev.instrument_id, iv.name))
                if (p in wm and end + lateness < wm[p]) or (ct is not None and start <= ct):
                    late += 1
                    continue
                open_.setdefault((p, ev.instrument_id, iv.name, start), []).append(ev)
        if p not in wm or ev.ts_ns > wm[p]:
            wm[p] = ev.ts_ns
            close(p)
    close(None)
    return finals, late


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Tick | Idle], list[int], set[int]]:
    n = draw(st.integers(1, 120))
    # the wall clock starts anywhere from well before the first event time to after the last one:
    # idle closes then meet windows whose close has passed and windows still ahead of the clock
    wall = draw(st.integers(0, 240)) * NS_PER_S
    events: list[Tick | Idle] = [Idle(wall)]
    offsets = {0: 0, 1: 0}
    clock_ts = 0
    for _ in range(n):
        if draw(st.integers(0, 30)) == 0:
            wall += PROP_CFG.idle_timeout_ns + draw(st.integers(0, 40)) * 500 * NS_PER_MS
            events.append(Idle(wall))
            continue
        wall += TICK_WALL_NS
        clock_ts += draw(st.integers(0, 6)) * 250 * NS_PER_MS
        # arrival out of order: mostly within the lateness, sometimes far behind (late)
        back = draw(st.one_of(st.integers(0, 10), st.integers(0, 80))) * 250 * NS_PER_MS
        inst = draw(st.sampled_from(INSTRUMENTS))
        p = PART_OF[inst]
        venue, symbol = inst.split(":")
        is_trade = draw(st.integers(0, 4)) > 0
        events.append(Tick(
            inst, venue, symbol, "USD", is_trade, max(0, clock_ts - back),
            draw(st.one_of(st.none(), st.integers(0, 3))),
            draw(st.sampled_from([1.0, 1.5, 2.25, 99.0, -3.0, 0.1])),
            draw(st.sampled_from([1.0, 2.0, 0.5, 100.0])),
            draw(st.integers(0, 10**12)), p, offsets[p],
        ))
        offsets[p] += 1
    cuts = sorted(set(draw(st.lists(st.integers(0, len(events)), max_size=12))))
    crashes = set(draw(st.lists(st.integers(0, len(cuts)), max_size=4)))
    return events, cuts, crashes


def run_engine(events: list[Tick | Idle], cuts: list[int], crashes: set[int], config: WindowConfig,
               formats: Sequence[ChangelogFormat] = ("instrument",)) -> tuple[list[Bar], list[Bar], int]:
    """Run in batches (one transaction each); crash after processing batch i for i in `crashes`
    (its outputs and state changes are discarded, the engine is rebuilt from the committed
    changelog and the batch replayed). The engine writes `formats[0]`, after the n-th crash
    `formats[n % len(formats)]` (an upgrade or downgrade of the changelog format with the restart).
    Returns committed finals, committed updates, late count."""
    clock = FakeClock()
    wall = walls(events)
    clock.now = wall[0]
    changelog: dict[int, dict[bytes, bytes | None]] = {0: {}, 1: {}}
    eng = WindowEngine(config, clock, formats[0])
    finals: list[Bar] = []
    updates: list[Bar] = []
    late = 0
    bounds = [0, *cuts, len(events)]
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    i = 0
    crashed: set[int] = set()
    while i < len(batches):
        out: list[Bar] = []
        batch_late = 0
        for j, ev in enumerate(batches[i], start=bounds[i]):
            clock.now = wall[j]
            if isinstance(ev, Idle):
                out.extend(eng.close_idle())
                continue
            applied = eng.apply(ev)
            out.extend(applied.finals)
            if applied.late is not None:
                batch_late += len(applied.late.intervals)
        out.extend(eng.flush_updates())
        changes = {p: eng.changes(p) for p in (0, 1)}
        if i in crashes and i not in crashed:
            crashed.add(i)
            # restored as the batch began: the batch is replayed from there
            clock.now = wall[bounds[i] - 1] if bounds[i] > 0 else wall[0] - config.idle_timeout_ns
            eng = WindowEngine(config, clock, formats[len(crashed) % len(formats)])
            for p in (0, 1):
                eng.restore_partition(p, changelog[p].items())
            continue
        for p in (0, 1):
            changelog[p].update(changes[p])
        finals.extend(b for b in out if b.is_final)
        updates.extend(b for b in out if not b.is_final)
        late += batch_late
        i += 1
    # the feed stops for good: once the wall clock has passed every close, every window is final
    clock.now = max(wall[-1], max((ev.ts_ns for ev in events if isinstance(ev, Tick)), default=0)) + 2 * MIN
    finals.extend(eng.close_idle())
    assert eng.open_windows() == 0
    return finals, updates, late


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_engine_matches_naive_reference_whatever_batches_and_crashes(
    scenario: tuple[list[Tick | Idle], list[int], set[int]],
) -> None:
    events, cuts, crashes = scenario
    expected, expected_late = reference(events, PROP_CFG)
    finals, updates, late = run_engine(events, cuts, crashes, PROP_CFG)

    def order(bars: list[Bar]) -> list[Bar]:
        return sorted(bars, key=lambda b: (b.source_partition, b.key))

    assert order(finals) == order(expected)
    assert late == expected_late
    # one final per bar, never an update after it, versions strictly growing per bar
    seen: dict[tuple[str, str, int], int] = {}
    final_keys = {b.key for b in finals}
    assert len(final_keys) == len(finals)
    for u in updates:
        assert u.version == u.trade_count
        assert u.version > seen.get(u.key, 0)
        seen[u.key] = u.version
    by_key = {b.key: b for b in finals}
    for k, v in seen.items():
        assert v < by_key[k].version


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.sampled_from(["instrument", "window"]), min_size=1, max_size=4))
def test_changelog_format_switches_on_restarts_keep_the_finals(
    scenario: tuple[list[Tick | Idle], list[int], set[int]], formats: list[ChangelogFormat],
) -> None:
    """Whatever format each restart writes, restored state from the other gives the same finals."""
    events, cuts, crashes = scenario
    expected, expected_late = reference(events, PROP_CFG)
    finals, _, late = run_engine(events, cuts, crashes, PROP_CFG, formats)
    assert sorted(finals, key=lambda b: (b.source_partition, b.key)) == sorted(
        expected, key=lambda b: (b.source_partition, b.key))
    assert late == expected_late


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_same_input_same_finals_whatever_the_batches(
    scenario: tuple[list[Tick | Idle], list[int], set[int]],
) -> None:
    events, cuts, _ = scenario
    a, _, _ = run_engine(events, cuts, set(), PROP_CFG)
    b, _, _ = run_engine(events, [], set(), PROP_CFG)
    assert a == b

