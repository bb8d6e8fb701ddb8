"""Edges between Kafka/ClickHouse bytes and the windowing core's dataclasses."""

from __future__ import annotations

import datetime as dt
from typing import Any

from dataproc_shared import avro

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
    """`Tick` of an `enriched_tick` message; raises `avro.AvroError` or `BadTickError`."""
    doc = avro.decode(value, ENRICHED_SCHEMA)
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
    """`bar.v1` single-object Avro encoding of a bar."""
    return avro.encode(BAR_SCHEMA, bar_document(bar))


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
