"""The hop probe's per-thread accounting from /proc (no broker)."""

from __future__ import annotations

import os
import threading

from dptools.hop_probe import per_cycle, thread_stats


def test_thread_stats_counts_the_main_thread_and_the_others_wake_ups() -> None:
    before = thread_stats(os.getpid())
    assert "python main" in before
    wake = threading.Event()
    done = threading.Event()

    def sleeper() -> None:
        for _ in range(20):
            wake.wait(0.001)  # each timed wait ends in a voluntary context switch
        done.set()
        wake.wait(10)

    thread = threading.Thread(target=sleeper)
    thread.start()
    try:
        assert done.wait(10)
        after = thread_stats(os.getpid())
    finally:
        wake.set()
        thread.join()
    figures = per_cycle(before, after, cycles=10)
    assert figures["python other"]["wakeups"] >= 2.0  # >= 20 switches over 10 "cycles"
    assert all(f["cpu_us"] >= 0 for f in figures.values())
    assert per_cycle(before, after, cycles=0) == {}
