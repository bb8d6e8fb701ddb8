"""Fixtures of the enrichment tests: a migrated, seeded PostgreSQL database per test."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest
from dptools.refdata import load


def with_port(dsn: str, host: str, port: int) -> str:
    """`dsn` pointing at another host and port (same credentials and database)."""
    parts = urlsplit(dsn)
    creds = parts.netloc.rpartition("@")[0]
    netloc = f"{creds}@{host}:{port}" if creds else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def refdata_dsn(pg_database: str) -> str:
    """A fresh database (`pg_database`: migrations applied, dropped after) with the seed loaded."""
    await load(pg_database)
    return pg_database
