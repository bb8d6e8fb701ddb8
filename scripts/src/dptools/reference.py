"""An independent, deliberately naive computation of the final bars a stream must produce.

It shares no code with the aggregation service: it replays the trades of each partition in arrival
order, keeps every trade of every window in a list, and computes OHLCV from the lists at the end.
Used by the end-to-end test, the fault-injection suite and the demo's self-check.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from dataproc_shared.partitioning import partition_for

from dptools.ticks import RawTick, Tag

INTERVAL_NS = {"1m": 60 * 10**9, "5m": 300 * 10**9, "1h": 3600 * 10**9}


def interval_ns(name: str) -> int:
    """`30s`, `1m`, `5m`, `1h`, `1d` to nanoseconds."""
    units = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86_400 * 10**9}
    return int(name[:-1]) * units[name[-1]]


@dataclass(frozen=True, slots=True)
class Arrival:
    """One record as the aggregation sees it, in the order of its partition."""

    partition: int
    instrument_id: str
    is_trade: bool
    ts_ns: int
    seq: int | None = None
    price: float = 0.0
    size: float = 0.0


@dataclass(frozen=True, slots=True)
class RefBar:
    """A final bar of the reference computation."""

    instrument_id: str
    interval: str
    window_start_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    vwap: float
    trade_count: int


@dataclass(frozen=True, slots=True)
class RefResult:
    """Final bars and the (trade index, interval) pairs that arrived for a closed window."""

    bars: dict[tuple[str, str, int], RefBar]
    late: list[tuple[int, str]]


def arrivals_from_raw(ticks: Iterable[RawTick], known: Collection[tuple[str, str]], partitions: int,
                      instrument_id: Callable[[str, str], str]) -> list[Arrival]:
    """What aggregation must see of a generated raw stream, per partition in produce order.

    Malformed records, duplicates and ticks of unknown or inactive instruments never reach it;
    `known` holds the (venue, venue symbol) of the active instruments, `instrument_id` names them.
    """
    arrivals = []
    for tick in ticks:
        if tick.tag in (Tag.MALFORMED, Tag.DUPLICATE, Tag.UNKNOWN) or (tick.venue, tick.symbol) not in known:
            continue
        body = json.loads(tick.value)
        is_trade = tick.tag is not Tag.QUOTE
        arrivals.append(Arrival(
            partition=partition_for(tick.key, partitions),
            instrument_id=instrument_id(tick.venue, tick.symbol),
            is_trade=is_trade, ts_ns=tick.ts_ns, seq=body.get("seq"),
            price=float(body["price"]) if is_trade else 0.0,
            size=float(body["size"]) if is_trade else 0.0,
        ))
    return arrivals


def compute(arrivals: Sequence[Arrival], intervals: Iterable[str] = ("1m", "5m", "1h"),
            allowed_lateness_ns: int = 5 * 10**9, quotes_advance_watermark: bool = True) -> RefResult:
    """Final bars of `arrivals` when every window eventually closes (end of stream, idle close).

    Only the watermark makes trades late here. The aggregation's idle timer also closes windows: each
    once the wall clock has passed its `window_end + allowed_lateness` and its partition has had no
    input for the idle timeout. With event times in an hour that has ended, every window closes that
    way once the feed stops, so the result holds if no partition goes idle in the middle of the stream.
    """
    intervals = list(intervals)
    watermark: dict[int, int] = defaultdict(lambda: -(2**63))
    windows: dict[tuple[str, str, int], list[tuple[int, int, int, float, float]]] = defaultdict(list)
    late: list[tuple[int, str]] = []
    for idx, rec in enumerate(arrivals):
        if rec.is_trade:
            for name in intervals:
                length = interval_ns(name)
                start = rec.ts_ns // length * length
                if watermark[rec.partition] > start + length + allowed_lateness_ns:
                    late.append((idx, name))
                    continue
                seq = rec.seq if rec.seq is not None else -1
                windows[(rec.instrument_id, name, start)].append((rec.ts_ns, seq, idx, rec.price, rec.size))
        if rec.is_trade or quotes_advance_watermark:
            watermark[rec.partition] = max(watermark[rec.partition], rec.ts_ns)

    bars: dict[tuple[str, str, int], RefBar] = {}
    for (inst, name, start), trades in windows.items():
        ordered = sorted(trades, key=lambda t: (t[0], t[1], t[2]))
        volume = sum(t[4] for t in trades)
        notional = sum(t[3] * t[4] for t in trades)
        bars[(inst, name, start // 10**6)] = RefBar(
            instrument_id=inst, interval=name, window_start_ms=start // 10**6,
            open=ordered[0][3], high=max(t[3] for t in trades), low=min(t[3] for t in trades),
            close=ordered[-1][3], volume=volume, vwap=notional / volume if volume else 0.0,
            trade_count=len(trades),
        )
    return RefResult(bars=bars, late=late)


def diff_bars(expected: dict[tuple[str, str, int], RefBar],
              actual: dict[tuple[str, str, int], dict[str, float]], rel_tol: float = 1e-9) -> list[str]:
    """Human-readable differences between reference bars and bars read back (empty when equal)."""
    problems: list[str] = []
    for key in sorted(set(expected) | set(actual)):
        exp, got = expected.get(key), actual.get(key)
        if exp is None:
            problems.append(f"unexpected bar {key}: {got}")
            continue
        if got is None:
            problems.append(f"missing bar {key}: expected {exp}")
            continue
        for field in ("open", "high", "low", "close", "volume", "vwap", "trade_count"):
            e, g = float(getattr(exp, field)), float(got[field])
            if abs(e - g) > rel_tol * max(1.0, abs(e)):
                problems.append(f"bar {key} {field}: expected {e}, got {g}")
    return problems
