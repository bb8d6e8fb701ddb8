"""In-process measurements of the windowing core: trades/s and memory with many instruments.

`python -m aggregation.bench [instruments] [trades]`. Not a test; figures go to the project notes.
The Kafka drain-mode comparison with the relay is a separate tool.
"""

from __future__ import annotations

import resource
import sys
import time

from aggregation.transform import NS_PER_S, Tick, WindowConfig, WindowEngine


def run(instruments: int = 10_000, trades: int = 300_000) -> dict[str, float]:
    """Apply `trades` trades over `instruments` instruments (6 partitions, 1m/5m/1h); return figures."""
    engine = WindowEngine(WindowConfig(), clock=time.time_ns)
    ticks = [
        Tick(f"I{i % instruments}", "XV", f"S{i % instruments}", "USD", True, 1_700_000_000 * NS_PER_S
             + i * (NS_PER_S // 1000), None, 100.0 + (i % 13), 1.0 + (i % 3), 0, (i % instruments) % 6, i)
        for i in range(trades)
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the input is built
    started = time.perf_counter()
    finals = 0
    for t in ticks:
        finals += len(engine.apply(t).finals)
    engine.flush_updates(force=True)
    elapsed = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"trades": trades, "instruments": instruments, "seconds": elapsed,
            "trades_per_s": trades / elapsed,
            "finals": finals, "open_windows": engine.open_windows(), "max_rss_mib": rss_after / 1024,
            "rss_growth_mib": (rss_after - rss_before) / 1024}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(run(*args))
