"""The projection's pure core: enriched ticks and bars -> monotonic Redis writes.

Nothing here talks to Redis. A tick or a bar becomes one or more *writes*, plain data that say which key
to change, which fields to set, and the order key that decides whether the write is newer than what the
key already holds. I/O-free, so the rules are unit-tested without a server; `projection.redis_sink`
runs the same rules atomically inside Redis (Lua), and `apply_hash_write` / `apply_series_write` below
are the reference model those scripts are tested against.

Rules (the contract's "Redis" section, made precise):

- `md:tick:{instrument_id}` holds three independent *sides*: the latest trade, the latest bid and the
  latest ask. Each side is replaced only by a tick with a greater order key (`ts_ns`, `seq`, arrival;
  a missing `seq` sorts first; arrival is the tick's offset on its input partition, which holds all of
  an instrument's ticks, so equal timestamps resolve to the later tick as bars do). A quote updates
  the bid side when it has a bid and the ask side when it has an ask, so one-sided quote feeds still
  show a full top of book. `ts` and `quote_ts` are the greatest event time
  applied to the key (resp. to its quote sides).
- `md:bar:{instrument_id}:{interval}` holds the latest bar by (`window_start`, `version`, `is_final`):
  a newer window replaces an older one; within a window a lower version never replaces a higher one,
  and the final emission wins over an update with the same version.
- `md:bars:{instrument_id}:{interval}` is a sorted set of final bars: score `window_start` (ms), member
  the bar as compact JSON with sorted keys. Adding a window that is already there replaces its member
  unless the stored one has a higher version; the set is trimmed to the newest `max_final_bars`.
- A write whose order key equals the stored one is a replay: refused when its values are the same,
  applied (the later write wins) when they differ. So a replay changes nothing and announces nothing.
- Every applied write publishes one compact JSON announcement on `md:updates`; a refused one, none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson
from dataproc_shared.records import DeadLetter, DeadLetterReason, InRecord

if TYPE_CHECKING:
    from dataproc_shared.avro import SchemaRegistry

#: Channel that announces every applied change.
UPDATES_CHANNEL = "md:updates"
#: Default length of the final-bar history per instrument and interval.
DEFAULT_MAX_FINAL_BARS = 500

_OFFSET = 1 << 63  # maps signed 64-bit integers onto 0 .. 2**64-1, so 20 fixed digits sort correctly


class KeyType(StrEnum):
    """The three Redis key families (the `key_type` label of `dp_redis_writes_total`)."""

    TICK = "tick"
    BAR = "bar"
    BARS = "bars"


class Side(StrEnum):
    """Independently ordered field groups of a key."""

    TRADE = "trade"
    BID = "bid"
    ASK = "ask"
    BAR = "bar"


class ProjectionError(Exception):
    """Root of the projection service's errors."""


class BadInput(ProjectionError):
    """A decoded record does not hold what the projection needs."""


@dataclass(frozen=True, slots=True)
class Tick:
    """The fields of an enriched tick the projection uses."""

    instrument_id: str
    venue: str
    symbol: str
    currency: str
    is_trade: bool
    ts_ns: int
    seq: int | None = None
    trade_id: str | None = None
    price: float | None = None
    size: float | None = None
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None


@dataclass(frozen=True, slots=True)
class Bar:
    """The fields of a bar (`bar.v1`) the projection uses."""

    instrument_id: str
    venue: str
    symbol: str
    currency: str
    interval: str
    window_start_ms: int
    window_end_ms: int
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


@dataclass(frozen=True, slots=True)
class HashWrite:
    """Set one side of a hash if `order` is newer than the side's stored order.

    `fields` are set and `deletes` removed when the write applies; `maxima` are integer fields raised to
    the given value when it is greater (event times). `order_field` stores `order`, a fixed-width string
    whose byte order is the order of the write.
    """

    key: str
    key_type: KeyType
    side: Side
    order_field: str
    order: str
    fields: tuple[tuple[str, str], ...]
    deletes: tuple[str, ...]
    maxima: tuple[tuple[str, int], ...]
    announcement: bytes


