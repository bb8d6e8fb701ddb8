"""Synthetic raw ticks with known properties (pure: no I/O, seeded, repeatable).

The generator walks prices per instrument (realistic levels per asset class), mixes trades and
quotes over several venues with Zipf-skewed activity, and injects configurable shares of malformed,
duplicate, out-of-order and late records. Every record is tagged with what it is meant to be, so a
test can account for each one and a reference computation can check the bars.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

NS_PER_MS = 1_000_000


class Tag(StrEnum):
    """What a generated record is meant to be."""

    TRADE = "trade"
    QUOTE = "quote"
    DUPLICATE = "duplicate"  # same venue + trade_id as an earlier trade: dropped by normalization
    MALFORMED = "malformed"  # rejected by normalization
    UNKNOWN = "unknown"  # valid tick for an instrument not in the reference data
    OUT_OF_ORDER = "out_of_order"  # a trade behind the event-time front, within the allowed lateness
    LATE = "late"  # a trade far behind the event-time front (closed windows for short intervals)


@dataclass(frozen=True, slots=True)
class Instrument:
    """What the generator needs to know of an instrument."""

    venue: str
    venue_symbol: str
    asset_class: str
    tick_size: float = 0.01


@dataclass(frozen=True, slots=True)
class RawTick:
    """One generated raw message: Kafka key and value, plus what it was meant to be."""

    key: bytes
    value: bytes
    tag: Tag
    venue: str
    symbol: str
    ts_ns: int


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """Shape of a generated stream. Shares are fractions of all records."""

    count: int = 10_000
    seed: int = 1
    start_ns: int = 1_763_900_000_000_000_000
    #: event-time spacing between consecutive records (the simulated feed rate)
    step_ns: int = 10 * NS_PER_MS
    quote_share: float = 0.4
    malformed_share: float = 0.0
    duplicate_share: float = 0.0
    out_of_order_share: float = 0.0
    late_share: float = 0.0
    unknown_share: float = 0.0
    #: how far behind the front an out-of-order trade is (must stay within the allowed lateness)
    out_of_order_max_ns: int = 2_000 * NS_PER_MS
    #: how far behind the front a late trade is
    late_min_ns: int = 130_000 * NS_PER_MS
    late_max_ns: int = 240_000 * NS_PER_MS
    zipf_s: float = 1.1
    timestamp_style: str = "mixed"  # "iso", "ns", "ms" or "mixed"
    extra_unknown: Sequence[Instrument] = field(default_factory=tuple)


_PRICE_LEVEL = {
    "equity": (20.0, 500.0),
    "etf": (50.0, 500.0),
    "future": (2.0, 2500.0),
    "commodity": (2.0, 2500.0),
    "fx": (0.5, 1.6),
    "crypto": (1000.0, 70000.0),
    "power": (-20.0, 120.0),
}


def _initial_price(rng: random.Random, inst: Instrument) -> float:
    lo, hi = _PRICE_LEVEL.get(inst.asset_class, (10.0, 200.0))
    if inst.venue_symbol.startswith("GC"):
        return 1300.0 + rng.uniform(-20, 20)
    if inst.venue_symbol.startswith("BTC"):
        return 60000.0 + rng.uniform(-500, 500)
    if inst.venue_symbol.startswith("ETH"):
        return 2500.0 + rng.uniform(-50, 50)
    return rng.uniform(lo, hi)


def _round_to(value: float, tick: float) -> float:
    if tick <= 0:
        return value
    return round(round(value / tick) * tick, 10)


def _ts_field(style: str, rng: random.Random, ts_ns: int) -> object:
    if style == "mixed":
        style = rng.choice(("iso", "ns", "ms", "us"))
    if style == "ns":
        return ts_ns
    if style == "us":
        return ts_ns // 1000 if ts_ns % 1000 == 0 else _iso(ts_ns)
    if style == "ms":
        return ts_ns // NS_PER_MS if ts_ns % NS_PER_MS == 0 else _iso(ts_ns)
    return _iso(ts_ns)


def _iso(ts_ns: int) -> str:
    secs, frac = divmod(ts_ns, 1_000_000_000)
    days, rem = divmod(secs, 86_400)
    hh, rem = divmod(rem, 3600)
    mm, ss = divmod(rem, 60)
    y, m, d = _civil_from_days(days)
    return f"{y:04d}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}.{frac:09d}Z"


def _civil_from_days(z: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm)."""
    z += 719_468
    era = (z if z >= 0 else z - 146_096) // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + (m <= 2), m, d)


_MALFORMED: tuple[bytes, ...] = (
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"symbol": "X", "type": "trade", "ts": 1, "price": 1, "size": 1}',
    b'{"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": "yesterday", "price": 1, "size": 1}',
    b'{"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": 1763900000000, "price": "abc", "size": 1}',
    b'{"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": 1763900000000, "price": 10, "size": 0}',
    b'{"venue": "XNYS", "symbol": "IBM", "type": "quote", "ts": 1763900000000, "bid": 10.5, "ask": 10.4}',
    b'{"venue": "XNYS", "symbol": "IBM", "type": "quote", "ts": 1763900000000}',
    b'{"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": 1763900000000, "price": "NaN", "size": 1}',
)


