"""The reference store against the real PostgreSQL: load, live changes, connection loss and recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from dptools.netproxy import NetProxy
from enrichment.refstore import ReferenceStore, StoreOptions
from enrichment.transform import AppliedChange, ChangeOp, ReferenceCache, Resolution

from .conftest import with_port

pytestmark = pytest.mark.integration

FAST = StoreOptions(refresh_interval_s=30, ping_interval_s=0.2, backoff_initial_s=0.05, backoff_max_s=0.5)


async def _until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_loads_seed_and_applies_live_changes(refdata_dsn: str) -> None:
    seen: list[tuple[AppliedChange, str]] = []
    cache = ReferenceCache()
    store = ReferenceStore(
        refdata_dsn, cache, options=FAST, on_changes=lambda cs, src: seen.extend((c, src) for c in cs)
    )
    async with store:
        assert await store.wait_loaded(10)
        assert store.current
        assert cache.instrument_count == 299
        assert cache.venue_count == 13
        assert cache.lookup("XCEC", "GCZ13").resolution is Resolution.FOUND
        assert cache.lookup("XNYS", "TWTR").resolution is Resolution.INACTIVE
        assert cache.lookup("XCHI", "ABT").resolution is Resolution.INACTIVE  # venue closed
        assert {src for _, src in seen} == {"initial"}
        seen.clear()

        conn = await asyncpg.connect(refdata_dsn)
        try:
            await conn.execute("UPDATE instruments SET tick_size = 0.05 WHERE instrument_id = 'XNYS.IBM'")
            await _until(lambda: (cache.instrument("XNYS.IBM") or _none()).tick_size == 0.05)
            await conn.execute("UPDATE instruments SET active = false WHERE instrument_id = 'XNYS.AIG'")
            await _until(lambda: cache.lookup("XNYS", "AIG").resolution is Resolution.INACTIVE)
            await conn.execute(
                "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency,"
                " tick_size, multiplier, active) VALUES ('XNYS.NEW', 'XNYS', 'NEW', 'NEW', 'equity', 'USD',"
                " 0.01, 1, true)"
            )
            await _until(lambda: cache.lookup("XNYS", "NEW").resolution is Resolution.FOUND)
            await conn.execute("DELETE FROM instruments WHERE instrument_id = 'XNYS.NEW'")
            await _until(lambda: cache.lookup("XNYS", "NEW").resolution is Resolution.UNKNOWN)
            await conn.execute("UPDATE venues SET timezone = 'America/Chicago' WHERE mic = 'XNYS'")
            await _until(lambda: (cache.venue("XNYS") or _none()).timezone == "America/Chicago")
            # an update that changes nothing is not announced
            await conn.execute("UPDATE instruments SET active = false WHERE instrument_id = 'XNYS.AIG'")
        finally:
            await conn.close()
        await asyncio.sleep(0.3)
        ops = [(c.table.value, c.op, c.key) for c, _ in seen]
        assert ops == [
            ("instruments", ChangeOp.UPDATE, "XNYS.IBM"),
            ("instruments", ChangeOp.DEACTIVATE, "XNYS.AIG"),
            ("instruments", ChangeOp.INSERT, "XNYS.NEW"),
            ("instruments", ChangeOp.DELETE, "XNYS.NEW"),
            ("venues", ChangeOp.UPDATE, "XNYS"),
        ]
        assert {src for _, src in seen} == {"notify"}


async def test_connection_loss_serves_cache_and_catches_up_on_reconnect(refdata_dsn: str) -> None:
    target = urlsplit(refdata_dsn)
    proxy = await asyncio.to_thread(NetProxy(target.hostname or "127.0.0.1", target.port or 5432).start)
    seen: list[tuple[AppliedChange, str]] = []
    cache = ReferenceCache()
    store = ReferenceStore(
        with_port(refdata_dsn, "127.0.0.1", proxy.port),
        cache,
        options=FAST,
        on_changes=lambda cs, src: seen.extend((c, src) for c in cs),
    )
    try:
        async with store:
            assert await store.wait_loaded(10)
            seen.clear()
            proxy.refuse(True)
            await _until(lambda: not store.current, 5)
            status = store.status()
            assert status.loaded
            assert not status.connected
            assert status.last_error
            assert "dataproc" not in status.last_error  # no credentials in errors
            # still serving from the cache
            assert cache.lookup("XNYS", "IBM").resolution is Resolution.FOUND
            assert not await store.wait_current(0.5)

            direct = await asyncpg.connect(refdata_dsn)
            try:  # a change made while the store cannot hear it
                await direct.execute(
                    "UPDATE instruments SET currency = 'EUR' WHERE instrument_id = 'XNYS.BAC'"
                )
            finally:
                await direct.close()
            await asyncio.sleep(0.3)
            assert (cache.instrument("XNYS.BAC") or _none()).currency == "USD"

            proxy.refuse(False)
            assert await store.wait_current(10)
            assert (cache.instrument("XNYS.BAC") or _none()).currency == "EUR"
            assert [(c.key, c.op, src) for c, src in seen] == [("XNYS.BAC", ChangeOp.UPDATE, "reconnect")]
    finally:
        await asyncio.to_thread(proxy.close)


async def test_periodic_refresh_catches_changes_that_were_not_announced(refdata_dsn: str) -> None:
    seen: list[tuple[AppliedChange, str]] = []
    cache = ReferenceCache()
    options = StoreOptions(refresh_interval_s=0.5, ping_interval_s=0.2)
    store = ReferenceStore(
        refdata_dsn, cache, options=options, on_changes=lambda cs, src: seen.extend((c, src) for c in cs)
    )
    async with store:
        assert await store.wait_loaded(10)
        seen.clear()
        conn = await asyncpg.connect(refdata_dsn)
        try:  # a change made with the notify trigger off: only the safety net can see it
            async with conn.transaction():
                await conn.execute("ALTER TABLE instruments DISABLE TRIGGER instruments_notify")
                await conn.execute(
                    "UPDATE instruments SET symbol = 'IBM CORP' WHERE instrument_id = 'XNYS.IBM'"
                )
                await conn.execute("ALTER TABLE instruments ENABLE TRIGGER instruments_notify")
        finally:
            await conn.close()
        await _until(lambda: (cache.instrument("XNYS.IBM") or _none()).symbol == "IBM CORP", 5)
        assert [(c.key, c.op, src) for c, src in seen] == [("XNYS.IBM", ChangeOp.UPDATE, "refresh")]


async def test_truncate_triggers_a_reload(refdata_dsn: str) -> None:
    cache = ReferenceCache()
    store = ReferenceStore(refdata_dsn, cache, options=FAST)
    async with store:
        assert await store.wait_loaded(10)
        conn = await asyncpg.connect(refdata_dsn)
        try:
            await conn.execute("TRUNCATE instruments")
        finally:
            await conn.close()
        await _until(lambda: cache.instrument_count == 0, 5)
        assert cache.lookup("XNYS", "IBM").resolution is Resolution.UNKNOWN


async def test_unreachable_database_is_never_loaded_and_never_current() -> None:
    store = ReferenceStore("postgresql://nobody:secret@127.0.0.1:9/none", ReferenceCache(), options=FAST)
    async with store:
        assert not await store.wait_loaded(0.5)
        assert not store.current
        assert "secret" not in store.status().last_error


def _none() -> Any:
    raise AssertionError("row missing from the cache")
