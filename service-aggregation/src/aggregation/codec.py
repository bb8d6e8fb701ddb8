"""Edges between Kafka/ClickHouse bytes and the windowing core's dataclasses."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

from dataproc_shared import avro
from dataproc_shared.avro_flat import read_long, write_long

from aggregation.transform import NS_PER_MS, Bar, LateTrade, Tick

ENRICHED_SCHEMA = "enriched_tick"
BAR_SCHEMA = "bar"

#: Columns of `market_data.bars` written by the service, in the order of `bar_row`.
BAR_COLUMNS: tuple[str, ...] = (
    "instrument_id", "interval", "window_start", "window_end", "venue", "symbol", "currency",
    "open", "high", "low", "close", "volume", "vwap", "trade_count", "is_final", "version",
    "first_trade_ts", "last_trade_ts", "source_partition", "offset_from", "offset_to",
)
#: Columns of `market_data.late_trades`, in the order of `late_rows`.
LATE_COLUMNS: tuple[str, ...] = (
    "instrument_id", "interval", "window_start", "trade_ts", "watermark_ts", "price", "size", "trade_id",
    "source_partition", "source_offset",
)


class BadTickError(ValueError):
    """An enriched tick that decodes but cannot make a bar (a trade without price or size)."""


def decode_tick(value: bytes, partition: int, offset: int) -> Tick:
    """`Tick` of an `enriched_tick` message; raises `avro.AvroError` or `BadTickError`.

    Messages written with the schema version `_read_v1` was written for are read straight into a
    `Tick`; any other writer version goes through `dataproc_shared.avro` (schema resolution).
    """
    if _V1_HEADER is not None and value.startswith(_V1_HEADER):
        try:
            return _read_v1(value, partition, offset)
        except BadTickError:
            raise
        except (ValueError, IndexError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
            raise avro.DecodeError(f"cannot decode enriched_tick.v1 as enriched_tick.v1: {exc!r}") from exc
    return _tick_of(avro.decode(value, ENRICHED_SCHEMA), partition, offset)


def _tick_of(doc: dict[str, Any], partition: int, offset: int) -> Tick:
    is_trade = doc["kind"] == "TRADE"
    price = doc.get("price")
    size = doc.get("size")
    if is_trade and (price is None or size is None):
        raise BadTickError("trade without price or size")
    return Tick(
        instrument_id=doc["instrument_id"],
        venue=doc["venue"],
        symbol=doc["symbol"],
        currency=doc["currency"],
        is_trade=is_trade,
        ts_ns=doc["ts_ns"],
        seq=doc.get("seq"),
        price=float(price) if price is not None else 0.0,
        size=float(size) if size is not None else 0.0,
        ingest_ns=doc["ingest_ns"],
        partition=partition,
        offset=offset,
        venue_symbol=doc["venue_symbol"],
        trade_id=doc.get("trade_id"),
    )


#: The `enriched_tick` fields, in order, that `_read_v1` reads (name, Avro type).
_V1_LAYOUT: tuple[tuple[str, Any], ...] = (
    ("instrument_id", "string"), ("venue", "string"), ("venue_symbol", "string"), ("symbol", "string"),
    ("asset_class", "string"), ("currency", "string"), ("tick_size", ["null", "double"]),
    ("multiplier", ["null", "double"]), ("venue_timezone", "string"),
    ("kind", {"type": "enum", "name": "TickKind", "symbols": ["TRADE", "QUOTE"]}), ("ts_ns", "long"),
    ("seq", ["null", "long"]), ("trade_id", ["null", "string"]), ("price", ["null", "double"]),
    ("size", ["null", "double"]), ("bid", ["null", "double"]), ("ask", ["null", "double"]),
    ("bid_size", ["null", "double"]), ("ask_size", ["null", "double"]), ("ingest_ns", "long"),
    ("source_partition", "int"), ("source_offset", "long"),
)


def _newest_header(schema: str, layout: tuple[tuple[str, Any], ...]) -> bytes | None:
    """Header of the newest version of `schema` when its fields are exactly `layout`, else None."""
    version = avro.default_registry().get(schema)
    fields = version.parsed.get("fields", []) if isinstance(version.parsed, dict) else []
    if tuple((f["name"], _plain(f["type"])) for f in fields) == layout:
        return version.header
    return None


def _plain(t: Any) -> Any:
    """A field type without the extras fastavro's parsing adds (namespaces, logical types)."""
    if isinstance(t, dict):
        if t.get("type") == "enum":
            return {"type": "enum", "name": str(t.get("name", "")).rsplit(".", 1)[-1],
                    "symbols": list(t.get("symbols", []))}
        return _plain(t["type"]) if set(t) <= {"type", "logicalType"} else t
    if isinstance(t, list):
        return [_plain(x) for x in t]
    return t


