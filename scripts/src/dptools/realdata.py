"""The real tick data sets in `../shared/data` as raw-tick JSON (the contract's "Raw tick").

    uv run python -m dptools.realdata binance --out binance.jsonl
    uv run python -m dptools.realdata lean-equity --symbols ibm,spy --dates 20131007 --out eq.jsonl
    uv run python -m dptools.realdata all --limit 100000 | head

Each output line is one raw-tick JSON object; `dptools.produce replay FILE` sends it keyed
`VENUE:SYMBOL`. Within a data set the ticks come in event-time order (files are merged by `ts`).

Mapping (venues are the reference data's MICs, symbols its `venue_symbol`s):

- Lean equities (AlgoSeek, consolidated tape): venue `XNYS`, symbols `AIG`, `BAC`, `IBM`, `SPY`;
  `ts` ISO-8601 with the New York offset (date of the file + ms after midnight); price / 10000,
  size; a quote carries the one side its row updates (both when both are set); `seq` = row number.
- COMEX gold futures (Lean): venue `XCEC`, symbol `GC` + month code + 2-digit year (`GCZ13`);
  `ts` epoch ms (UTC); price, size = quantity; `seq` = row number in the contract's file.
- OANDA FX (Lean): venue `OANDA`, symbols `EURUSD`, `NZDUSD`; `ts` epoch ms; bid and ask, no sizes.
- Binance: venues `BINANCE` (spot), `BINANCE-USDM`, `BINANCE-COINM`; symbols as Binance spells
  them (`BTCUSDT`, `ETHUSD_PERP`); trades: `ts` = `T` (epoch ms), price `p`, size `q`,
  `trade_id` = `t`; book-ticker quotes: bid `b`, ask `a`, sizes `B`/`A`, `seq` = `u`, `ts` = `T`,
  or for spot (which sends none) the recorder's receive time in epoch ns (about 1.27 s behind
  Binance's clock). Numbers stay the exchange's strings. Depth streams and REST snapshots are skipped.

Rows Lean flags as suspicious and trades with size 0 are skipped unless `--include-invalid` is
given (then the normalization service dead-letters the zero sizes).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import heapq
import io
import json
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

DEFAULT_ROOT = Path(__file__).resolve().parents[4] / "shared" / "data"
NEW_YORK = ZoneInfo("America/New_York")
MONTH_CODES = "FGHJKMNQUVXZ"
BINANCE_VENUES = {"spot": "BINANCE", "usdm": "BINANCE-USDM", "cm": "BINANCE-COINM"}
DATASETS = ("lean-equity", "comex-gold", "oanda-fx", "binance")

RawTick = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Filters:
    """Which part of a data set to read (empty tuples mean everything)."""

    symbols: tuple[str, ...] = ()
    dates: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("trade", "quote")
    include_invalid: bool = False

    def wants(self, symbol: str, date: str, kind: str) -> bool:
        """Whether a file of `symbol` on `date` (YYYYMMDD) holding `kind` ticks is selected."""
        return (
            (not self.symbols or symbol.lower() in self.symbols)
            and (not self.dates or date in self.dates)
            and kind in self.kinds
        )


# --- Lean: equities, gold futures, FX ----------------------------------------------------------


def _csv_rows(zip_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(member name, row) of every CSV inside a Lean zip."""
    with zipfile.ZipFile(zip_path) as archive:
        for name in sorted(archive.namelist()):
            with archive.open(name) as raw:
                yield from ((name, row) for row in csv.reader(io.TextIOWrapper(raw, "ascii")) if row)


def _ny_midnight(date: str) -> datetime:
    return datetime(int(date[:4]), int(date[4:6]), int(date[6:8]), tzinfo=NEW_YORK)


def _ny_iso(midnight: datetime, ms: int) -> str:
    moment = midnight + timedelta(milliseconds=ms)
    # Adding to an aware datetime keeps its offset; re-resolve it for the days clocks change.
    moment = moment.replace(tzinfo=None).replace(tzinfo=NEW_YORK)
    return moment.isoformat(timespec="milliseconds")


def _utc_midnight_ms(date: str) -> int:
    from datetime import UTC

    return int(datetime(int(date[:4]), int(date[4:6]), int(date[6:8]), tzinfo=UTC).timestamp()) * 1000


