"""Reference data: load the seed venues and instruments into PostgreSQL, idempotently.

    uv run python -m dptools.refdata load [--dsn DSN] [--seed-dir DIR]
    uv run python -m dptools.refdata check [--seed-dir DIR]

`load` upserts every row of `seed/venues.csv` and `seed/instruments.csv` (venues first) in one
transaction: new rows are inserted, changed rows updated, identical rows left alone, so running it
twice changes nothing and announces nothing. Rows that are in the database but not in the seed are
kept (they may have been added by an operator). The DSN comes from `--dsn` or `DATA_PROC_POSTGRES_DSN`
and is never printed. The tables come from `migrations/postgres/` (they must exist).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import asyncpg

SEED_DIR = Path(__file__).parent / "seed"
_BOOL = {"true": True, "false": False, "t": True, "f": False, "1": True, "0": False}


class SeedError(ValueError):
    """The seed files are not valid."""


@dataclass(frozen=True, slots=True)
class SeedVenue:
    """One row of `seed/venues.csv`."""

    mic: str
    name: str
    timezone: str
    active: bool


@dataclass(frozen=True, slots=True)
class SeedInstrument:
    """One row of `seed/instruments.csv`."""

    instrument_id: str
    venue: str
    venue_symbol: str
    symbol: str
    asset_class: str
    currency: str
    tick_size: Decimal | None
    multiplier: Decimal | None
    active: bool


@dataclass(frozen=True, slots=True)
class Seed:
    """The whole seed set."""

    venues: tuple[SeedVenue, ...]
    instruments: tuple[SeedInstrument, ...]


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What one `load` did, per table: rows inserted, updated and left unchanged."""

    venues_inserted: int
    venues_updated: int
    venues_unchanged: int
    instruments_inserted: int
    instruments_updated: int
    instruments_unchanged: int


def _bool(value: str, where: str) -> bool:
    try:
        return _BOOL[value.strip().lower()]
    except KeyError:
        raise SeedError(f"{where}: not a boolean: {value!r}") from None


def _decimal(value: str, where: str) -> Decimal | None:
    if not value.strip():
        return None
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise SeedError(f"{where}: not a number: {value!r}") from None
    if not number.is_finite() or number <= 0:
        raise SeedError(f"{where}: must be a positive number: {value!r}")
    return number


def _rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if list(reader.fieldnames or ()) != list(columns):
            raise SeedError(f"{path.name}: header must be {','.join(columns)}")
        return [(n, row) for n, row in enumerate(reader, start=2)]


def read_seed(seed_dir: Path = SEED_DIR) -> Seed:
    """Read and validate the seed files (unique keys and listings, known venues, 3-letter currencies)."""
    venues: list[SeedVenue] = []
    for n, row in _rows(seed_dir / "venues.csv", ("mic", "name", "timezone", "active")):
        where = f"venues.csv:{n}"
        venues.append(SeedVenue(row["mic"].strip(), row["name"].strip(), row["timezone"].strip(),
                                _bool(row["active"], where)))
    instruments: list[SeedInstrument] = []
    columns = ("instrument_id", "venue", "venue_symbol", "symbol", "asset_class", "currency",
               "tick_size", "multiplier", "active")
    for n, row in _rows(seed_dir / "instruments.csv", columns):
        where = f"instruments.csv:{n}"
        currency = row["currency"].strip()
        if len(currency) != 3:
            raise SeedError(f"{where}: currency must have 3 letters: {currency!r}")
        instruments.append(SeedInstrument(
            instrument_id=row["instrument_id"].strip(),
            venue=row["venue"].strip(),
            venue_symbol=row["venue_symbol"].strip(),
            symbol=row["symbol"].strip(),
            asset_class=row["asset_class"].strip(),
            currency=currency,
            tick_size=_decimal(row["tick_size"], where),
            multiplier=_decimal(row["multiplier"], where),
            active=_bool(row["active"], where),
        ))
    mics = [v.mic for v in venues]
    if len(set(mics)) != len(mics):
        raise SeedError("venues.csv: duplicate mic")
    if len({i.instrument_id for i in instruments}) != len(instruments):
        raise SeedError("instruments.csv: duplicate instrument_id")
    if len({(i.venue, i.venue_symbol) for i in instruments}) != len(instruments):
        raise SeedError("instruments.csv: duplicate (venue, venue_symbol)")
    unknown = sorted({i.venue for i in instruments} - set(mics))
    if unknown:
        raise SeedError(f"instruments.csv: unknown venues {unknown}")
    return Seed(tuple(venues), tuple(instruments))


