"""The ClickHouse sink of bars and late trades: buffered per transaction, idempotent on replay.

Rows gathered while a Kafka transaction is built are inserted by `flush()`, which the processor calls
from `before_commit`, i.e. before the input offsets are committed: a crash before the commit replays
the same input and rewrites the same rows. Rewrites are harmless twice over: `bars` is a
`ReplacingMergeTree(version)` (the same bar at the same version has the same content, and `FINAL`
shows one row per bar), and each insert carries a deduplication token made of the input offset
ranges and a digest of the rows, so the engine drops an insert it has already taken.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import structlog
from dataproc_shared.clickhouse import ClickHouseClient

from aggregation.codec import BAR_COLUMNS, LATE_COLUMNS, bar_row
from aggregation.transform import Bar

log = structlog.get_logger(__name__)

BARS_TABLE = "market_data.bars"
LATE_TABLE = "market_data.late_trades"


class BarSink:
    """Buffers bar and late-trade rows and inserts them in one batch per table on `flush`."""

    def __init__(self, client: ClickHouseClient, metrics: Any | None = None) -> None:
        """`metrics` is the service's `ServiceMetrics` (rows written are counted per table)."""
        self._client = client
        self._metrics = metrics
        self._bars: list[tuple[Any, ...]] = []
        self._bar_ids: list[str] = []
        self._late: list[tuple[Any, ...]] = []
        self._ranges: dict[int, tuple[int, int]] = {}

    @property
    def pending(self) -> int:
        """Rows waiting for the next flush."""
        return len(self._bars) + len(self._late)

    def add_bars(self, bars: Sequence[Bar]) -> None:
        """Queue bar emissions (updates and finals)."""
        for b in bars:
            self._bars.append(bar_row(b))
            self._bar_ids.append(f"{b.instrument_id}|{b.interval}|{b.window_start_ns}|{b.version}")

    def add_late(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Queue `late_trades` rows."""
        self._late.extend(rows)

    def note_input(self, partition: int, first: int, last: int) -> None:
        """Record the input offsets covered by the rows (they make the deduplication token)."""
        have = self._ranges.get(partition)
        self._ranges[partition] = (first, last) if have is None else (min(have[0], first), max(have[1], last))

    def discard(self) -> None:
        """Forget queued rows (the transaction they belong to was aborted)."""
        self._bars.clear()
        self._bar_ids.clear()
        self._late.clear()
        self._ranges.clear()

    def _token(self, table: str, ids: Sequence[str]) -> str:
        ranges = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(self._ranges.items()))
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24]
        return f"aggregation|{table}|{ranges}|{digest}"

    def flush(self) -> int:
        """Insert the queued rows (blocking; run it in a thread). Returns the rows written."""
        written = 0
        if self._bars:
            token = self._token(BARS_TABLE, self._bar_ids)
            written += self._client.insert(BARS_TABLE, self._bars, BAR_COLUMNS, dedup_token=token)
            self._count(BARS_TABLE, len(self._bars))
        if self._late:
            ids = [f"{r[0]}|{r[1]}|{r[8]}|{r[9]}" for r in self._late]
            token = self._token(LATE_TABLE, ids)
            written += self._client.insert(LATE_TABLE, self._late, LATE_COLUMNS, dedup_token=token)
            self._count(LATE_TABLE, len(self._late))
        self.discard()
        return written

    def _count(self, table: str, n: int) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.clickhouse_rows_written, table=table.rsplit(".", 1)[-1]).inc(n)