def lean_equity(root: Path, filters: Filters) -> Iterator[RawTick]:
    """AlgoSeek equity trades and quotes of Lean, all selected files merged by event time."""
    streams = []
    for path in sorted((root / "lean-equity-2013-10").glob("*/*.zip")):
        symbol = path.parent.name
        date, kind = path.stem.split("_")
        if filters.wants(symbol, date, kind):
            streams.append(_equity_file(path, symbol.upper(), date, kind, filters.include_invalid))
    for _, tick in heapq.merge(*streams, key=lambda item: item[0]):
        yield tick


def _equity_file(
    path: Path, symbol: str, date: str, kind: str, include_invalid: bool
) -> Iterator[tuple[int, RawTick]]:
    midnight = _ny_midnight(date)
    base_ms = int(midnight.timestamp()) * 1000
    for seq, (_, row) in enumerate(_csv_rows(path)):
        if row[-1] == "1" and not include_invalid:  # flagged suspicious
            continue
        ms = int(row[0])
        ts = _ny_iso(midnight, ms)
        if kind == "trade":
            size = int(row[2])
            if size <= 0 and not include_invalid:
                continue
            tick: RawTick = {
                "venue": "XNYS",
                "symbol": symbol,
                "type": "trade",
                "ts": ts,
                "price": int(row[1]) / 10_000,
                "size": size,
                "seq": seq,
                "exchange": row[3],
            }
            yield base_ms + ms, tick
            continue
        tick = {"venue": "XNYS", "symbol": symbol, "type": "quote", "ts": ts, "seq": seq}
        bid, bid_size, ask, ask_size = (int(v) for v in row[1:5])
        if bid:
            tick["bid"], tick["bid_size"] = bid / 10_000, bid_size
        if ask:
            tick["ask"], tick["ask_size"] = ask / 10_000, ask_size
        if bid or ask or include_invalid:
            yield base_ms + ms, tick


def gold_symbol(contract_month: str) -> str:
    """`201312` -> `GCZ13`."""
    return f"GC{MONTH_CODES[int(contract_month[4:6]) - 1]}{contract_month[2:4]}"


def comex_gold(root: Path, filters: Filters) -> Iterator[RawTick]:
    """COMEX gold futures trades of Lean (all contract months of a day, merged by time)."""
    if "trade" not in filters.kinds:
        return
    for path in sorted((root / "lean-fx-futures" / "future" / "comex" / "tick" / "gc").glob("*_trade.zip")):
        date = path.stem.split("_")[0]
        if filters.dates and date not in filters.dates:
            continue
        base_ms = _utc_midnight_ms(date)
        per_contract: list[list[RawTick]] = []
        for name, group in _group_by_member(_csv_rows(path)):
            symbol = gold_symbol(name.rsplit("_", 1)[1].split(".")[0])
            if filters.symbols and symbol.lower() not in filters.symbols:
                continue
            ticks = []
            for seq, row in enumerate(group):
                size = int(row[2])
                if (size <= 0 or row[-1] == "1") and not filters.include_invalid:
                    continue
                ticks.append(
                    {
                        "venue": "XCEC",
                        "symbol": symbol,
                        "type": "trade",
                        "ts": base_ms + int(row[0]),
                        "price": float(row[1]),
                        "size": size,
                        "seq": seq,
                    }
                )
            per_contract.append(ticks)
        yield from heapq.merge(*per_contract, key=lambda t: t["ts"])


def _group_by_member(rows: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, list[list[str]]]]:
    current: str | None = None
    group: list[list[str]] = []
    for name, row in rows:
        if name != current:
            if current is not None:
                yield current, group
            current, group = name, []
        group.append(row)
    if current is not None:
        yield current, group


def oanda_fx(root: Path, filters: Filters) -> Iterator[RawTick]:
    """OANDA FX quotes of Lean (bid and ask, no sizes)."""
    if "quote" not in filters.kinds:
        return
    files = sorted((root / "lean-fx-futures" / "forex" / "oanda" / "tick").glob("*/*_quote.zip"))
    streams = []
    for path in files:
        pair, date = path.parent.name, path.stem.split("_")[0]
        if filters.wants(pair, date, "quote"):
            streams.append(_fx_file(path, pair.upper(), _utc_midnight_ms(date)))
    yield from heapq.merge(*streams, key=lambda t: t["ts"])


def _fx_file(path: Path, pair: str, base_ms: int) -> Iterator[RawTick]:
    for _, row in _csv_rows(path):
        yield {
            "venue": "OANDA",
            "symbol": pair,
            "type": "quote",
            "ts": base_ms + int(row[0]),
            "bid": float(row[1]),
            "ask": float(row[2]),
        }


# --- Binance captures --------------------------------------------------------------------------


