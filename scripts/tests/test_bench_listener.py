"""The benchmark's phase figures: window-close delays (which announcements count), bar emissions, options."""

from __future__ import annotations

import pytest
from dptools.bench import Apart, FinalBarSeen, bars_emitted, final_bar_delays, final_bar_seen, service_env

S = 10**9
MS = 10**6
LATENESS = 5 * S


def test_only_history_set_announcements_of_final_bars_count() -> None:
    final = {"type": "bars", "interval": "1m", "window_start": 120_000, "version": 4, "is_final": True}
    assert final_bar_seen(final, 190 * S, LATENESS) == FinalBarSeen("1m", 185 * S, 190 * S)
    # the latest-bar hash is skipped for most final bars (superseded in the batch): never counted
    assert final_bar_seen({**final, "type": "bar"}, 190 * S, LATENESS) is None
    assert final_bar_seen({**final, "is_final": False}, 190 * S, LATENESS) is None
    assert final_bar_seen({"type": "tick", "ts": 1}, 190 * S, LATENESS) is None


def test_interval_units() -> None:
    bar = {"type": "bars", "interval": "1h", "window_start": 0, "version": 1, "is_final": True}
    assert final_bar_seen(bar, 0, 0) == FinalBarSeen("1h", 3600 * S, 0)
    bar5 = {**bar, "interval": "5m"}
    assert final_bar_seen(bar5, 0, LATENESS) == FinalBarSeen("5m", 300 * S + LATENESS, 0)


def test_delays_keep_watermark_closes_of_the_phase_only() -> None:
    since, feed_end = 100 * S, 200 * S
    seen = [
        FinalBarSeen("1m", 125 * S, 125 * S + 300 * MS),   # closed by the watermark: 300 ms
        FinalBarSeen("5m", 125 * S, 126 * S),              # 1000 ms
        FinalBarSeen("1m", 90 * S, 120 * S),               # closed before the phase: skipped
        FinalBarSeen("1m", 205 * S, 215 * S),              # close after the last tick: idle timer
        FinalBarSeen("1h", 3000 * S, 215 * S),             # final before its close: an early close
        FinalBarSeen("1m", 150 * S, 149 * S),              # seen before its close: idle timer
    ]
    delays, apart = final_bar_delays(seen, since, feed_end)
    assert delays == {"1m": [300.0], "5m": [1000.0]}
    # after the feed: the idle timer at the window's close (and the partition idle), from the close
    assert apart == Apart(after_feed_ms=[10_000.0], before_close=2)


def test_bars_emitted_per_second_by_interval_and_kind() -> None:
    def sample(interval: str, final: str) -> tuple[str, frozenset[tuple[str, str]]]:
        labels = {("service", "aggregation"), ("interval", interval), ("final", final)}
        return ("dp_bars_emitted_total", frozenset(labels))

    before = {sample("1m", "false"): 100.0, sample("1m", "true"): 5.0}
    after = {sample("1m", "false"): 700.0, sample("1m", "true"): 25.0, sample("1h", "false"): 30.0,
             ("dp_messages_in_total", frozenset()): 1e6}
    assert bars_emitted(before, after, 10.0) == {"1h update": 3.0, "1m final": 2.0, "1m update": 60.0}


def test_service_env_takes_data_proc_variables_only() -> None:
    assert service_env(['DATA_PROC_AGGREGATION__UPDATE_INTERVALS_MS={"1h": 15000}', "DATA_PROC_X=a=b"]) == {
        "DATA_PROC_AGGREGATION__UPDATE_INTERVALS_MS": '{"1h": 15000}', "DATA_PROC_X": "a=b"}
    with pytest.raises(SystemExit, match="expected DATA_PROC_"):
        service_env(["PATH=/tmp"])
    with pytest.raises(SystemExit, match="expected DATA_PROC_"):
        service_env(["DATA_PROC_LOG_LEVEL"])
