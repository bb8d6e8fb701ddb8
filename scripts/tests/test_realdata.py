"""The real data sets map to raw ticks of the contract (small slices, read from ../shared/data)."""

from __future__ import annotations

import io
import itertools
import json

import pytest
from dptools.realdata import DATASETS, Filters, binance_line, gold_symbol, read, write_jsonl

VENUES = {
    "lean-equity": {"XNYS"},
    "comex-gold": {"XCEC"},
    "oanda-fx": {"OANDA"},
    "binance": {"BINANCE", "BINANCE-USDM", "BINANCE-COINM"},
}


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_slices_are_raw_ticks_in_time_order(dataset: str) -> None:
    ticks = list(itertools.islice(read(dataset), 300))
    assert len(ticks) == 300
    assert {t["venue"] for t in ticks} <= VENUES[dataset]
    for tick in ticks:
        assert tick["type"] in ("trade", "quote")
        assert tick["symbol"] == tick["symbol"].upper()
        if tick["type"] == "trade":
            assert float(tick["price"]) > 0
            assert float(tick["size"]) > 0
        else:
            assert "bid" in tick or "ask" in tick
    if dataset != "lean-equity":  # equities carry ISO strings, ordered as the merge key
        stamps = [int(t["ts"]) * (1 if int(t["ts"]) > 10**14 else 1_000_000) for t in ticks]
        assert stamps == sorted(stamps)


def test_equity_mapping() -> None:
    filters = Filters(symbols=("ibm",), dates=("20131008",), kinds=("trade",))
    first = next(read("lean-equity", filters=filters))
    assert first["venue"] == "XNYS"
    assert first["symbol"] == "IBM"
    assert first["ts"].startswith("2013-10-08T")
    assert first["ts"].endswith("-04:00")
    assert 100 < first["price"] < 300  # 1/10000 dollars -> dollars


def test_equity_quotes_carry_one_side() -> None:
    quotes = list(
        itertools.islice(read("lean-equity", filters=Filters(symbols=("aig",), kinds=("quote",))), 50)
    )
    assert all(("bid" in q) != ("ask" in q) or ("bid" in q and "ask" in q) for q in quotes)
    assert any("bid" in q and "ask" not in q for q in quotes)


def test_gold_symbols() -> None:
    assert gold_symbol("201312") == "GCZ13"
    assert gold_symbol("201402") == "GCG14"
    assert gold_symbol("201510") == "GCV15"
    symbols = {t["symbol"] for t in itertools.islice(read("comex-gold"), 5000)}
    assert "GCZ13" in symbols


def test_binance_lines() -> None:
    trade = (
        '1723161254087896568 {"stream":"btcusdt@trade","data":{"e":"trade","E":1723161255343,"s":"BTCUSDT",'
        '"t":3735683259,"p":"61837.63000000","q":"0.02000000","T":1723161255342,"m":true,"M":true}}'
    )
    assert binance_line(trade, "BINANCE") == {
        "venue": "BINANCE",
        "symbol": "BTCUSDT",
        "type": "trade",
        "ts": 1723161255342,
        "price": "61837.63000000",
        "size": "0.02000000",
        "trade_id": 3735683259,
    }
    spot_quote = (
        '1723161254087891268 {"stream":"btcusdt@bookTicker","data":{"u":50093239212,"s":"BTCUSDT",'
        '"b":"61837.63000000","B":"3.78826000","a":"61837.64000000","A":"1.54698000"}}'
    )
    tick = binance_line(spot_quote, "BINANCE")
    assert tick is not None
    assert tick["ts"] == 1723161254087891268
    assert tick["seq"] == 50093239212
    assert binance_line('{"lastUpdateId": 1, "bids": []}', "BINANCE") is None
    depth = '1 {"stream":"btcusdt@depth@100ms","data":{}}'
    assert binance_line(depth, "BINANCE") is None


def test_write_jsonl_limit() -> None:
    out = io.StringIO()
    assert write_jsonl(read("oanda-fx"), out, limit=5) == 5
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert json.loads(lines[0])["venue"] == "OANDA"
