"""The benchmark's window-close measurement: which announcements count, and which bars are set apart."""

from __future__ import annotations

from dptools.bench import FinalBarSeen, final_bar_delays, final_bar_seen

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
        FinalBarSeen("1h", 3000 * S, 215 * S),             # idle timer before its close
        FinalBarSeen("1m", 150 * S, 149 * S),              # seen before its close: idle timer
    ]
    delays, apart = final_bar_delays(seen, since, feed_end)
    assert delays == {"1m": [300.0], "5m": [1000.0]}
    assert apart == {"after_feed": 2, "before_close": 1}