_unpack_double = struct.Struct("<d").unpack_from
_HEADER_SIZE = avro.HEADER_SIZE


#: Reference-data prefixes seen (see `_read_v1`), by the instrument id's raw bytes: (the prefix's
#: bytes from the end of the header, the six strings decoded from it). Bounded; started over when full.
_PREFIXES: dict[bytes, tuple[bytes, list[str]]] = {}
_PREFIXES_MAX = 65_536


def _read_v1(b: bytes, partition: int, offset: int) -> Tick:
    """The `Tick` of a v1 body; the same checks as the generic decoder (every field is read).

    The first nine fields (instrument id to venue time zone) are the instrument's reference data,
    the same bytes in every tick of the instrument until that data changes: when the bytes at the
    start of the body equal a prefix read before for the same instrument id, its strings are reused
    instead of being decoded again (the bytes are compared in full, so any change reads anew).
    """
    n = b[_HEADER_SIZE]
    if not n & 0x81:  # a non-negative one-byte length: look the prefix up by the id's bytes
        start = _HEADER_SIZE + 1
        cached = _PREFIXES.get(b[start:start + (n >> 1)])
        if cached is not None and b.startswith(cached[0], _HEADER_SIZE):
            strings = cached[1]
            p = _HEADER_SIZE + len(cached[0])
        else:
            strings, p = _read_prefix(b)
            if len(_PREFIXES) >= _PREFIXES_MAX:
                _PREFIXES.clear()
            _PREFIXES[b[start:start + (n >> 1)]] = (b[_HEADER_SIZE:p], strings)
    else:
        strings, p = _read_prefix(b)
    return _read_rest(b, p, strings, partition, offset)


def _read_prefix(b: bytes) -> tuple[list[str], int]:
    """The six strings of the reference-data fields and the position after the venue time zone."""
    p = _HEADER_SIZE
    strings: list[str] = []
    for _ in range(6):  # instrument_id, venue, venue_symbol, symbol, asset_class, currency
        n = b[p]
        if n < 0x80:
            n, p = (n >> 1) ^ -(n & 1), p + 1
        else:
            n, p = read_long(b, p)
        if n < 0:
            raise ValueError("negative length")
        end = p + n
        if end > len(b):
            raise ValueError("truncated string")
        strings.append(b[p:end].decode())
        p = end
    for _ in range(2):  # tick_size, multiplier
        u = b[p]
        p += 1
        if u == 2:
            _unpack_double(b, p)
            p += 8
        elif u != 0:
            raise ValueError("invalid union index")
    n, p = read_long(b, p)  # venue_timezone
    if n < 0:
        raise ValueError("negative length")
    if p + n > len(b):
        raise ValueError("truncated string")
    b[p:p + n].decode()
    return strings, p + n


