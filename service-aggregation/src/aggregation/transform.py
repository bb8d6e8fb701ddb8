"""The pure windowing core of the aggregation service: enriched trades -> OHLCV bars.

No I/O here. The engine keeps, per input partition, a watermark (the highest event time seen on the
partition, trades and quotes alike) and the open windows of every (instrument, interval). Every
decision is taken per record, so the way the input is cut into batches never changes a final bar:

- A trade belongs, per configured interval, to the window
  `[floor(ts / interval) * interval, +interval)` (UTC epoch aligned).
- A trade is *late* for an interval when its window is already closed: either the watermark before
  the trade has passed `window_end + allowed_lateness`, or the window was closed by the idle timer.
  A late trade never changes a bar; it is reported (`LateTrade`) for the dead-letter topic, the audit
  trail and the metrics. It is still applied to the intervals for which it is on time.
- After a record has advanced the watermark, every window with `window_end + allowed_lateness <
  watermark` closes and is emitted once with `is_final = True`.
- A partition that receives nothing for `idle_timeout` (wall clock, injectable) is idle. An idle
  partition closes the windows whose `window_end + allowed_lateness` has passed on the wall clock,
  and each of the others as soon as the wall clock passes its close, for as long as it stays idle
  (`close_idle`, called by a periodic timer). A window that has not ended is never closed by the
  idle timer: a quiet live feed keeps its current windows open for its next trades, while a feed
  that stops, or a replayed backlog whose event times lie in the past, gets its bars finalized.
  Event times ahead of the wall clock (clock skew) simply wait until the wall clock reaches them.
- Open bars that changed are emitted as updates (`is_final = False`) at most once per update
  interval of their bar interval (wall clock; `update_interval`, or its per-interval override),
  hence at most once per update interval per bar. The update clock is the engine's, not each
  partition's: the updates of every partition fall due together, so they leave in one cycle (one
  ClickHouse insert) instead of one cycle per partition.

Versions are deterministic: an update carries the number of trades applied so far, the final bar
`trade_count + 1`. Replaying the same input from a restored state therefore yields identical final
bars (same content, same version).

`open` is the price of the earliest trade by (`ts`, `seq`, arrival order), `close` of the latest; a
trade without `seq` sorts before trades with one at the same `ts`; arrival order is the input offset.

The engine's state per partition is written to, and restored from, a compacted changelog as
key/value pairs (`changes`, `restore_partition`): one entry with the partition's watermark and
idle-closed windows (`meta`), and the open windows in one of two formats (`ChangelogFormat`):

- `instrument` (the default): one entry per instrument, key `i|<instrument_id>`, holding all of its
  open windows (every interval) in a small binary value (`encode_instrument_state`); written once
  per cycle for each instrument a record touched or a window of which closed, a tombstone when its
  last window closed. A trade touches one entry instead of one per interval.
- `window` (the format before): one entry per open window, key `w|<instrument_id>|<interval>|<start>`,
  a JSON value; a tombstone when the window closes.

`restore_partition` reads both. Entries in the format the engine does not write are converted on
the next `changes`: the instruments they hold are written in the engine's format and the foreign
keys get tombstones, in the same transaction, so a changelog switches formats (either way) without
a gap and compaction drops the old entries.
"""

from __future__ import annotations

import heapq
import re
import struct
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

_UNIT_NS = {"ms": NS_PER_MS, "s": NS_PER_S, "m": 60 * NS_PER_S, "h": 3600 * NS_PER_S, "d": 86400 * NS_PER_S}
_INTERVAL_RE = re.compile(r"^([1-9][0-9]*)(ms|s|m|h|d)$")

#: Changelog key of a partition's metadata entry (watermark, idle-closed windows).
META_KEY = b"meta"
_WINDOW_PREFIX = b"w|"
_INSTRUMENT_PREFIX = b"i|"

#: How open windows are written to the changelog (see the module docstring); both are read.
ChangelogFormat = Literal["instrument", "window"]

