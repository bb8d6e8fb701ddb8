"""Apply the numbered SQL migrations: `python -m dptools.migrate [postgres|clickhouse|all]`.

Settings come from the environment (`DATA_PROC_POSTGRES_DSN`, `DATA_PROC_CLICKHOUSE_URL`,
`DATA_PROC_AUDIT_TTL_DAYS`, ...; `source .stack/env` for the local stack). Safe to re-run: only files
not yet recorded are applied; an applied file that changed is refused (exit status 1).
With the embedded engine (chDB) the folder must not be open in another process (e.g. a running
aggregation service, which applies the ClickHouse migrations itself at start).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dataproc_shared.clickhouse import connect
from dataproc_shared.config import Settings, load_settings
from dataproc_shared.errors import DataProcError
from dataproc_shared.logging import configure_logging
from dataproc_shared.migrate import (
    DEFAULT_ROOT,
    MigrationReport,
    clickhouse_values,
    migrate_clickhouse,
    migrate_postgres,
)


def run(target: str, settings: Settings, root: Path = DEFAULT_ROOT) -> list[MigrationReport]:
    """Apply the migrations of `target` (`postgres`, `clickhouse` or `all`) with `settings`."""
    reports: list[MigrationReport] = []
    if target in ("postgres", "all"):
        if settings.postgres_dsn is None:
            raise DataProcError("DATA_PROC_POSTGRES_DSN is not set")
        dsn = settings.postgres_dsn.get_secret_value()
        reports.append(asyncio.run(migrate_postgres(dsn, root / "postgres")))
    if target in ("clickhouse", "all"):
        password = settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
        client = connect(settings.clickhouse_url, username=settings.clickhouse_user, password=password)
        try:
            values = clickhouse_values(audit_ttl_days=settings.audit_ttl_days)
            reports.append(migrate_clickhouse(client, root / "clickhouse", values))
        finally:
            client.close()
    return reports


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.migrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="all", choices=["postgres", "clickhouse", "all"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_ROOT,
                        help="migrations folder (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(Settings, service="migrate")
        configure_logging("migrate", env=settings.env, level=settings.log_level)
        for report in run(args.target, settings, args.dir):
            print(report.summary())
    except DataProcError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
