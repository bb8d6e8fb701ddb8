"""CPU of inserts into the embedded ClickHouse engine: `Native` against `JSONEachRow`, by insert size.

    uv run python -m dptools.bench_chinsert --rows 2000

Builds `market_data.bars` rows the way the aggregation does (the windowing core over the enriched
ticks of `dptools.bench_aggregation`, updates and finals), then, for each variant in turn (fresh
chDB folder, migrated like the service does; also once with migration 007's packed parts turned
off, as before it), inserts them in calls of 1, 100 and 1000 rows with a
dedup token each, and reports process CPU (all threads: the engine's included) per call and per row.
No Kafka, no servers. `--rows` bounds the rows used per insert size.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from typing import Any

import structlog
from aggregation.codec import BAR_COLUMNS, bar_row, decode_tick
from aggregation.transform import NS_PER_S, WindowConfig, WindowEngine
from dataproc_shared.clickhouse import ChdbClickHouse
from dataproc_shared.migrate import clickhouse_values, migrate_clickhouse

from dptools.bench_aggregation import enriched_ticks

SIZES = (1, 100, 1000)


def bar_rows(count: int) -> list[tuple[Any, ...]]:
    """At least `count` bars rows from the windowing core (updates every 5,000 ticks, then finals)."""
    now = [0]
    engine = WindowEngine(WindowConfig(), lambda: now[0])
    rows: list[tuple[Any, ...]] = []
    for n, (_key, value) in enumerate(enriched_ticks(max(count * 2, 10_000), 1_000)):
        applied = engine.apply(decode_tick(value, 0, n))
        rows.extend(bar_row(b) for b in applied.finals)
        if n % 5_000 == 4_999:
            now[0] += 2 * NS_PER_S
            rows.extend(bar_row(b) for b in engine.flush_updates())
        if len(rows) >= count:
            break
    rows.extend(bar_row(b) for b in engine.close_all(0))
    return rows[:count]


def measure(rows: list[tuple[Any, ...]], native: bool, packed: bool, budget: int) -> dict[str, Any]:
    """CPU per insert call and per row for each insert size, in a fresh engine folder.

    `packed=False` turns migration 007 off (every part written as a full part, as before it).
    """
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-chinsert-") as folder:
        client = ChdbClickHouse(folder, native_inserts=native)
        try:
            migrate_clickhouse(client, values=clickhouse_values())
            if not packed:
                client.command("ALTER TABLE market_data.bars "
                               "MODIFY SETTING min_bytes_for_full_part_storage = 0")
            client.insert("market_data.bars", rows[:1], BAR_COLUMNS)  # warm: column types, first part
            for size in SIZES:
                calls = max(3, min(100, budget // size))
                started = time.process_time()
                for i in range(calls):
                    chunk = [rows[(i * size + k) % len(rows)] for k in range(size)]
                    client.insert("market_data.bars", chunk, BAR_COLUMNS, dedup_token=f"{size}-{i}")
                cpu = time.process_time() - started
                out[str(size)] = {"calls": calls, "cpu_ms_per_call": round(1e3 * cpu / calls, 2),
                                  "cpu_us_per_row": round(1e6 * cpu / (calls * size), 1)}
        finally:
            client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000, help="rows per insert size (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two encodings")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows = bar_rows(max(args.rows, 1_000))
    result: dict[str, Any] = {"rows": len(rows), "runs": []}
    for _ in range(max(1, args.rounds)):
        for native, packed in ((False, False), (False, True), (True, True)):
            result["runs"].append({"format": "Native" if native else "JSONEachRow",
                                   "parts": "packed below 1 MiB" if packed else "full",
                                   **measure(rows, native, packed, args.rows)})
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
