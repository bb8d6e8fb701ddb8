"""Migrations: the pure planning logic, and runs against real PostgreSQL and chDB (twice, same result)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest
from dataproc_shared.clickhouse import ChdbClickHouse
from dataproc_shared.migrate import (
    DEFAULT_ROOT,
    AppliedMigration,
    Migration,
    MigrationError,
    discover,
    migrate_clickhouse,
    migrate_postgres,
    pending,
    render,
    split_statements,
)


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# ---- pure ----------------------------------------------------------------------------------------


def test_discover_orders_by_version(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"010_c.sql": "c", "002_b.sql": "b", "001_a.sql": "a"})
    assert [m.filename for m in discover(folder)] == ["001_a.sql", "002_b.sql", "010_c.sql"]


@pytest.mark.parametrize("name", ["1_a.sql", "001-a.sql", "001_A.sql"])
def test_discover_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(MigrationError, match="NNN_lower_snake"):
        discover(_write(tmp_path, {name: "x"}))


def test_discover_refuses_duplicate_versions(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="used by"):
        discover(_write(tmp_path, {"001_a.sql": "a", "001_b.sql": "b"}))


def test_pending_skips_applied_and_refuses_changed_or_missing() -> None:
    a, b = Migration(1, "a", "select 1"), Migration(2, "b", "select 2")
    assert pending([a, b], [AppliedMigration(1, "a", a.checksum)]) == [b]
    assert pending([a, b], []) == [a, b]
    with pytest.raises(MigrationError, match="changed after it was applied"):
        pending([a, b], [AppliedMigration(1, "a", "0" * 64)])
    with pytest.raises(MigrationError, match="file is gone"):
        pending([b], [AppliedMigration(1, "a", a.checksum)])


def test_render_substitutes_and_refuses_missing_values() -> None:
    rendered = render("TTL x + INTERVAL {{ audit_ttl_days }} DAY", {"audit_ttl_days": 7})
    assert rendered == "TTL x + INTERVAL 7 DAY"
    with pytest.raises(MigrationError, match="audit_ttl_days"):
        render("{{audit_ttl_days}}", {})


def test_split_statements_respects_quotes_and_comments() -> None:
    sql = "-- a; comment\nCREATE TABLE a (s String DEFAULT ';');\n/* b; */ SELECT 'x\\';y';\n;"
    assert split_statements(sql) == ["CREATE TABLE a (s String DEFAULT ';')", "SELECT 'x\\';y'"]


def test_repository_migrations_are_well_formed() -> None:
    pg = [m.filename for m in discover(DEFAULT_ROOT / "postgres")]
    ch = [m.filename for m in discover(DEFAULT_ROOT / "clickhouse")]
    assert pg[0] == "001_reference_tables.sql"
    assert ch[:3] == ["001_create_database.sql", "002_bars.sql", "003_late_trades.sql"]
    assert "006_audit_events.sql" in ch


# ---- PostgreSQL ----------------------------------------------------------------------------------


async def _pg_state(dsn: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        recorded = [(r["version"], r["name"], r["checksum"])
                    for r in await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")]
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        return recorded, tables
    finally:
        await conn.close()


@pytest.mark.integration
async def test_postgres_migrations_apply_once(pg_dsn_factory) -> None:
    dsn = pg_dsn_factory(migrate=False)
    first = await migrate_postgres(dsn)
    assert first.applied[0] == "001_reference_tables.sql"
    state = await _pg_state(dsn)
    second = await migrate_postgres(dsn)
    assert second.applied == ()
    assert len(second.already_applied) == len(first.applied)
    assert await _pg_state(dsn) == state
    assert {"venues", "instruments", "schema_migrations"} <= set(state[1])


@pytest.mark.integration
async def test_reference_tables_follow_the_contract(pg_database: str) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("INSERT INTO venues (mic, name, timezone, active) VALUES ('XNYM', 'NYMEX', "
                           "'America/New_York', true)")
        await conn.execute(
            "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency, "
            "tick_size, multiplier, active) VALUES ('CL-2026-12', 'XNYM', 'CLZ6', 'CL', 'commodity', 'USD', "
            "0.01, 1000, true)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency) "
                "VALUES ('other', 'XNYM', 'CLZ6', 'CL', 'commodity', 'USD')")
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency) "
                "VALUES ('x', 'NOPE', 'X', 'X', 'equity', 'USD')")
        before = await conn.fetchval("SELECT updated_at FROM instruments WHERE instrument_id = 'CL-2026-12'")
        await asyncio.sleep(0.01)
        await conn.execute("UPDATE instruments SET active = false WHERE instrument_id = 'CL-2026-12'")
        after = await conn.fetchval("SELECT updated_at FROM instruments WHERE instrument_id = 'CL-2026-12'")
        assert after > before
    finally:
        await conn.close()


@pytest.mark.integration
async def test_postgres_refuses_a_changed_applied_file(pg_dsn_factory, tmp_path: Path) -> None:
    dsn = pg_dsn_factory(migrate=False)
    folder = _write(tmp_path / "pg", {"001_a.sql": "CREATE TABLE a (x int);"})
    assert (await migrate_postgres(dsn, folder)).applied == ("001_a.sql",)
    (folder / "001_a.sql").write_text("CREATE TABLE a (x bigint);", encoding="utf-8")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate_postgres(dsn, folder)


@pytest.mark.integration
async def test_postgres_failed_migration_is_not_recorded(pg_dsn_factory, tmp_path: Path) -> None:
    dsn = pg_dsn_factory(migrate=False)
    folder = _write(tmp_path / "pg", {"001_a.sql": "CREATE TABLE a (x int);",
                                      "002_b.sql": "CREATE TABLE b (x int); SELECT no_such_function();"})
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate_postgres(dsn, folder)
    recorded, tables = await _pg_state(dsn)
    assert [r[1] for r in recorded] == ["a"]
    assert "b" not in tables
    (folder / "002_b.sql").write_text("CREATE TABLE b (x int);", encoding="utf-8")
    assert (await migrate_postgres(dsn, folder)).applied == ("002_b.sql",)


# ---- ClickHouse (chDB) ---------------------------------------------------------------------------


Rows = tuple[tuple[object, ...], ...]
TOKENS = ("0:0-1", "0:0-2")


def _ch_state(client: ChdbClickHouse) -> tuple[Rows, Rows]:
    recorded = client.query("SELECT version, name, checksum FROM market_data.schema_migrations FINAL "
                            "ORDER BY version").rows
    tables = client.query("SELECT name, engine, create_table_query FROM system.tables "
                          "WHERE database = 'market_data' ORDER BY name").rows
    return recorded, tables


def test_clickhouse_migrations_apply_once(chdb_path: str) -> None:
    client = ChdbClickHouse(chdb_path)
    try:
        first = migrate_clickhouse(client, values={"audit_ttl_days": 7})
        assert first.applied == ("001_create_database.sql", "002_bars.sql", "003_late_trades.sql",
                                 "006_audit_events.sql", "007_packed_small_parts.sql")
        state = _ch_state(client)
        second = migrate_clickhouse(client, values={"audit_ttl_days": 7})
        assert second.applied == ()
        assert _ch_state(client) == state
        tables = {row[0]: (row[1], row[2]) for row in state[1]}
        assert tables["bars"][0] == "ReplacingMergeTree"
        assert "ORDER BY (instrument_id, interval, window_start)" in str(tables["bars"][1])
        assert "toIntervalDay(7)" in str(tables["audit_events"][1])
        for table in ("bars", "late_trades", "audit_events"):
            assert "min_bytes_for_full_part_storage = 1048576" in str(tables[table][1])
    finally:
        client.close()


def test_clickhouse_refuses_a_changed_applied_file(chdb_path: str, tmp_path: Path) -> None:
    folder = tmp_path / "ch"
    shutil.copytree(DEFAULT_ROOT / "clickhouse", folder)
    client = ChdbClickHouse(chdb_path)
    try:
        migrate_clickhouse(client, folder)
        path = folder / "002_bars.sql"
        path.write_text(path.read_text(encoding="utf-8") + "\n-- edited\n", encoding="utf-8")
        with pytest.raises(MigrationError, match=r"002_bars\.sql changed"):
            migrate_clickhouse(client, folder)
    finally:
        client.close()


def test_bars_table_shows_one_row_per_bar_with_final(chdb_client: ChdbClickHouse) -> None:
    import datetime as dt

    start = dt.datetime(2026, 11, 23, 14, 30, tzinfo=dt.UTC)
    columns = ["instrument_id", "interval", "window_start", "window_end", "venue", "symbol", "currency",
               "open", "high", "low", "close", "volume", "vwap", "trade_count", "is_final", "version",
               "first_trade_ts", "last_trade_ts", "source_partition", "offset_from", "offset_to"]

    def bar(version: int, close: float, final: int) -> list[object]:
        return ["CL-2026-12", "1m", start, start + dt.timedelta(minutes=1), "XNYM", "CLZ6", "USD",
                71.0, 72.0, 70.5, close, 10.0, 71.2, version, final, version, start, start, 0, 0, version]

    chdb_client.insert("market_data.bars", [bar(1, 71.5, 0)], columns, dedup_token=TOKENS[0])
    chdb_client.insert("market_data.bars", [bar(2, 71.7, 1)], columns, dedup_token=TOKENS[1])
    chdb_client.insert("market_data.bars", [bar(2, 71.7, 1)], columns, dedup_token=TOKENS[1])
    assert chdb_client.query("SELECT count() FROM market_data.bars").scalar() == 2
    rows = chdb_client.query("SELECT close, is_final, version FROM market_data.bars FINAL").rows
    assert rows == ((71.7, 1, 2),)
