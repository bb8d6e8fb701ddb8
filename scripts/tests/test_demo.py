"""The main job's wait and report on open bars (pure helpers, no servers)."""

from __future__ import annotations

import pytest
from dptools.demo import CLOSE_SLACK_MS, overdue, show_open

HOUR_MS = 3_600_000


def row(interval: str, n: int, first_end_ms: int, last_end_ms: int) -> dict[str, object]:
    return {"interval": interval, "open_bars": n, "first_open_end_ms": first_end_ms,
            "last_open_end_ms": last_end_ms}


def test_only_windows_past_their_close_are_waited_for() -> None:
    now = 10 * HOUR_MS + 30_000
    running = [row("1h", 40, 11 * HOUR_MS, 11 * HOUR_MS), row("5m", 12, 10 * HOUR_MS + 300_000,
                                                                  10 * HOUR_MS + 300_000)]
    assert overdue(running, 5_000, now) == 0  # the current hour and 5 minutes have not ended
    ended = [*running, row("1m", 3, 10 * HOUR_MS, 10 * HOUR_MS + 60_000)]
    # the minute [9:59, 10:00) closed at 10:00:05, 25 s ago: the idle timer still has to finalize it
    assert overdue(ended, 5_000, now) == 3
    # within the slack after its close it is not waited for yet
    assert overdue(ended, 5_000, 10 * HOUR_MS + 5_000 + CLOSE_SLACK_MS) == 0


def test_open_bars_are_shown_with_their_close(capsys: pytest.CaptureFixture[str]) -> None:
    show_open([row("1h", 40, 11 * HOUR_MS, 11 * HOUR_MS), row("5m", 12, 10 * HOUR_MS + 300_000,
                                                               10 * HOUR_MS + 600_000)], 5_000)
    out = capsys.readouterr().out
    assert "1h      40 open, final at 11:00:05 UTC" in out
    assert "5m      12 open, final at 10:05:05 to 10:10:05 UTC" in out
    show_open([], 5_000)
    assert "Every bar is final." in capsys.readouterr().out
