"""Trade de-duplication memory of one input partition, by event time and bounded in size.

A trade is a duplicate when the same `venue` + `trade_id` was accepted before on the same input
partition with an event time at most `window_ns` away. Entries expire once the partition's highest
event time seen has moved more than `window_ns` past them, and a hard cap on the number of entries
evicts the oldest ones first. Every change is remembered as a pending changelog entry (a new value
or a tombstone) so the owner can write it to the state changelog in the same transaction as the
outputs; `restore` rebuilds the memory from that changelog.

Each entry keeps the input offset of the accepted trade, so a record replayed from its own offset
(after a crash or an aborted transaction) is never taken for its own duplicate, even if the memory
still holds changes that were never committed.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

_VALUE = struct.Struct(">qq")


@dataclass(frozen=True, slots=True)
class DedupEntry:
    """The accepted trade a `venue` + `trade_id` key stands for."""

    ts_ns: int
    offset: int

    def encode(self) -> bytes:
        """Changelog value: event time and offset, two big-endian int64."""
        return _VALUE.pack(self.ts_ns, self.offset)

    @classmethod
    def decode(cls, data: bytes) -> DedupEntry:
        """Inverse of `encode`."""
        ts_ns, offset = _VALUE.unpack(data)
        return cls(ts_ns, offset)


#: Changelog key of the partition's event-time watermark (trade keys always contain ':').
WATERMARK_KEY = "~watermark"


def dedup_key(venue: str, trade_id: str) -> str:
    """State key of a trade (venues never contain ':', so the key is unambiguous)."""
    return f"{venue}:{trade_id}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of `DedupWindow.check`: `first` is the accepted entry a duplicate repeats."""

    duplicate: bool
    first: DedupEntry | None = None


_FRESH = Verdict(duplicate=False)


class DedupWindow:
    """The de-duplication memory of one input partition (see the module docstring)."""

    def __init__(self, window_ns: int, max_entries: int) -> None:
        if window_ns < 0 or max_entries < 1:
            raise ValueError("window_ns must be >= 0 and max_entries >= 1")
        self.window_ns = window_ns
        self.max_entries = max_entries
        self._entries: OrderedDict[str, DedupEntry] = OrderedDict()
        self._pending: dict[str, DedupEntry | None] = {}
        self._watermark_ns = 0
        self._watermark_dirty = False
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def watermark_ns(self) -> int:
        """Highest event time of an accepted trade (0 before the first)."""
        return self._watermark_ns

    def check(self, key: str, ts_ns: int, offset: int) -> Verdict:
        """Decide whether the trade `key` at `ts_ns` read from `offset` is a duplicate; remember it if not."""
        entry = self._entries.get(key)
        if entry is not None and entry.offset != offset and abs(ts_ns - entry.ts_ns) <= self.window_ns:
            return Verdict(duplicate=True, first=entry)
        self._put(key, DedupEntry(ts_ns, offset))
        self._entries.move_to_end(key)  # insertion order stays close to event-time order
        if ts_ns > self._watermark_ns:
            self._watermark_ns = ts_ns
            self._watermark_dirty = True
        self._enforce_bounds()
        return _FRESH

    def pending_changes(self) -> list[tuple[str, DedupEntry | None]]:
        """Changes since the last `clear_pending`, one per key: the new entry, or None when removed.

        A moved watermark is included under `WATERMARK_KEY` (as an entry with offset -1).
        """
        changes = list(self._pending.items())
        if self._watermark_dirty:
            changes.append((WATERMARK_KEY, DedupEntry(self._watermark_ns, -1)))
        return changes

    def clear_pending(self) -> None:
        """Forget the pending changes (they were written to the changelog)."""
        self._pending.clear()
        self._watermark_dirty = False

    def restore(self, changes: Iterable[tuple[str, DedupEntry | None]]) -> None:
        """Replace the memory with the result of replaying a changelog in order.

        The surviving entries are kept in event-time order; bounds are enforced afterwards and the
        entries dropped by that become pending tombstones.
        """
        latest: dict[str, DedupEntry | None] = {}
        watermark = 0
        for key, entry in changes:
            if entry is not None:
                watermark = max(watermark, entry.ts_ns)
            if key != WATERMARK_KEY:
                latest[key] = entry
        live = [(key, entry) for key, entry in latest.items() if entry is not None]
        live.sort(key=lambda item: item[1].ts_ns)
        self._entries = OrderedDict(live)
        self._pending.clear()
        self._watermark_ns = watermark
        self._watermark_dirty = False
        self._enforce_bounds()

    def _put(self, key: str, entry: DedupEntry) -> None:
        self._entries[key] = entry
        self._pending[key] = entry

    def _remove(self, key: str) -> None:
        del self._entries[key]  # OrderedDict: O(1) also at the front
        self._pending[key] = None

    def _enforce_bounds(self) -> None:
        horizon = self._watermark_ns - self.window_ns
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.ts_ns >= horizon:
                break
            self._remove(key)
            self.expired += 1
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))
            self.evicted += 1
