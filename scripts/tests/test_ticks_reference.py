"""Unit tests of the synthetic tick generator and the reference bar computation (no servers)."""

from __future__ import annotations

import json
from collections import Counter

from dptools.reference import Arrival, compute, diff_bars
from dptools.ticks import GeneratorConfig, Instrument, Tag, generate

INSTRUMENTS = [
    Instrument("XNYS", "IBM", "equity"),
    Instrument("BINANCE", "BTCUSDT", "crypto"),
    Instrument("EPEX", "DE-H12", "power"),
]


def test_generator_is_repeatable_and_tags_shares() -> None:
    cfg = GeneratorConfig(count=3000, seed=5, malformed_share=0.05, duplicate_share=0.05, late_share=0.02,
                          out_of_order_share=0.02, unknown_share=0.02)
    first = list(generate(INSTRUMENTS, cfg))
    assert first == list(generate(INSTRUMENTS, cfg))
    tags = Counter(t.tag for t in first)
    assert len(first) == 3000
    for tag in Tag:
        assert tags[tag] > 0, tag
    assert 100 < tags[Tag.MALFORMED] < 200


def test_generated_trades_are_valid_raw_json() -> None:
    for tick in generate(INSTRUMENTS, GeneratorConfig(count=500, seed=2)):
        body = json.loads(tick.value)
        assert body["venue"].strip().upper() == tick.venue
        if tick.tag is Tag.TRADE:
            assert float(body["size"]) > 0
            assert body["trade_id"]
        if tick.tag is Tag.QUOTE:
            assert body["bid"] <= body["ask"]


def test_reference_ohlcv_with_ties_and_late_trades() -> None:
    m = 60 * 10**9
    arrivals = [
        Arrival(0, "A", True, 10 * 10**9, 2, 10.0, 1),
        Arrival(0, "A", True, 10 * 10**9, 1, 11.0, 3),  # same ts, lower seq: this one opens
        Arrival(0, "A", True, 59 * 10**9, None, 9.0, 2),
        Arrival(0, "A", False, 3 * m),  # a quote pushes the watermark far ahead
        Arrival(0, "A", True, 30 * 10**9, None, 50.0, 1),  # late for 1m, still inside 5m
    ]
    result = compute(arrivals, intervals=("1m", "5m"))
    one = result.bars[("A", "1m", 0)]
    ohlcv = (one.open, one.high, one.low, one.close, one.volume, one.trade_count)
    assert ohlcv == (11.0, 11.0, 9.0, 9.0, 6, 3)
    assert one.vwap == (10 * 1 + 11 * 3 + 9 * 2) / 6
    five = result.bars[("A", "5m", 0)]
    assert five.trade_count == 4
    assert five.high == 50.0
    assert result.late == [(4, "1m")]


def test_diff_bars_reports_mismatch() -> None:
    result = compute([Arrival(0, "A", True, 0, None, 1.0, 1)], intervals=("1m",))
    actual = {k: {"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "volume": 1.0, "vwap": 1.0,
                  "trade_count": 1} for k in result.bars}
    assert diff_bars(result.bars, actual) == []
    actual[("A", "1m", 0)]["close"] = 2.0
    assert diff_bars(result.bars, actual) == ["bar ('A', '1m', 0) close: expected 1.0, got 2.0"]
