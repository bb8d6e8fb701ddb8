"""Numbered SQL migrations for PostgreSQL and ClickHouse, applied once each, in order.

A migration is a file `NNN_name.sql` in `migrations/postgres/` or `migrations/clickhouse/`. Each one
applied is recorded (version, name, SHA-256 of the file) in a migrations table
(`public.schema_migrations`, `market_data.schema_migrations`). Running again applies only what is
new; a file whose checksum differs from the recorded one is refused (`MigrationError`): an applied
migration never changes, a new file does the change.

ClickHouse files are templates: `{{name}}` is replaced by a value from the runner (e.g.
`{{audit_ttl_days}}`), so one file serves chDB and a server in every environment. The checksum is
taken of the file as written, so a different TTL in another environment is not a "changed" file.

PostgreSQL migrations run each in a transaction with their record, under an advisory lock, so two
runners never apply the same file. ClickHouse has no transactional DDL: its statements are written
`IF NOT EXISTS`, so a run cut short is completed by the next one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dataproc_shared.clickhouse import ClickHouseClient
from dataproc_shared.errors import DataProcError

log = structlog.get_logger(__name__)

_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")
#: Key of the PostgreSQL advisory lock held while migrating.
PG_LOCK_KEY = 0x64617461_70726F63 & 0x7FFFFFFFFFFFFFFF
CLICKHOUSE_DATABASE = "market_data"
#: Folder of the repository's migrations (`<repo>/migrations`).
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "migrations"


class MigrationError(DataProcError):
    """Migrations cannot be applied: bad file names, a changed applied file, a missing value."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text as written."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def filename(self) -> str:
        """`NNN_name.sql`."""
        return f"{self.version:03d}_{self.name}.sql"


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A migration recorded in the migrations table."""

    version: int
    name: str
    checksum: str


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What one run did."""

    target: str
    applied: tuple[str, ...]
    already_applied: tuple[str, ...]

    def summary(self) -> str:
        """One line for people."""
        new = ", ".join(self.applied) if self.applied else "nothing new"
        return f"{self.target}: applied {new}; {len(self.already_applied)} already applied"


def discover(folder: Path) -> list[Migration]:
    """The migrations of `folder`, ordered by version. Refuses stray `.sql` names and duplicate numbers."""
    if not folder.is_dir():
        raise MigrationError(f"no migrations folder {folder}")
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNN_lower_snake.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version:03d} is used by {found[version].filename} too")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def pending(migrations: Sequence[Migration], applied: Sequence[AppliedMigration]) -> list[Migration]:
    """The migrations still to apply, in order.

    Refuses an applied migration whose file changed or vanished.
    """
    by_version = {m.version: m for m in migrations}
    for done in applied:
        current = by_version.get(done.version)
        if current is None:
            raise MigrationError(f"migration {done.version:03d}_{done.name} is applied but its file is gone")
        if current.checksum != done.checksum:
            raise MigrationError(
                f"{current.filename} changed after it was applied (recorded checksum {done.checksum[:12]}, "
                f"file {current.checksum[:12]}); add a new migration instead"
            )
    done_versions = {d.version for d in applied}
    return [m for m in migrations if m.version not in done_versions]


def render(sql: str, values: Mapping[str, Any]) -> str:
    """Replace every `{{name}}` in `sql` by `values[name]`; a name without a value is an error."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise MigrationError(f"migration needs a value for {{{{{name}}}}}")
        return str(values[name])

    return _PLACEHOLDER.sub(substitute, sql)


def split_statements(sql: str) -> list[str]:
    """Split a SQL script on `;` outside quotes and comments; comment-only pieces are dropped."""
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    quote: str | None = None
    while i < n:
        ch = sql[i]
        if quote is not None:
            current.append(ch)
            if ch == "\\" and i + 1 < n:
                current.append(sql[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in ("'", '"', "`"):
            quote = ch
            current.append(ch)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            continue
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        elif ch == ";":
            statements.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    statements.append("".join(current).strip())
    return [s for s in statements if s]


# ---- PostgreSQL -----------------------------------------------------------------------------------

_PG_TABLE = """
CREATE TABLE IF NOT EXISTS public.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate_postgres(dsn: str, folder: Path | None = None) -> MigrationReport:
    """Apply the new PostgreSQL migrations of `folder` (default `migrations/postgres`) to `dsn`."""
    import asyncpg

    migrations = discover(folder or DEFAULT_ROOT / "postgres")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", PG_LOCK_KEY)
        try:
            await conn.execute(_PG_TABLE)
            rows = await conn.fetch("SELECT version, name, checksum FROM public.schema_migrations ORDER BY 1")
            applied = [AppliedMigration(r["version"], r["name"], r["checksum"]) for r in rows]
            todo = pending(migrations, applied)
            for migration in todo:
                log.info("applying migration", target="postgres", migration=migration.filename)
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO public.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum,
                    )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", PG_LOCK_KEY)
    finally:
        await conn.close()
    return MigrationReport("postgres", tuple(m.filename for m in todo), tuple(_names(applied)))


def _names(applied: Sequence[AppliedMigration]) -> list[str]:
    return [f"{a.version:03d}_{a.name}.sql" for a in applied]


# ---- ClickHouse -----------------------------------------------------------------------------------

_CH_TABLE = f"""
CREATE TABLE IF NOT EXISTS {CLICKHOUSE_DATABASE}.schema_migrations (
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree(applied_at) ORDER BY version
"""


def clickhouse_values(*, audit_ttl_days: int = 90) -> dict[str, Any]:
    """The template values of the ClickHouse migrations."""
    return {"database": CLICKHOUSE_DATABASE, "audit_ttl_days": int(audit_ttl_days)}


def migrate_clickhouse(client: ClickHouseClient, folder: Path | None = None,
                       values: Mapping[str, Any] | None = None) -> MigrationReport:
    """Apply the new ClickHouse migrations of `folder` (default `migrations/clickhouse`) through `client`."""
    migrations = discover(folder or DEFAULT_ROOT / "clickhouse")
    template_values = {**clickhouse_values(), **(values or {})}
    client.command(f"CREATE DATABASE IF NOT EXISTS {CLICKHOUSE_DATABASE}")
    client.command(_CH_TABLE)
    rows = client.query(
        f"SELECT version, name, checksum FROM {CLICKHOUSE_DATABASE}.schema_migrations FINAL "  # noqa: S608
        "ORDER BY version"
    ).rows
    applied = [AppliedMigration(int(v), str(n), str(c)) for v, n, c in rows]
    todo = pending(migrations, applied)
    # Render everything first: a missing value fails before any statement runs.
    rendered = [(m, split_statements(render(m.sql, template_values))) for m in todo]
    for migration, statements in rendered:
        log.info("applying migration", target="clickhouse", migration=migration.filename,
                 statements=len(statements))
        for statement in statements:
            client.command(statement)
        client.insert(f"{CLICKHOUSE_DATABASE}.schema_migrations",
                      [[migration.version, migration.name, migration.checksum]],
                      ["version", "name", "checksum"])
    return MigrationReport("clickhouse", tuple(m.filename for m in todo), tuple(_names(applied)))
