"""Fixtures of the enrichment tests: a migrated, seeded PostgreSQL database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from dataproc_shared.migrate import migrate_postgres
from dptools.refdata import load


def _admin_dsn() -> str:
    dsn = os.environ.get("DATA_PROC_POSTGRES_DSN")
    if not dsn:
        raise RuntimeError("DATA_PROC_POSTGRES_DSN is not set: source .stack/env (make up)")
    return dsn


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def with_port(dsn: str, host: str, port: int) -> str:
    """`dsn` pointing at another host and port (same credentials)."""
    parts = urlsplit(dsn)
    creds = parts.netloc.rpartition("@")[0]
    netloc = f"{creds}@{host}:{port}" if creds else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def refdata_dsn() -> AsyncIterator[str]:
    """A fresh database with the reference migrations applied and the seed loaded; dropped after."""
    admin = _admin_dsn()
    name = f"enrich_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin, name)
    try:
        await migrate_postgres(dsn)
        await load(dsn)
        yield dsn
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