def binance(root: Path, filters: Filters) -> Iterator[RawTick]:
    """Binance trades and book-ticker quotes of every market, merged by event time."""
    streams = []
    for market, venue in BINANCE_VENUES.items():
        by_symbol: dict[str, list[Path]] = {}
        for path in sorted((root / "binance-2024-08-08" / market).glob("*.gz")):
            name, date = path.stem.rsplit("_", 1)
            if filters.dates and date not in filters.dates:
                continue
            by_symbol.setdefault(name, []).append(path)
        for name, paths in by_symbol.items():
            if filters.symbols and name not in filters.symbols and name.upper() not in filters.symbols:
                continue
            streams.append(_sorted_by_ts(_binance_files(paths, venue, filters)))
    yield from heapq.merge(*streams, key=_ns)


def _binance_files(paths: Sequence[Path], venue: str, filters: Filters) -> Iterator[RawTick]:
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                tick = binance_line(line, venue)
                if tick is not None and tick["type"] in filters.kinds:
                    yield tick


def binance_line(line: str, venue: str) -> RawTick | None:
    """One captured line (`<receive ns> <combined-stream JSON>`) as a raw tick, or None to skip it."""
    received, _, body = line.partition(" ")
    if not received.isdigit() or not body.startswith("{"):
        return None  # the REST depth snapshot opening a file
    message = json.loads(body)
    stream, data = message.get("stream", ""), message.get("data", {})
    if stream.endswith("@trade"):
        return {
            "venue": venue,
            "symbol": data["s"],
            "type": "trade",
            "ts": data["T"],
            "price": data["p"],
            "size": data["q"],
            "trade_id": data["t"],
        }
    if stream.endswith("@bookTicker"):
        return {
            "venue": venue,
            "symbol": data["s"],
            "type": "quote",
            "ts": data.get("T") or int(received),
            "bid": data["b"],
            "bid_size": data["B"],
            "ask": data["a"],
            "ask_size": data["A"],
            "seq": data["u"],
        }
    return None


def _ns(tick: RawTick) -> int:
    """Event time of a tick made by this module, in ns (epoch ms or ns, by magnitude)."""
    ts = int(tick["ts"])
    return ts * 1_000_000 if ts < 10**14 else ts


def _sorted_by_ts(ticks: Iterable[RawTick]) -> Iterator[RawTick]:
    """Event-time order (USD-M events arrive up to tens of ms out of order; a capture is small)."""
    return iter(sorted(ticks, key=_ns))


# --- entry point --------------------------------------------------------------------------------

READERS = {"lean-equity": lean_equity, "comex-gold": comex_gold, "oanda-fx": oanda_fx, "binance": binance}


def read(dataset: str, root: Path = DEFAULT_ROOT, filters: Filters | None = None) -> Iterator[RawTick]:
    """Raw ticks of one data set (`DATASETS`), or of all of them one after the other (`all`)."""
    wanted = DATASETS if dataset == "all" else (dataset,)
    for name in wanted:
        yield from READERS[name](root, filters or Filters())


def write_jsonl(ticks: Iterable[RawTick], out: TextIO, limit: int | None = None) -> int:
    """Write ticks as JSON lines; return how many were written."""
    count = 0
    for tick in ticks:
        if limit is not None and count >= limit:
            break
        out.write(json.dumps(tick, separators=(",", ":")))
        out.write("\n")
        count += 1
    return count


def _csv_arg(text: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in text.split(",") if p.strip())


def main(argv: list[str] | None = None) -> int:
    """Command line: write a data set as raw-tick JSON lines."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=(*DATASETS, "all"))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder of the data sets")
    parser.add_argument("--out", type=Path, help="output file (default: stdout)")
    parser.add_argument("--limit", type=int, help="stop after this many ticks")
    parser.add_argument("--symbols", type=_csv_arg, default=(), help="comma-separated, e.g. ibm,spy,gcz13")
    parser.add_argument("--dates", type=_csv_arg, default=(), help="comma-separated YYYYMMDD")
    parser.add_argument("--kinds", type=_csv_arg, default=("trade", "quote"), help="trade,quote")
    parser.add_argument("--include-invalid", action="store_true", help="keep suspicious rows and zero sizes")
    args = parser.parse_args(argv)
    filters = Filters(args.symbols, args.dates, args.kinds, args.include_invalid)
    ticks = read(args.dataset, args.root, filters)
    if args.out is None:
        count = write_jsonl(ticks, sys.stdout, args.limit)
    else:
        with args.out.open("w", encoding="utf-8") as fh:
            count = write_jsonl(ticks, fh, args.limit)
    print(f"{count} raw ticks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