def _read_rest(b: bytes, p: int, strings: list[str], partition: int, offset: int) -> Tick:
    """The fields after the reference data (kind to source offset), and the `Tick`."""
    kind, p = read_long(b, p)
    if kind < 0 or kind > 1:
        raise IndexError("enum index")
    is_trade = kind == 0
    ts_ns, p = read_long_ns(b, p)
    u = b[p]
    p += 1
    seq: int | None = None
    if u == 2:
        seq, p = read_long(b, p)
    elif u != 0:
        raise ValueError("invalid union index")
    u = b[p]
    p += 1
    trade_id: str | None = None
    if u == 2:
        n, p = read_long(b, p)
        if n < 0:
            raise ValueError("negative length")
        if p + n > len(b):
            raise ValueError("truncated string")
        trade_id = b[p:p + n].decode()
        p += n
    elif u != 0:
        raise ValueError("invalid union index")
    price: float | None
    size: float | None
    if b[p] == 2 and len(b) >= p + _TRADE_TAIL.size:
        # the common trade: price and size present, the four quote fields null
        u, price, u2, size, n1, n2, n3, n4 = _TRADE_TAIL.unpack_from(b, p)
        if u2 == 2 and not (n1 | n2 | n3 | n4):
            p += _TRADE_TAIL.size
        else:
            price, size, p = _read_doubles(b, p)
    else:
        price, size, p = _read_doubles(b, p)
    ingest_ns, p = read_long_ns(b, p)
    _, p = read_long(b, p)  # source_partition
    _, p = read_long(b, p)  # source_offset
    if is_trade and (price is None or size is None):
        raise BadTickError("trade without price or size")
    return Tick(strings[0], strings[1], strings[3], strings[5], is_trade, ts_ns, seq,
                0.0 if price is None else price, 0.0 if size is None else size, ingest_ns, partition, offset,
                strings[2], trade_id)




#: price (union index 2, double), size (the same), bid, ask, bid_size, ask_size (union index 0).
_TRADE_TAIL = struct.Struct("<BdBd4B")


def _read_doubles(b: bytes, p: int) -> tuple[float | None, float | None, int]:
    """Price and size of the six optional doubles (the quote's four are read and checked too)."""
    doubles: list[float | None] = []
    for _ in range(6):  # price, size, bid, ask, bid_size, ask_size
        u = b[p]
        p += 1
        if u == 2:
            doubles.append(_unpack_double(b, p)[0])
            p += 8
        elif u == 0:
            doubles.append(None)
        else:
            raise ValueError("invalid union index")
    return doubles[0], doubles[1], p


#: The continuation bits of the first eight bytes of a nine-byte varint.
_CONTINUATION_8 = 0x8080808080808080


def read_long_ns(b: bytes, p: int) -> tuple[int, int]:
    """`read_long`, with a path without a per-byte loop for nine-byte varints (nanosecond times)."""
    if len(b) > p + 8 and b[p + 8] < 0x80:
        x = int.from_bytes(b[p:p + 8], "little")
        if x & _CONTINUATION_8 == _CONTINUATION_8:
            # Gather the eight 7-bit groups into 56 bits (the inverse of `write_long`'s spread).
            x ^= _CONTINUATION_8
            x = (x & 0x007F007F007F007F) | (x & 0x7F007F007F007F00) >> 1
            x = (x & 0x00003FFF00003FFF) | (x & 0x3FFF00003FFF0000) >> 2
            x = (x & 0x000000000FFFFFFF) | (x & 0x0FFFFFFF00000000) >> 4
            n = x | b[p + 8] << 56
            return (n >> 1) ^ -(n & 1), p + 9
    return read_long(b, p)


def bar_document(bar: Bar) -> dict[str, Any]:
    """The `bar.v1` record of a bar."""
    return {
        "instrument_id": bar.instrument_id,
        "venue": bar.venue,
        "symbol": bar.symbol,
        "currency": bar.currency,
        "interval": bar.interval,
        "window_start_ms": bar.window_start_ns // NS_PER_MS,
        "window_end_ms": bar.window_end_ns // NS_PER_MS,
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
        "max_ingest_ns": bar.max_ingest_ns,
        "source_partition": bar.source_partition,
        "offset_from": bar.offset_from,
        "offset_to": bar.offset_to,
    }


def encode_bar(bar: Bar) -> bytes:
    """`bar.v1` single-object Avro encoding of a bar.

    While the newest `bar` schema has the layout `_write_v1` was written for, the bytes are written
    straight from the `Bar` (the same bytes as `avro.encode(BAR_SCHEMA, bar_document(bar))`).
    """
    if _BAR_V1_HEADER is not None:
        try:
            return _write_v1(bar)
        except (ValueError, TypeError, AttributeError, struct.error) as exc:
            raise avro.EncodeError(f"bar.v1: {exc!r}") from exc
    return avro.encode(BAR_SCHEMA, bar_document(bar))