def generate(instruments: Sequence[Instrument], cfg: GeneratorConfig) -> Iterator[RawTick]:
    """Yield `cfg.count` raw ticks. The same instruments and config always give the same stream."""
    if not instruments:
        raise ValueError("no instruments to generate ticks for")
    rng = random.Random(cfg.seed)
    weights = [1.0 / math.pow(rank + 1, cfg.zipf_s) for rank in range(len(instruments))]
    order = list(range(len(instruments)))
    rng.shuffle(order)
    prices = {i: _initial_price(rng, instruments[i]) for i in range(len(instruments))}
    emitted_trades: list[tuple[str, str, str]] = []  # (venue, symbol, trade_id) for duplicates
    front = cfg.start_ns
    trade_no = 0
    seq = 0
    unknown = list(cfg.extra_unknown) or [Instrument("XNYS", "NOSUCH", "equity")]

    for _ in range(cfg.count):
        front += cfg.step_ns
        seq += 1
        roll = rng.random()
        cut = cfg.malformed_share
        if roll < cut:
            yield RawTick(b"XNYS:IBM", rng.choice(_MALFORMED), Tag.MALFORMED, "", "", 0)
            continue
        cut += cfg.duplicate_share
        if roll < cut and emitted_trades:
            venue, symbol, trade_id = rng.choice(emitted_trades[-500:])
            # a re-sent copy of an earlier trade: same venue + trade_id, different payload
            body = {"venue": venue, "symbol": symbol, "type": "trade", "ts": _iso(front),
                    "price": "1", "size": 1, "trade_id": trade_id}
            yield RawTick(f"{venue}:{symbol}".encode(), _dumps(body), Tag.DUPLICATE, venue, symbol, front)
            continue
        cut += cfg.unknown_share
        if roll < cut:
            inst = rng.choice(unknown)
            body = {"venue": inst.venue, "symbol": inst.venue_symbol, "type": "trade", "ts": _iso(front),
                    "price": 10.0, "size": 1}
            yield RawTick(f"{inst.venue}:{inst.venue_symbol}".encode(), _dumps(body), Tag.UNKNOWN,
                          inst.venue, inst.venue_symbol, front)
            continue

        idx = order[rng.choices(range(len(instruments)), weights=weights)[0]]
        inst = instruments[idx]
        key = f"{inst.venue}:{inst.venue_symbol}".encode()
        vol = 0.0005 if inst.asset_class != "power" else 0.01
        prices[idx] = prices[idx] * (1 + rng.gauss(0, vol)) if inst.asset_class != "power" \
            else prices[idx] + rng.gauss(0, 1.0)
        price = _round_to(prices[idx], inst.tick_size)

        cut += cfg.out_of_order_share
        if roll < cut:
            tag, ts = Tag.OUT_OF_ORDER, front - rng.randint(1, cfg.out_of_order_max_ns)
        else:
            cut += cfg.late_share
            if roll < cut:
                tag, ts = Tag.LATE, front - rng.randint(cfg.late_min_ns, cfg.late_max_ns)
            else:
                cut += cfg.quote_share
                tag, ts = (Tag.QUOTE if roll < cut else Tag.TRADE), front

        if tag is Tag.QUOTE:
            spread = max(inst.tick_size, abs(price) * 0.0002)
            body = {"venue": inst.venue, "symbol": inst.venue_symbol, "type": "quote",
                    "ts": _ts_field(cfg.timestamp_style, rng, ts),
                    "bid": _round_to(price - spread, inst.tick_size),
                    "ask": _round_to(price + spread, inst.tick_size), "bid_size": rng.randint(1, 50),
                    "ask_size": rng.randint(1, 50)}
        else:
            trade_no += 1
            trade_id = f"T{cfg.seed}-{trade_no}"
            size = rng.randint(1, 100) if inst.asset_class not in ("crypto", "fx") \
                else round(rng.uniform(0.001, 5.0), 6)
            body = {"venue": inst.venue.lower() if rng.random() < 0.05 else inst.venue,
                    "symbol": f" {inst.venue_symbol} " if rng.random() < 0.05 else inst.venue_symbol,
                    "type": "TRADE" if rng.random() < 0.05 else "trade",
                    "ts": _ts_field(cfg.timestamp_style, rng, ts),
                    "price": str(price) if rng.random() < 0.5 else price, "size": size,
                    "trade_id": trade_id, "seq": seq}
            emitted_trades.append((inst.venue, inst.venue_symbol, trade_id))
        yield RawTick(key, _dumps(body), tag, inst.venue, inst.venue_symbol, ts)


def _dumps(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