@dataclass(frozen=True, slots=True)
class SeriesWrite:
    """Put a final bar into a sorted set unless its window already holds a higher version."""

    key: str
    score: int
    version: int
    member: str
    max_len: int
    announcement: bytes


Write = HashWrite | SeriesWrite


def tick_key(instrument_id: str) -> str:
    """Redis key of an instrument's latest tick hash."""
    return f"md:tick:{instrument_id}"


def bar_key(instrument_id: str, interval: str) -> str:
    """Redis key of an instrument's latest bar hash for one interval."""
    return f"md:bar:{instrument_id}:{interval}"


def bars_key(instrument_id: str, interval: str) -> str:
    """Redis key of an instrument's sorted set of final bars for one interval."""
    return f"md:bars:{instrument_id}:{interval}"


def order_key(*parts: int) -> str:
    """Fixed-width string whose lexicographic order is the tuple order of signed 64-bit `parts`."""
    return "".join(f"{p + _OFFSET:020d}" for p in parts)


def fmt_float(value: float) -> str:
    """Shortest text that reads back as the same float (what Redis clients parse)."""
    return repr(float(value))


def _json(obj: Mapping[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise BadInput(f"field {name!r} missing or not a non-empty string")
    return value


def _int(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"field {name!r} missing or not an integer")
    return value


def _opt_int(record: Mapping[str, Any], name: str) -> int | None:
    value = record.get(name)
    return None if value is None else _int(record, name)


def _float(record: Mapping[str, Any], name: str) -> float:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"field {name!r} missing or not a number")
    return float(value)


def _opt_float(record: Mapping[str, Any], name: str) -> float | None:
    value = record.get(name)
    return None if value is None else _float(record, name)


def tick_from_record(record: Mapping[str, Any]) -> Tick:
    """Build a `Tick` from a decoded `enriched_tick.v1` record; raises `BadInput` if unusable."""
    kind = record.get("kind")
    if kind not in ("TRADE", "QUOTE"):
        raise BadInput(f"field 'kind' is {kind!r}, not TRADE or QUOTE")
    tick = Tick(
        instrument_id=_text(record, "instrument_id"),
        venue=str(record.get("venue") or ""),
        symbol=str(record.get("symbol") or ""),
        currency=str(record.get("currency") or ""),
        is_trade=kind == "TRADE",
        ts_ns=_int(record, "ts_ns"),
        seq=_opt_int(record, "seq"),
        trade_id=record.get("trade_id") if isinstance(record.get("trade_id"), str) else None,
        price=_opt_float(record, "price"),
        size=_opt_float(record, "size"),
        bid=_opt_float(record, "bid"),
        ask=_opt_float(record, "ask"),
        bid_size=_opt_float(record, "bid_size"),
        ask_size=_opt_float(record, "ask_size"),
    )
    if tick.is_trade and tick.price is None:
        raise BadInput("trade without a price")
    if not tick.is_trade and tick.bid is None and tick.ask is None:
        raise BadInput("quote with neither bid nor ask")
    return tick


def bar_from_record(record: Mapping[str, Any]) -> Bar:
    """Build a `Bar` from a decoded `bar.v1` record; raises `BadInput` if unusable."""
    is_final = record.get("is_final")
    if not isinstance(is_final, bool):
        raise BadInput("field 'is_final' missing or not a boolean")
    return Bar(
        instrument_id=_text(record, "instrument_id"),
        venue=str(record.get("venue") or ""),
        symbol=str(record.get("symbol") or ""),
        currency=str(record.get("currency") or ""),
        interval=_text(record, "interval"),
        window_start_ms=_int(record, "window_start_ms"),
        window_end_ms=_int(record, "window_end_ms"),
        open=_float(record, "open"),
        high=_float(record, "high"),
        low=_float(record, "low"),
        close=_float(record, "close"),
        volume=_float(record, "volume"),
        vwap=_float(record, "vwap"),
        trade_count=_int(record, "trade_count"),
        is_final=is_final,
        version=_int(record, "version"),
        first_ts_ns=_int(record, "first_ts_ns"),
        last_ts_ns=_int(record, "last_ts_ns"),
    )


def _side_write(tick: Tick, side: Side, arrival: int,
                values: Iterable[tuple[str, float | int | str | None]]) -> HashWrite:
    key = tick_key(tick.instrument_id)
    prefix = side.value
    fields: list[tuple[str, str]] = [
        ("instrument_id", tick.instrument_id),
        ("venue", tick.venue),
        ("symbol", tick.symbol),
        ("currency", tick.currency),
        (f"{prefix}_ts", str(tick.ts_ns)),
    ]
    deletes: list[str] = []
    for name, value in (*values, (f"{prefix}_seq", tick.seq)):
        if value is None:
            deletes.append(name)
        elif isinstance(value, float):
            fields.append((name, fmt_float(value)))
        else:
            fields.append((name, str(value)))
    maxima: tuple[tuple[str, int], ...] = (("ts", tick.ts_ns),)
    if side is not Side.TRADE:
        maxima = (*maxima, ("quote_ts", tick.ts_ns))
    announcement = {"type": KeyType.TICK.value, "key": key, "instrument_id": tick.instrument_id,
                    "side": prefix, "ts": tick.ts_ns}
    return HashWrite(
        key=key,
        key_type=KeyType.TICK,
        side=side,
        order_field=f"_{prefix}_ord",
        order=order_key(tick.ts_ns, -_OFFSET if tick.seq is None else tick.seq, arrival),
        fields=tuple(fields),
        deletes=tuple(deletes),
        maxima=maxima,
        announcement=_json(announcement),
    )


def tick_side_write(tick: Tick, side: Side, arrival: int = 0) -> HashWrite:
    """The write of one side (`TRADE`, `BID` or `ASK`) of a tick."""
    if side is Side.TRADE:
        return _side_write(tick, side, arrival, (
            ("trade_price", tick.price), ("trade_size", tick.size), ("trade_id", tick.trade_id)))
    if side is Side.BID:
        return _side_write(tick, side, arrival, (("bid", tick.bid), ("bid_size", tick.bid_size)))
    return _side_write(tick, side, arrival, (("ask", tick.ask), ("ask_size", tick.ask_size)))


def tick_writes(tick: Tick, arrival: int = 0) -> list[HashWrite]:
    """The writes of one tick: its trade side, or its bid and/or ask side.

    `arrival` is the tick's position on its input partition (its offset): the last tie-breaker.
    """
    if tick.is_trade:
        return [tick_side_write(tick, Side.TRADE, arrival)]
    writes = []
    if tick.bid is not None:
        writes.append(tick_side_write(tick, Side.BID, arrival))
    if tick.ask is not None:
        writes.append(tick_side_write(tick, Side.ASK, arrival))
    return writes


def bar_values(bar: Bar) -> dict[str, str | int | float | bool]:
    """The bar as the flat mapping stored in Redis (`window_start`/`window_end` in epoch ms)."""
    return {
        "instrument_id": bar.instrument_id,
        "venue": bar.venue,
        "symbol": bar.symbol,
        "currency": bar.currency,
        "interval": bar.interval,
        "window_start": bar.window_start_ms,
        "window_end": bar.window_end_ms,
        "open": bar.open,
        "high": bar.high,
        "low": bar.low,
        "close": bar.close,
        "volume": bar.volume,
        "vwap": bar.vwap,
        "trade_count": bar.trade_count,
        "is_final": bar.is_final,
        "version": bar.version,
        "first_ts_ns": bar.first_ts_ns,
        "last_ts_ns": bar.last_ts_ns,
    }


def _hash_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return fmt_float(value)
    return str(value)


def bar_member(bar: Bar) -> str:
    """The sorted-set member of a final bar: compact JSON with sorted keys (deterministic)."""
    return _json(bar_values(bar)).decode()


def _bar_announcement(bar: Bar) -> dict[str, Any]:
    return {"instrument_id": bar.instrument_id, "interval": bar.interval,
            "window_start": bar.window_start_ms, "version": bar.version, "is_final": bar.is_final}


def bar_hash_write(bar: Bar) -> HashWrite:
    """The latest-bar hash write of one bar emission."""
    key = bar_key(bar.instrument_id, bar.interval)
    return HashWrite(
        key=key,
        key_type=KeyType.BAR,
        side=Side.BAR,
        order_field="_ord",
        order=order_key(bar.window_start_ms, bar.version, int(bar.is_final)),
        fields=tuple((name, _hash_text(value)) for name, value in bar_values(bar).items()),
        deletes=(),
        maxima=(),
        announcement=_json({"type": KeyType.BAR.value, "key": key, **_bar_announcement(bar)}),
    )


def bar_series_write(bar: Bar, max_final_bars: int = DEFAULT_MAX_FINAL_BARS) -> SeriesWrite:
    """The history-set write of a final bar."""
    series = bars_key(bar.instrument_id, bar.interval)
    return SeriesWrite(
        key=series,
        score=bar.window_start_ms,
        version=bar.version,
        member=bar_member(bar),
        max_len=max_final_bars,
        announcement=_json({"type": KeyType.BARS.value, "key": series, **_bar_announcement(bar)}),
    )


def bar_writes(bar: Bar, max_final_bars: int = DEFAULT_MAX_FINAL_BARS) -> list[Write]:
    """The writes of one bar emission: the latest-bar hash, and the history set when final."""
    writes: list[Write] = [bar_hash_write(bar)]
    if bar.is_final:
        writes.append(bar_series_write(bar, max_final_bars))
    return writes


_LONG_MIN, _LONG_MAX = -_OFFSET, _OFFSET - 1
_BAR_INTS = ("window_end_ms", "trade_count", "first_ts_ns", "last_ts_ns")
_BAR_FLOATS = ("open", "high", "low", "close", "volume", "vwap")
_SIDE_ORDER_FIELDS = {Side.TRADE: "_trade_ord", Side.BID: "_bid_ord", Side.ASK: "_ask_ord"}


@dataclass(slots=True)
class _DeferredTickSide:
    """A tick side's write not built yet: its order (the tuple `order_key` encodes) and its source."""

    order: tuple[int, int, int]
    record: Mapping[str, Any]
    arrival: int
    side: Side

    def build(self) -> HashWrite:
        return tick_side_write(tick_from_record(self.record), self.side, self.arrival)


@dataclass(slots=True)
class _DeferredBarHash:
    """A latest-bar write not built yet: its order (window start, version, final) and its source."""

    order: tuple[int, int, int]
    record: Mapping[str, Any]

    def build(self) -> HashWrite:
        return bar_hash_write(bar_from_record(self.record))


@dataclass(slots=True)
class _DeferredSeries:
    """A history-set write not built yet: its version and its source."""

    version: int
    record: Mapping[str, Any]
    max_len: int

    def build(self) -> SeriesWrite:
        return bar_series_write(bar_from_record(self.record), self.max_len)


_HashEntry = HashWrite | _DeferredTickSide | _DeferredBarHash
_SeriesEntry = SeriesWrite | _DeferredSeries


def _order_text(entry: _HashEntry) -> str:
    return entry.order if isinstance(entry, HashWrite) else order_key(*entry.order)


def _is_long(value: object) -> TypeGuard[int]:
    return type(value) is int and _LONG_MIN <= value <= _LONG_MAX


def _is_opt_float(value: Any) -> bool:
    return value is None or type(value) is float


class PendingWrites:
    """The writes of the current batch, coalesced to the newest per key side and per bar window.

    Within a batch only the newest write of a hash side (and of a bar window in a history set) can
    survive in Redis, so the older ones are dropped before they cost a round trip; ties keep the later
    write, exactly as Redis would. Insertion order of the survivors is kept.
    """

    def __init__(self) -> None:
        self._hash: dict[tuple[str, str], _HashEntry] = {}
        self._series: dict[tuple[str, int], _SeriesEntry] = {}
        self.added = 0

    def add(self, write: Write) -> None:
        """Add one write, keeping it only if it is at least as new as the pending one it competes with."""
        self.added += 1
        if isinstance(write, HashWrite):
            hkey = (write.key, write.order_field)
            current = self._hash.get(hkey)
            if current is None or write.order >= _order_text(current):
                self._hash[hkey] = write
        else:
            skey = (write.key, write.score)
            pending = self._series.get(skey)
            if pending is None or write.version >= pending.version:
                self._series[skey] = write

    def extend(self, writes: Iterable[Write]) -> None:
        """Add several writes in order."""
        for write in writes:
            self.add(write)

    def _defer(self, hkey: tuple[str, str], entry: _DeferredTickSide | _DeferredBarHash) -> None:
        self.added += 1
        current = self._hash.get(hkey)
        if current is None or (entry.order >= current.order if not isinstance(current, HashWrite)
                               else order_key(*entry.order) >= current.order):
            self._hash[hkey] = entry

    def add_tick(self, record: Mapping[str, Any], arrival: int = 0) -> None:
        """Add the writes of a decoded `enriched_tick` record: `extend(tick_writes(tick_from_record(...)))`.

        Same result, but a write is built only if it is still the newest of its key side when the batch
        is flushed (most of a busy instrument's ticks are superseded within the batch). Raises
        `BadInput` as `tick_from_record` does. Records whose fields are not exactly the decoder's
        types take the eager path.
        """
        get = record.get
        kind, iid, ts, seq = get("kind"), get("instrument_id"), get("ts_ns"), get("seq")
        price, bid, ask = get("price"), get("bid"), get("ask")
        if not (
            type(iid) is str and iid and _is_long(ts) and (seq is None or _is_long(seq))
            and _is_long(arrival) and _is_opt_float(price) and _is_opt_float(bid) and _is_opt_float(ask)
            and _is_opt_float(get("size")) and _is_opt_float(get("bid_size"))
            and _is_opt_float(get("ask_size"))
            and (price is not None if kind == "TRADE" else kind == "QUOTE" and (bid is not None
                                                                               or ask is not None))
        ):
            self.extend(tick_writes(tick_from_record(record), arrival))
            return
        key = f"md:tick:{iid}"
        order = (ts, _LONG_MIN if seq is None else seq, arrival)
        if kind == "TRADE":
            self._defer((key, "_trade_ord"), _DeferredTickSide(order, record, arrival, Side.TRADE))
            return
        if bid is not None:
            self._defer((key, "_bid_ord"), _DeferredTickSide(order, record, arrival, Side.BID))
        if ask is not None:
            self._defer((key, "_ask_ord"), _DeferredTickSide(order, record, arrival, Side.ASK))

    def add_bar(self, record: Mapping[str, Any], max_final_bars: int = DEFAULT_MAX_FINAL_BARS) -> None:
        """Add the writes of a decoded `bar` record: `extend(bar_writes(bar_from_record(...), ...))`.

        Deferred like `add_tick`; raises `BadInput` as `bar_from_record` does.
        """
        get = record.get
        iid, interval, start, version, is_final = (get("instrument_id"), get("interval"),
                                                   get("window_start_ms"), get("version"), get("is_final"))
        if not (
            type(iid) is str and iid and type(interval) is str and interval and type(is_final) is bool
            and _is_long(start) and _is_long(version)
            and all(_is_long(get(name)) for name in _BAR_INTS)
            and all(type(get(name)) is float for name in _BAR_FLOATS)
        ):
            self.extend(bar_writes(bar_from_record(record), max_final_bars))
            return
        order = (start, version, int(is_final))
        self._defer((f"md:bar:{iid}:{interval}", "_ord"), _DeferredBarHash(order, record))
        if is_final:
            self.added += 1
            skey = (f"md:bars:{iid}:{interval}", start)
            pending = self._series.get(skey)
            if pending is None or version >= pending.version:
                self._series[skey] = _DeferredSeries(version, record, max_final_bars)

    def writes(self) -> list[Write]:
        """The surviving writes: hash writes, then history-set writes."""
        return [*(e if isinstance(e, HashWrite) else e.build() for e in self._hash.values()),
                *(e if isinstance(e, SeriesWrite) else e.build() for e in self._series.values())]

    def __len__(self) -> int:
        return len(self._hash) + len(self._series)

    def clear(self) -> None:
        """Forget every pending write."""
        self._hash.clear()
        self._series.clear()
        self.added = 0


# --- Reference model of the Redis scripts (used by the tests; the service runs the Lua versions) ---

def apply_hash_write(state: dict[str, str], write: HashWrite) -> bool:
    """Apply `write` to a hash held as a dict, as the Lua script does; True when it applied."""
    current = state.get(write.order_field)
    if current is not None:
        if current > write.order:
            return False
        if current == write.order and all(state.get(f) == v for f, v in write.fields) and not any(
            d in state for d in write.deletes
        ):
            return False
    state[write.order_field] = write.order
    state.update(write.fields)
    for name in write.deletes:
        state.pop(name, None)
    for name, value in write.maxima:
        stored = state.get(name)
        if stored is None or int(stored) < value:
            state[name] = str(value)
    return True


def apply_series_write(series: dict[str, int], write: SeriesWrite) -> bool:
    """Apply `write` to a sorted set held as {member: score}, as the Lua script does."""
    same_window = [m for m, s in series.items() if s == write.score]
    for member in same_window:
        if member == write.member or int(orjson.loads(member)["version"]) > write.version:
            return False
    for member in same_window:
        del series[member]
    series[write.member] = write.score
    if len(series) > write.max_len:
        ranked = sorted(series.items(), key=lambda kv: (kv[1], kv[0]))
        for member, _ in ranked[: len(series) - write.max_len]:
            del series[member]
    return write.member in series


# --- Records of the input topics -> writes ---

Decoder = Callable[[bytes, str], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class InputTopics:
    """The two input topics and the Avro schema each carries."""

    ticks: str
    bars: str


TICK_SCHEMA = "enriched_tick"
BAR_SCHEMA = "bar"
#: The fields of each input schema that `tick_from_record` / `bar_from_record` read.
TICK_FIELDS = ("instrument_id", "venue", "symbol", "currency", "kind", "ts_ns", "seq", "trade_id", "price",
               "size", "bid", "ask", "bid_size", "ask_size")
BAR_FIELDS = ("instrument_id", "venue", "symbol", "currency", "interval", "window_start_ms", "window_end_ms",
              "open", "high", "low", "close", "volume", "vwap", "trade_count", "is_final", "version",
              "first_ts_ns", "last_ts_ns")


def field_decoder(registry: SchemaRegistry) -> Decoder:
    """A `Decoder` that checks each message in full but builds only `TICK_FIELDS` / `BAR_FIELDS`.

    Messages of other writer versions are decoded in full (`SchemaRegistry.field_reader`).
    """
    readers = {TICK_SCHEMA: registry.field_reader(TICK_SCHEMA, TICK_FIELDS),
               BAR_SCHEMA: registry.field_reader(BAR_SCHEMA, BAR_FIELDS)}

    def decode(value: bytes, schema: str) -> Mapping[str, Any]:
        return readers[schema](value)

    return decode


def project_records(
    batch: Iterable[InRecord],
    topics: InputTopics,
    decode: Decoder,
    pending: PendingWrites,
    max_final_bars: int = DEFAULT_MAX_FINAL_BARS,
) -> list[DeadLetter]:
    """Turn consumed records into pending writes; return the records that cannot be projected.

    `decode(value, schema_name)` decodes an Avro message and raises on bytes it cannot read.
    """
    dead: list[DeadLetter] = []
    for record in batch:
        if record.topic == topics.ticks:
            schema = TICK_SCHEMA
        elif record.topic == topics.bars:
            schema = BAR_SCHEMA
        else:
            detail = f"unexpected topic {record.topic}"
            dead.append(DeadLetter(record, DeadLetterReason.PROCESSING_ERROR, detail))
            continue
        if record.value is None:
            dead.append(DeadLetter(record, DeadLetterReason.UNDECODABLE, "empty message"))
            continue
        try:
            decoded = decode(record.value, schema)
        except Exception as exc:  # any decoder failure is bad data, not a bug of this service
            dead.append(DeadLetter(record, DeadLetterReason.UNDECODABLE, f"{type(exc).__name__}: {exc}"))
            continue
        try:
            if schema == TICK_SCHEMA:
                pending.add_tick(decoded, record.offset)
            else:
                pending.add_bar(decoded, max_final_bars)
        except BadInput as exc:
            dead.append(DeadLetter(record, DeadLetterReason.BAD_FIELD, str(exc)))
    return dead