_UPSERT_VENUES = """
INSERT INTO venues AS t (mic, name, timezone, active)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[])
ON CONFLICT (mic) DO UPDATE
    SET name = EXCLUDED.name, timezone = EXCLUDED.timezone, active = EXCLUDED.active
    WHERE (t.name, t.timezone, t.active) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.timezone, EXCLUDED.active)
RETURNING (xmax = 0) AS inserted
"""

_UPSERT_INSTRUMENTS = """
INSERT INTO instruments AS t (instrument_id, venue, venue_symbol, symbol, asset_class, currency,
                              tick_size, multiplier, active)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::numeric[], $8::numeric[], $9::bool[])
ON CONFLICT (instrument_id) DO UPDATE
    SET venue = EXCLUDED.venue, venue_symbol = EXCLUDED.venue_symbol, symbol = EXCLUDED.symbol,
        asset_class = EXCLUDED.asset_class, currency = EXCLUDED.currency,
        tick_size = EXCLUDED.tick_size, multiplier = EXCLUDED.multiplier, active = EXCLUDED.active
    WHERE (t.venue, t.venue_symbol, t.symbol, t.asset_class, t.currency, t.tick_size, t.multiplier,
           t.active)
          IS DISTINCT FROM
          (EXCLUDED.venue, EXCLUDED.venue_symbol, EXCLUDED.symbol, EXCLUDED.asset_class,
           EXCLUDED.currency, EXCLUDED.tick_size, EXCLUDED.multiplier, EXCLUDED.active)
RETURNING (xmax = 0) AS inserted
"""


async def upsert_seed(conn: asyncpg.Connection, seed: Seed) -> LoadReport:
    """Upsert `seed` over `conn` in one transaction; return what changed."""
    async with conn.transaction():
        v = seed.venues
        venue_rows = await conn.fetch(
            _UPSERT_VENUES,
            [x.mic for x in v], [x.name for x in v], [x.timezone for x in v], [x.active for x in v],
        )
        i = seed.instruments
        instrument_rows = await conn.fetch(
            _UPSERT_INSTRUMENTS,
            [x.instrument_id for x in i], [x.venue for x in i], [x.venue_symbol for x in i],
            [x.symbol for x in i], [x.asset_class for x in i], [x.currency for x in i],
            [x.tick_size for x in i], [x.multiplier for x in i], [x.active for x in i],
        )
    vi = sum(1 for r in venue_rows if r["inserted"])
    ii = sum(1 for r in instrument_rows if r["inserted"])
    return LoadReport(
        venues_inserted=vi,
        venues_updated=len(venue_rows) - vi,
        venues_unchanged=len(v) - len(venue_rows),
        instruments_inserted=ii,
        instruments_updated=len(instrument_rows) - ii,
        instruments_unchanged=len(i) - len(instrument_rows),
    )


async def load(dsn: str, seed_dir: Path = SEED_DIR) -> LoadReport:
    """Read the seed from `seed_dir` and upsert it into the database at `dsn`."""
    seed = read_seed(seed_dir)
    conn = await asyncpg.connect(dsn)
    try:
        return await upsert_seed(conn, seed)
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.refdata", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load_cmd = sub.add_parser("load", help="upsert the seed venues and instruments")
    load_cmd.add_argument("--dsn", help="PostgreSQL DSN (default: $DATA_PROC_POSTGRES_DSN)")
    load_cmd.add_argument("--seed-dir", type=Path, default=SEED_DIR)
    check_cmd = sub.add_parser("check", help="validate the seed files only")
    check_cmd.add_argument("--seed-dir", type=Path, default=SEED_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            seed = read_seed(args.seed_dir)
            print(f"seed ok: {len(seed.venues)} venues, {len(seed.instruments)} instruments")
            return 0
        dsn = args.dsn or os.environ.get("DATA_PROC_POSTGRES_DSN")
        if not dsn:
            print("no DSN: pass --dsn or set DATA_PROC_POSTGRES_DSN", file=sys.stderr)
            return 2
        report = asyncio.run(load(dsn, args.seed_dir))
    except SeedError as exc:
        print(f"invalid seed: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"load failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(
        f"venues: {report.venues_inserted} inserted, {report.venues_updated} updated, "
        f"{report.venues_unchanged} unchanged; instruments: {report.instruments_inserted} inserted, "
        f"{report.instruments_updated} updated, {report.instruments_unchanged} unchanged"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