#: Sort key of a trade inside a window: (ts_ns, has_seq, seq, offset).
SortKey = tuple[int, int, int, int]


class AggregationError(Exception):
    """Root of the aggregation service's exceptions."""


class BadIntervalError(AggregationError, ValueError):
    """An interval string that is not `<n><unit>` with unit ms, s, m, h or d."""


class BadStateError(AggregationError, ValueError):
    """A changelog entry that cannot be decoded."""


def parse_interval(text: str) -> int:
    """Length in nanoseconds of an interval written like `1m`, `5m`, `1h`, `250ms`, `1d`."""
    m = _INTERVAL_RE.match(text.strip())
    if m is None:
        raise BadIntervalError(f"bad interval {text!r}: expected <n><unit>, unit one of ms, s, m, h, d")
    return int(m.group(1)) * _UNIT_NS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Interval:
    """A bar interval: its name as written on bars (`1m`) and its length in nanoseconds."""

    name: str
    length_ns: int

    @classmethod
    def parse(cls, text: str) -> Interval:
        """`Interval` from its name, e.g. `Interval.parse("5m")`."""
        return cls(text.strip(), parse_interval(text))

    def window_start(self, ts_ns: int) -> int:
        """Start (ns) of the epoch-aligned window holding `ts_ns`."""
        return (ts_ns // self.length_ns) * self.length_ns


@dataclass(frozen=True, slots=True)
class WindowConfig:
    """How bars are built."""

    intervals: tuple[Interval, ...] = (Interval("1m", 60 * NS_PER_S), Interval("5m", 300 * NS_PER_S),
                                       Interval("1h", 3600 * NS_PER_S))
    allowed_lateness_ns: int = 5 * NS_PER_S
    idle_timeout_ns: int = 30 * NS_PER_S
    update_interval_ns: int = NS_PER_S
    #: (interval name, update interval ns) for the intervals whose updates follow another cadence.
    update_overrides_ns: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.intervals:
            raise AggregationError("at least one interval is required")
        names = [i.name for i in self.intervals]
        if len(set(names)) != len(names):
            raise AggregationError(f"duplicate intervals: {names}")
        if self.allowed_lateness_ns < 0 or self.idle_timeout_ns <= 0 or self.update_interval_ns < 0:
            raise AggregationError("lateness and update interval must be >= 0, idle timeout > 0")
        for name, every in self.update_overrides_ns:
            if name not in names:
                raise AggregationError(f"update interval for {name!r}, which is not a bar interval {names}")
            if every < 0:
                raise AggregationError(f"update interval of {name!r} must be >= 0")

    def update_every_ns(self, interval: str) -> int:
        """How often (ns, wall clock) the changed open bars of `interval` are emitted as updates."""
        for name, every in self.update_overrides_ns:
            if name == interval:
                return every
        return self.update_interval_ns

    @classmethod
    def from_names(
        cls,
        intervals: Sequence[str],
        allowed_lateness_ms: int = 5000,
        idle_timeout_ms: int = 30_000,
        update_interval_ms: int = 1000,
        update_intervals_ms: Mapping[str, int] | None = None,
    ) -> WindowConfig:
        """Config from interval names and millisecond durations (the settings' units).

        `update_intervals_ms` overrides `update_interval_ms` for the intervals it names.
        """
        return cls(
            intervals=tuple(Interval.parse(n) for n in intervals),
            allowed_lateness_ns=allowed_lateness_ms * NS_PER_MS,
            idle_timeout_ns=idle_timeout_ms * NS_PER_MS,
            update_interval_ns=update_interval_ms * NS_PER_MS,
            update_overrides_ns=tuple((n.strip(), ms * NS_PER_MS)
                                      for n, ms in sorted((update_intervals_ms or {}).items())),
        )


@dataclass(slots=True)
class Tick:
    """The part of an enriched tick the windowing needs, with its input coordinates.

    Treated as immutable; not a frozen dataclass because building a frozen one costs ~1.3 µs more
    per record (Bar likewise, per emission).
    """

    instrument_id: str
    venue: str
    symbol: str
    currency: str
    is_trade: bool
    ts_ns: int
    seq: int | None
    price: float
    size: float
    ingest_ns: int
    partition: int
    offset: int
    venue_symbol: str = ""
    trade_id: str | None = None

    @property
    def source_key(self) -> str:
        """`VENUE:SYMBOL` with the venue's own symbol: the Kafka key of the instrument."""
        return f"{self.venue}:{self.venue_symbol or self.symbol}"

    @property
    def sort_key(self) -> SortKey:
        """(ts, seq, arrival order) key deciding open and close."""
        return (self.ts_ns, 0 if self.seq is None else 1, self.seq or 0, self.offset)


@dataclass(slots=True)
class Bar:
    """One bar emission (the fields of `bar.v1`)."""

    instrument_id: str
    venue: str
    symbol: str
    currency: str
    interval: str
    window_start_ns: int
    window_end_ns: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    vwap: float
    trade_count: int
    is_final: bool
    version: int
    first_ts_ns: int
    last_ts_ns: int
    max_ingest_ns: int
    source_partition: int
    offset_from: int
    offset_to: int
    source_key: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity of the bar: (instrument, interval, window start)."""
        return (self.instrument_id, self.interval, self.window_start_ns)


@dataclass(frozen=True, slots=True)
class LateTrade:
    """A trade that arrived after (some of) its windows closed."""

    tick: Tick
    intervals: tuple[str, ...]
    watermark_ns: int


@dataclass(slots=True)
class Applied:
    """What one record did: bars it closed (final) and, for a late trade, its lateness."""

    finals: list[Bar] = field(default_factory=list)
    late: LateTrade | None = None


class _Window:
    """Mutable accumulator of one open bar (internal to the engine)."""

    __slots__ = (
        "close",
        "close_key",
        "count",
        "currency",
        "end",
        "high",
        "instrument_id",
        "interval",
        "low",
        "max_ingest",
        "off_from",
        "off_to",
        "open",
        "open_key",
        "pv",
        "source_key",
        "start",
        "symbol",
        "venue",
        "volume",
    )

    def __init__(self, t: Tick, interval: str, start: int, end: int) -> None:
        key = t.sort_key
        self.instrument_id = t.instrument_id
        self.venue = t.venue
        self.symbol = t.symbol
        self.currency = t.currency
        self.source_key = t.source_key
        self.interval = interval
        self.start = start
        self.end = end
        self.open = self.high = self.low = self.close = t.price
        self.open_key = self.close_key = key
        self.volume = t.size
        self.pv = t.price * t.size
        self.count = 1
        self.max_ingest = t.ingest_ns
        self.off_from = self.off_to = t.offset

    def add(self, t: Tick, key: SortKey) -> None:
        """Add trade `t`, whose `sort_key` is `key`."""
        price = t.price
        if key < self.open_key:
            self.open, self.open_key = price, key
        if key > self.close_key:
            self.close, self.close_key = price, key
        if price > self.high:
            self.high = price
        if price < self.low:
            self.low = price
        size = t.size
        self.volume += size
        self.pv += price * size
        self.count += 1
        if t.ingest_ns > self.max_ingest:
            self.max_ingest = t.ingest_ns
        offset = t.offset
        if offset < self.off_from:
            self.off_from = offset
        if offset > self.off_to:
            self.off_to = offset

    def bar(self, partition: int, final: bool) -> Bar:
        # Positional, in `Bar`'s field order (keywords cost ~1 µs more per bar).
        volume = self.volume
        count = self.count
        return Bar(
            self.instrument_id, self.venue, self.symbol, self.currency, self.interval, self.start,
            self.end, self.open, self.high, self.low, self.close, volume,
            self.pv / volume if volume else 0.0, count, final, count + 1 if final else count,
            self.open_key[0], self.close_key[0], self.max_ingest, partition, self.off_from, self.off_to,
            self.source_key,
        )

    def to_json(self) -> bytes:
        return orjson.dumps(
            [
                self.instrument_id, self.venue, self.symbol, self.currency, self.interval, self.start,
                self.end, self.open, list(self.open_key), self.high, self.low, self.close,
                list(self.close_key), self.volume, self.pv, self.count, self.max_ingest, self.off_from,
                self.off_to, self.source_key,
            ]
        )

    @classmethod
    def from_json(cls, raw: bytes) -> _Window:
        v: list[Any] = orjson.loads(raw)
        w = cls.__new__(cls)
        (
            w.instrument_id, w.venue, w.symbol, w.currency, w.interval, w.start, w.end, w.open, ok,
            w.high, w.low, w.close, ck, w.volume, w.pv, w.count, w.max_ingest, w.off_from, w.off_to,
            w.source_key,
        ) = v
        w.open_key = (ok[0], ok[1], ok[2], ok[3])
        w.close_key = (ck[0], ck[1], ck[2], ck[3])
        return w


WinKey = tuple[str, str, int]  # (instrument_id, interval name, window start ns)


def window_changelog_key(key: WinKey) -> bytes:
    """Changelog key of one open window (`window` format)."""
    return _WINDOW_PREFIX + f"{key[0]}|{key[1]}|{key[2]}".encode()


def instrument_changelog_key(instrument_id: str) -> bytes:
    """Changelog key of an instrument's open windows (`instrument` format)."""
    return _INSTRUMENT_PREFIX + instrument_id.encode()


#: First byte of an `instrument` format value (the value format's version).
_INSTRUMENT_STATE_V1 = 1
_U32 = struct.Struct("<I")
# Per window: start, end, open, high, low, close, volume, pv, open_key (4), close_key (4), count,
# max_ingest, off_from, off_to.
_WINDOW_FIELDS = struct.Struct("<2q6d4q4q4q")


def _put_str(parts: list[bytes], text: str) -> None:
    raw = text.encode()
    parts.append(_U32.pack(len(raw)))
    parts.append(raw)


#: Encoded strings of `encode_instrument_state` values, by the strings. Bounded; started over when full.
_STATE_STRINGS: dict[tuple[str, ...], bytes] = {}
_STATE_STRINGS_MAX = 65_536


def _strings(texts: tuple[str, ...]) -> bytes:
    raw = _STATE_STRINGS.get(texts)
    if raw is None:
        parts: list[bytes] = []
        for text in texts:
            _put_str(parts, text)
        raw = b"".join(parts)
        if len(_STATE_STRINGS) >= _STATE_STRINGS_MAX:
            _STATE_STRINGS.clear()
        _STATE_STRINGS[texts] = raw
    return raw


def encode_instrument_state(windows: Collection[_Window]) -> bytes:
    """`instrument` format value of one instrument's open windows (at least one).

    Layout (little-endian): version byte 1; the strings instrument_id, venue, symbol, currency,
    source_key (u32 length + UTF-8) of the first window; u32 window count; per window: a flag byte
    (1: its own venue, symbol, currency, source_key follow, as when reference data changed between
    the windows' first trades), the interval name (u32 + UTF-8) and `_WINDOW_FIELDS`. Floats are
    stored bit for bit, so a restored window yields the very same bars.
    """
    it = iter(windows)
    first = next(it)
    venue, symbol, currency, source_key = first.venue, first.symbol, first.currency, first.source_key
    parts: list[bytes] = [b"\x01", _strings((first.instrument_id, venue, symbol, currency, source_key)),
                          _U32.pack(len(windows))]
    append = parts.append
    pack = _WINDOW_FIELDS.pack
    for w in (first, *it):
        if w.venue == venue and w.symbol == symbol and w.currency == currency and w.source_key == source_key:
            append(b"\x00")
        else:
            append(b"\x01")
            append(_strings((w.venue, w.symbol, w.currency, w.source_key)))
        append(_strings((w.interval,)))
        ok, ck = w.open_key, w.close_key
        append(pack(w.start, w.end, w.open, w.high, w.low, w.close, w.volume, w.pv,
                    ok[0], ok[1], ok[2], ok[3], ck[0], ck[1], ck[2], ck[3],
                    w.count, w.max_ingest, w.off_from, w.off_to))
    return b"".join(parts)


def decode_instrument_state(raw: bytes) -> list[_Window]:
    """The windows of an `encode_instrument_state` value; `BadStateError` when it is malformed."""
    try:
        if not raw or raw[0] != _INSTRUMENT_STATE_V1:
            raise BadStateError(f"unknown instrument state version {raw[:1]!r}")
        pos = 1

        def text() -> str:
            nonlocal pos
            (n,) = _U32.unpack_from(raw, pos)
            end = pos + 4 + n
            if end > len(raw):
                raise BadStateError("truncated string")
            value = raw[pos + 4:end].decode()
            pos = end
            return value

        instrument_id, venue, symbol, currency, source_key = text(), text(), text(), text(), text()
        (count,) = _U32.unpack_from(raw, pos)
        pos += 4
        out: list[_Window] = []
        for _ in range(count):
            flag = raw[pos]
            pos += 1
            if flag == 0:
                v, sy, cu, sk = venue, symbol, currency, source_key
            elif flag == 1:
                v, sy, cu, sk = text(), text(), text(), text()
            else:
                raise BadStateError(f"bad window flag {flag}")
            interval = text()
            f = _WINDOW_FIELDS.unpack_from(raw, pos)
            pos += _WINDOW_FIELDS.size
            w = _Window.__new__(_Window)
            w.instrument_id, w.venue, w.symbol, w.currency, w.source_key = instrument_id, v, sy, cu, sk
            w.interval = interval
            (w.start, w.end, w.open, w.high, w.low, w.close, w.volume, w.pv) = f[:8]
            w.open_key = (f[8], f[9], f[10], f[11])
            w.close_key = (f[12], f[13], f[14], f[15])
            w.count, w.max_ingest, w.off_from, w.off_to = f[16], f[17], f[18], f[19]
            out.append(w)
        if pos != len(raw):
            raise BadStateError(f"{len(raw) - pos} trailing bytes")
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise BadStateError(f"bad instrument state: {exc}") from exc
    return out


class _Partition:
    """State of one input partition."""

    __slots__ = ("by_instrument", "changed", "closed", "closed_through", "dirty", "foreign", "heap",
                 "last_activity", "meta_changed", "watermark", "windows")

    def __init__(self, now: int) -> None:
        self.watermark: int | None = None
        self.windows: dict[WinKey, _Window] = {}
        # instrument -> its open windows (the same objects as in `windows`).
        self.by_instrument: dict[str, dict[WinKey, _Window]] = {}
        # (window_end, key) of every open window; closing pops from the front.
        self.heap: list[tuple[int, WinKey]] = []
        # (instrument, interval) -> latest window start closed by the idle timer, kept only while
        # the watermark alone would not call that window closed.
        self.closed_through: dict[tuple[str, str], tuple[int, int]] = {}
        self.dirty: dict[WinKey, None] = {}
        # Instruments whose windows changed (a trade, a window closed) since the last `changes`.
        self.changed: dict[str, None] = {}
        # Windows closed since the last `changes` (their tombstones in the `window` format).
        self.closed: list[WinKey] = []
        # Restored keys of the format not written: tombstoned by the next `changes`.
        self.foreign: list[bytes] = []
        self.meta_changed = False
        self.last_activity = now


class WindowEngine:
    """Tumbling event-time windows over trades, per input partition. See the module docstring."""

    def __init__(self, config: WindowConfig, clock: Callable[[], int] = time.time_ns,
                 changelog_format: ChangelogFormat = "instrument") -> None:
        """`clock` gives wall-clock epoch ns; `changelog_format` is the format `changes` writes."""
        if changelog_format not in ("instrument", "window"):
            raise AggregationError(f"unknown changelog format {changelog_format!r}")
        self.config = config
        self.changelog_format: ChangelogFormat = changelog_format
        self._clock = clock
        self._parts: dict[int, _Partition] = {}
        self._lateness = config.allowed_lateness_ns
        self._intervals = [(i.name, i.length_ns) for i in config.intervals]
        self._update_every = {i.name: config.update_every_ns(i.name) for i in config.intervals}
        # When each interval's updates are due next (engine-wide, wall clock).
        now = clock()
        self._update_due = {name: now + every for name, every in self._update_every.items()}

    # ----------------------------------------------------------------- partitions and state
    @property
    def partitions(self) -> list[int]:
        """Partitions whose state the engine holds."""
        return sorted(self._parts)

    def open_windows(self) -> int:
        """Number of open windows held in memory."""
        return sum(len(p.windows) for p in self._parts.values())

    def watermark(self, partition: int) -> int | None:
        """Watermark (ns) of a partition, None before its first record."""
        p = self._parts.get(partition)
        return None if p is None else p.watermark

    def restore_partition(self, partition: int, entries: Iterable[tuple[bytes, bytes | None]]) -> None:
        """(Re)build a partition's state from its changelog entries, latest value per key wins.

        Entries of both formats are read. Those of the format this engine does not write are
        converted by the next `changes` (see the module docstring); where both formats hold the
        same window, which only a changelog written outside the engine can do, this engine's wins.
        """
        latest: dict[bytes, bytes | None] = {}
        for k, v in entries:
            latest[k] = v
        p = _Partition(self._clock())
        native: dict[WinKey, _Window] = {}
        foreign: dict[WinKey, _Window] = {}
        writes_instruments = self.changelog_format == "instrument"
        for k, v in latest.items():
            if v is None:
                continue
            try:
                if k == META_KEY:
                    meta = orjson.loads(v)
                    p.watermark = meta["wm"]
                    p.closed_through = {(i, n): (s, e) for i, n, s, e in meta["closed"]}
                    continue
                if k.startswith(_INSTRUMENT_PREFIX):
                    windows = decode_instrument_state(v)
                    is_native = writes_instruments
                elif k.startswith(_WINDOW_PREFIX):
                    windows = [_Window.from_json(v)]
                    is_native = not writes_instruments
                else:
                    raise BadStateError(f"unknown changelog key {k!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise BadStateError(f"bad changelog entry {k!r}: {exc}") from exc
            target = native if is_native else foreign
            for w in windows:
                target[(w.instrument_id, w.interval, w.start)] = w
            if not is_native:
                p.foreign.append(k)
                for w in windows:
                    p.changed[w.instrument_id] = None
        p.windows = foreign | native if foreign else native
        for key, w in p.windows.items():
            group = p.by_instrument.get(key[0])
            if group is None:
                group = p.by_instrument[key[0]] = {}
            group[key] = w
        p.heap = sorted((w.end, key) for key, w in p.windows.items())
        self._parts[partition] = p

    def drop_partition(self, partition: int) -> None:
        """Forget a partition's state (revoked)."""
        self._parts.pop(partition, None)

    def changes(self, partition: int) -> list[tuple[bytes, bytes | None]]:
        """Changelog entries for everything changed on `partition` since the last call, then reset.

        Coalesced: one entry per key, with its latest value, whatever happened in between.
        """
        p = self._parts.get(partition)
        if p is None:
            return []
        out: list[tuple[bytes, bytes | None]] = [(k, None) for k in p.foreign]
        p.foreign.clear()
        by_instrument = p.by_instrument
        if self.changelog_format == "instrument":
            for instrument in p.changed:
                group = by_instrument.get(instrument)
                out.append((_INSTRUMENT_PREFIX + instrument.encode(),
                            None if group is None else encode_instrument_state(group.values())))
        else:
            out.extend((window_changelog_key(key), None) for key in p.closed)
            for instrument in p.changed:
                group = by_instrument.get(instrument)
                if group is not None:
                    out.extend((window_changelog_key(key), w.to_json()) for key, w in group.items())
        p.changed.clear()
        p.closed.clear()
        if p.meta_changed:
            closed = [[i, n, s, e] for (i, n), (s, e) in p.closed_through.items()]
            meta = {"wm": p.watermark, "closed": closed}
            out.append((META_KEY, orjson.dumps(meta)))
            p.meta_changed = False
        return out

    def _part(self, partition: int) -> _Partition:
        p = self._parts.get(partition)
        if p is None:
            p = self._parts[partition] = _Partition(self._clock())
        return p

    # ----------------------------------------------------------------- records
    def apply(self, tick: Tick) -> Applied:
        """Apply one record (trade or quote) of its partition, in partition order."""
        p = self._parts.get(tick.partition)
        if p is None:
            p = self._part(tick.partition)
        p.last_activity = self._clock()
        result = Applied()
        wm = p.watermark
        ts_ns = tick.ts_ns
        if tick.is_trade:
            late: list[str] | None = None
            lateness = self._lateness
            windows = p.windows
            closed_through = p.closed_through
            instrument = tick.instrument_id
            seq = tick.seq
            sort_key = (ts_ns, 0 if seq is None else 1, seq or 0, tick.offset)
            dirty = p.dirty
            touched = False
            for name, length in self._intervals:
                start = (ts_ns // length) * length
                end = start + length
                if wm is not None and end + lateness < wm:
                    (late if late is not None else (late := [])).append(name)
                    continue
                if closed_through:
                    ct = closed_through.get((instrument, name))
                    if ct is not None and start <= ct[0]:
                        (late if late is not None else (late := [])).append(name)
                        continue
                key = (instrument, name, start)
                w = windows.get(key)
                if w is None:
                    w = windows[key] = _Window(tick, name, start, end)
                    heapq.heappush(p.heap, (end, key))
                    group = p.by_instrument.get(instrument)
                    if group is None:
                        group = p.by_instrument[instrument] = {}
                    group[key] = w
                else:
                    w.add(tick, sort_key)
                dirty[key] = None
                touched = True
            if touched:
                p.changed[instrument] = None
            if late:
                result.late = LateTrade(tick, tuple(late), wm if wm is not None else ts_ns)
        if wm is None or ts_ns > wm:
            p.watermark = wm = ts_ns
            p.meta_changed = True
            if (p.heap and p.heap[0][0] + self._lateness < wm) or p.closed_through:
                self._close_until(tick.partition, p, wm, result.finals)
        return result

    def _close_until(self, partition: int, p: _Partition, wm: int, out: list[Bar]) -> None:
        lateness = self._lateness
        heap = p.heap
        while heap and heap[0][0] + lateness < wm:
            _, key = heapq.heappop(heap)
            w = p.windows.pop(key)
            out.append(w.bar(partition, final=True))
            p.dirty.pop(key, None)
            self._forget(p, key)
        if p.closed_through:
            stale = [k for k, (_, end) in p.closed_through.items() if end + lateness < wm]
            for k in stale:
                del p.closed_through[k]

    @staticmethod
    def _forget(p: _Partition, key: WinKey) -> None:
        """Bookkeeping of a window closed (already removed from `p.windows`)."""
        instrument = key[0]
        group = p.by_instrument[instrument]
        del group[key]
        if not group:
            del p.by_instrument[instrument]
        p.changed[instrument] = None
        p.closed.append(key)

    # ----------------------------------------------------------------- timers
    def flush_updates(self, force: bool = False) -> list[Bar]:
        """Updates (`is_final=False`) of the changed open bars whose interval's updates are due.

        Each interval's updates fall due once per its update interval (`WindowConfig.update_every_ns`),
        for every partition at once; `force` takes every changed bar now.
        """
        now = self._clock()
        due_at = self._update_due
        if force:
            due = set(due_at)
        else:
            due = {name for name, at in due_at.items() if now >= at}
            if not due:
                return []
        for name in due:
            due_at[name] = now + self._update_every[name]
        every_interval = len(due) == len(due_at)
        out: list[Bar] = []
        for pid in sorted(self._parts):
            p = self._parts[pid]
            if not p.dirty:
                continue
            windows = p.windows
            if every_interval:
                for key in p.dirty:
                    out.append(windows[key].bar(pid, final=False))
                p.dirty.clear()
                continue
            later: dict[WinKey, None] = {}
            for key in p.dirty:
                if key[1] in due:
                    out.append(windows[key].bar(pid, final=False))
                else:
                    later[key] = None
            p.dirty = later
        return out

    def mark_busy(self, partition: int) -> None:
        """The partition still has records waiting: it is not idle, whatever the wall clock says."""
        p = self._parts.get(partition)
        if p is not None:
            p.last_activity = self._clock()

    def close_idle(self) -> list[Bar]:
        """Close the windows of idle partitions whose close has passed on the wall clock.

        A partition is idle when it has had no record (and no `mark_busy`) for `idle_timeout`
        (wall clock). Of its open windows, those with `window_end + allowed_lateness` before the
        wall clock close now, in (window end, key) order, as the watermark would have closed them;
        the others stay open, and a later call closes each once the wall clock has passed its close,
        if the partition is still idle. So a feed that stops gets its bars finalized, a replayed
        backlog (event times long past) at once, while a window that has not ended yet (the current
        hour of a quiet live feed, event times ahead of the wall clock) is never finalized early.
        A trade for a window closed here is late; one for a window still open is on time.
        """
        now = self._clock()
        timeout = self.config.idle_timeout_ns
        lateness = self._lateness
        out: list[Bar] = []
        for pid in sorted(self._parts):
            p = self._parts[pid]
            heap = p.heap
            if not heap or heap[0][0] + lateness >= now or now - p.last_activity < timeout:
                continue
            closed_through = p.closed_through
            while heap and heap[0][0] + lateness < now:
                end, key = heapq.heappop(heap)
                w = p.windows.pop(key)
                out.append(w.bar(pid, final=True))
                p.dirty.pop(key, None)
                self._forget(p, key)
                ik = (key[0], key[1])
                prev = closed_through.get(ik)
                if prev is None or prev[0] < key[2]:
                    closed_through[ik] = (key[2], end)
            p.meta_changed = True
        return out

    def idle_open_windows(self) -> tuple[int, int | None]:
        """Windows still open on idle partitions, and the earliest close (ns) among them (or None).

        These windows have not reached their close on the wall clock yet: `close_idle` closes each
        once it has, while its partition stays idle.
        """
        now = self._clock()
        timeout = self.config.idle_timeout_ns
        count = 0
        first: int | None = None
        for p in self._parts.values():
            if p.heap and now - p.last_activity >= timeout:
                count += len(p.windows)
                close = p.heap[0][0] + self._lateness
                if first is None or close < first:
                    first = close
        return count, first

    def close_all(self, partition: int) -> list[Bar]:
        """Close every open window of `partition` now, in (window end, key) order."""
        p = self._part(partition)
        out: list[Bar] = []
        for end, key in sorted(p.heap):
            w = p.windows.pop(key)
            out.append(w.bar(partition, final=True))
            self._forget(p, key)
            ik = (key[0], key[1])
            prev = p.closed_through.get(ik)
            if prev is None or prev[0] < key[2]:
                p.closed_through[ik] = (key[2], end)
        p.heap.clear()
        p.dirty.clear()
        p.meta_changed = True
        return out