#: The `bar` fields, in order, that `_write_v1` writes (name, Avro type without logical types).
_BAR_V1_LAYOUT: tuple[tuple[str, Any], ...] = (
    ("instrument_id", "string"), ("venue", "string"), ("symbol", "string"), ("currency", "string"),
    ("interval", "string"), ("window_start_ms", "long"), ("window_end_ms", "long"), ("open", "double"),
    ("high", "double"), ("low", "double"), ("close", "double"), ("volume", "double"), ("vwap", "double"),
    ("trade_count", "int"), ("is_final", "boolean"), ("version", "long"), ("first_ts_ns", "long"),
    ("last_ts_ns", "long"), ("max_ingest_ns", "long"), ("source_partition", "int"), ("offset_from", "long"),
    ("offset_to", "long"),
)
_pack_6_doubles = struct.Struct("<6d").pack


#: Header and the five leading strings of `bar.v1` messages, by (instrument, venue, symbol, currency,
#: interval): the same for every emission of a bar. Bounded; started over when full.
_BAR_PREFIXES: dict[tuple[str, str, str, str, str], bytes] = {}
_BAR_PREFIXES_MAX = 65_536


def _bar_prefix(key: tuple[str, str, str, str, str]) -> bytes:
    parts = [_BAR_V1_HEADER or b""]
    for text in key:
        raw = text.encode()
        parts.append(write_long(len(raw)))
        parts.append(raw)
    prefix = b"".join(parts)
    if len(_BAR_PREFIXES) >= _BAR_PREFIXES_MAX:
        _BAR_PREFIXES.clear()
    _BAR_PREFIXES[key] = prefix
    return prefix


def _write_v1(b: Bar) -> bytes:
    key = (b.instrument_id, b.venue, b.symbol, b.currency, b.interval)
    prefix = _BAR_PREFIXES.get(key)
    if prefix is None:
        prefix = _bar_prefix(key)
    w = write_long
    return b"".join((
        prefix, w(b.window_start_ns // NS_PER_MS), w(b.window_end_ns // NS_PER_MS),
        _pack_6_doubles(b.open, b.high, b.low, b.close, b.volume, b.vwap), w(b.trade_count),
        b"\x01" if b.is_final else b"\x00", w(b.version), w(b.first_ts_ns), w(b.last_ts_ns),
        w(b.max_ingest_ns), w(b.source_partition), w(b.offset_from), w(b.offset_to),
    ))


def utc(ns: int) -> dt.datetime:
    """UTC datetime of epoch nanoseconds (microsecond precision: what both ClickHouse backends take)."""
    return dt.datetime.fromtimestamp(ns // 1000 / 1_000_000, dt.UTC)


def bar_row(bar: Bar) -> tuple[Any, ...]:
    """The `market_data.bars` row of a bar (`BAR_COLUMNS` order)."""
    return (
        bar.instrument_id, bar.interval, utc(bar.window_start_ns), utc(bar.window_end_ns), bar.venue,
        bar.symbol, bar.currency, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.vwap,
        bar.trade_count, 1 if bar.is_final else 0, bar.version, utc(bar.first_ts_ns), utc(bar.last_ts_ns),
        bar.source_partition, bar.offset_from, bar.offset_to,
    )


def late_rows(late: LateTrade, lengths_ns: dict[str, int]) -> list[tuple[Any, ...]]:
    """`market_data.late_trades` rows of a late trade, one per interval it was late for."""
    t = late.tick
    rows = []
    for name in late.intervals:
        length = lengths_ns[name]
        start = (t.ts_ns // length) * length
        rows.append((t.instrument_id, name, utc(start), utc(t.ts_ns), utc(late.watermark_ns), t.price, t.size,
                     t.trade_id or "", t.partition, t.offset))
    return rows


#: Headers of the schema versions the direct codecs were written for (None: use `dataproc_shared.avro`).
_V1_HEADER = _newest_header(ENRICHED_SCHEMA, _V1_LAYOUT)
_BAR_V1_HEADER = _newest_header(BAR_SCHEMA, _BAR_V1_LAYOUT)
