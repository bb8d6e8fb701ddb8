"""The reference seed set and its loader (`python -m dptools.refdata`)."""

from __future__ import annotations

import asyncio
import csv
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from dptools.refdata import SEED_DIR, SeedError, load, main, read_seed

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data next to the repository
MONTH_CODES = "FGHJKMNQUVXZ"


def _seed_rows() -> list[list[str]]:
    with (SEED_DIR / "instruments.csv").open(newline="") as fh:
        return list(csv.reader(fh))


def test_seed_is_valid_and_varied() -> None:
    seed = read_seed()
    assert len(seed.instruments) >= 250
    assert len(seed.venues) >= 10
    classes = Counter(i.asset_class for i in seed.instruments)
    assert {"equity", "etf", "future", "fx", "crypto", "crypto_perpetual", "power"} <= set(classes)
    assert any(not i.active for i in seed.instruments)
    assert any(not v.active for v in seed.venues)
    assert all(len(i.currency) == 3 and i.currency == i.currency.upper() for i in seed.instruments)
    assert all(i.venue_symbol == i.venue_symbol.upper().strip() for i in seed.instruments)


def test_seed_covers_the_real_data_instruments() -> None:
    listings = {(i.venue, i.venue_symbol) for i in read_seed().instruments if i.active}
    expected = {("XNYS", s) for s in ("AIG", "BAC", "IBM", "SPY")}
    expected |= {("OANDA", "EURUSD"), ("OANDA", "NZDUSD")}
    expected |= {("BINANCE", "BTCUSDT"), ("BINANCE", "ETHUSDT")}
    expected |= {("BINANCE-USDM", "BTCUSDT"), ("BINANCE-USDM", "ETHUSDT")}
    expected |= {("BINANCE-COINM", "BTCUSD_PERP"), ("BINANCE-COINM", "ETHUSD_PERP")}
    gc_dir = DATA / "lean-fx-futures" / "future" / "comex" / "tick" / "gc"
    if gc_dir.is_dir():  # the contract months, as named by the data files (..._YYYYMM.csv)
        for archive in gc_dir.glob("*_trade.zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    yyyymm = name.rsplit("_", 1)[1].removesuffix(".csv")
                    year, month = int(yyyymm[:4]), int(yyyymm[4:])
                    expected.add(("XCEC", f"GC{MONTH_CODES[month - 1]}{year % 100:02d}"))
    else:
        expected |= {("XCEC", "GCZ13"), ("XCEC", "GCG14")}
    assert expected <= listings, sorted(expected - listings)


def test_invalid_seed_is_refused(tmp_path: Path) -> None:
    shutil.copy(SEED_DIR / "venues.csv", tmp_path / "venues.csv")
    rows = _seed_rows()
    rows.append(["XNYS.DUP", "XNYS", "IBM", "IBM", "equity", "USD", "0.01", "1", "true"])
    with (tmp_path / "instruments.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(SeedError, match="duplicate"):
        read_seed(tmp_path)
    assert main(["check", "--seed-dir", str(tmp_path)]) == 1


@pytest.mark.integration
def test_load_is_idempotent_and_applies_changes(pg_database: str, tmp_path: Path) -> None:
    first = asyncio.run(load(pg_database))
    assert (first.venues_inserted, first.instruments_inserted) == (13, len(read_seed().instruments))
    again = asyncio.run(load(pg_database))
    assert again.instruments_inserted == again.instruments_updated == 0
    assert again.instruments_unchanged == len(read_seed().instruments)

    # an edited seed: one changed row, one new row
    shutil.copy(SEED_DIR / "venues.csv", tmp_path / "venues.csv")
    rows = _seed_rows()
    for row in rows:
        if row[0] == "XNYS.IBM":
            row[6] = "0.05"
    rows.append(["XNYS.ZZZ", "XNYS", "ZZZ", "ZZZ", "equity", "USD", "0.01", "1", "true"])
    with (tmp_path / "instruments.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    edited = asyncio.run(load(pg_database, tmp_path))
    assert (edited.instruments_inserted, edited.instruments_updated) == (1, 1)

    async def read() -> tuple[object, int]:
        conn = await asyncpg.connect(pg_database)
        try:
            tick = await conn.fetchval("SELECT tick_size FROM instruments WHERE instrument_id = 'XNYS.IBM'")
            count = await conn.fetchval("SELECT count(*) FROM instruments")
            return tick, int(count)
        finally:
            await conn.close()

    tick, count = asyncio.run(read())
    assert str(tick) == "0.05"
    assert count == len(read_seed().instruments) + 1


@pytest.mark.integration
def test_cli_load_never_prints_the_dsn(
    pg_database: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATA_PROC_POSTGRES_DSN", pg_database)
    assert main(["load"]) == 0
    out = capsys.readouterr().out
    assert "instruments: " in out
    assert pg_database not in out
    assert "@" not in out


def test_cli_without_dsn_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DATA_PROC_POSTGRES_DSN", raising=False)
    assert main(["load"]) == 2
    assert "DSN" in capsys.readouterr().err
