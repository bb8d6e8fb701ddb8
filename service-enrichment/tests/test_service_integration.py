"""`python -m enrichment` against the real Kafka and PostgreSQL: enrichment of a known set, live
reload, PostgreSQL cut and restored mid-stream, exactly-once across `kill -9`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from dataproc_shared.partitioning import partition_for
from dataproc_shared.records import InRecord
from dptools.netproxy import NetProxy
from dptools.refdata import read_seed

from .conftest import with_port
from .harness import ServiceProcess, free_port, outcomes, produce_ticks, tick, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 3
SEED = {(i.venue, i.venue_symbol): i for i in read_seed().instruments}
VENUES = {v.mic: v for v in read_seed().venues}
KNOWN = [
    ("XNYS", "IBM"),
    ("XNYS", "AIG"),
    ("XNYS", "SPY"),
    ("XCEC", "GCZ13"),
    ("OANDA", "EURUSD"),
    ("BINANCE", "BTCUSDT"),
    ("BINANCE-USDM", "ETHUSDT"),
    ("BINANCE-COINM", "BTCUSD_PERP"),
    ("EPEX", "DE-20261124-H05"),
    ("XNYM", "CLZ6"),
]


@pytest.fixture
def topics(topic_factory: Callable[..., str]) -> dict[str, str]:
    return {
        "normalized": topic_factory("enr-in", PARTITIONS),
        "enriched": topic_factory("enr-out", PARTITIONS),
        "deadletter": topic_factory("enr-dlq", 1),
        "audit": topic_factory("enr-audit", 1),
    }


@pytest.fixture
def service_factory(topics: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start `python -m enrichment` on the test's topics; every process is stopped afterwards."""
    started: list[ServiceProcess] = []
    instance = uuid.uuid4().hex[:8]
    group = f"enr-test-{instance}"

    def start(dsn: str, **extra: str) -> ServiceProcess:
        port = free_port()
        env = {
            "DATA_PROC_POSTGRES_DSN": dsn,
            "DATA_PROC_TOPICS__NORMALIZED": topics["normalized"],
            "DATA_PROC_TOPICS__ENRICHED": topics["enriched"],
            "DATA_PROC_TOPICS__DEADLETTER": topics["deadletter"],
            "DATA_PROC_TOPICS__PARTITIONS": str(PARTITIONS),
            "DATA_PROC_AUDIT_KAFKA_TOPIC": topics["audit"],
            "DATA_PROC_HTTP__PORT": str(port),
            "DATA_PROC_KAFKA__GROUP_ID": group,
            "DATA_PROC_INSTANCE_ID": instance,
            "DATA_PROC_LOOP__TICK_INTERVAL_MS": "200",
            "DATA_PROC_ENRICHMENT__PING_INTERVAL_S": "0.3",
            "DATA_PROC_ENRICHMENT__BACKOFF_INITIAL_S": "0.1",
            "DATA_PROC_ENRICHMENT__BACKOFF_MAX_S": "0.5",
            "DATA_PROC_ENRICHMENT__HOLD_SLICE_S": "0.5",
            **extra,
        }
        proc = ServiceProcess(env, port, tmp_path / f"enrichment-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _read(consume_all: Callable[..., list[InRecord]], topics: dict[str, str], expected: int) -> Any:
    records = consume_all([topics["enriched"], topics["deadletter"]], expected=expected, timeout=90)
    enriched = [r for r in records if r.topic == topics["enriched"]]
    dead = [r for r in records if r.topic == topics["deadletter"]]
    return outcomes(enriched, dead)


async def test_enriches_a_known_set(
    refdata_dsn: str,
    topics: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    listings = [*KNOWN, ("XNYS", "TWTR"), ("XCHI", "ABT"), ("XNYS", "NOPE")]
    ticks = [
        tick(*listings[n % len(listings)], n, price=-7.5 if n % 13 == 8 else 100.0 + n) for n in range(260)
    ]
    produce_ticks(kafka_bootstrap, topics["normalized"], PARTITIONS, ticks)
    service = service_factory(refdata_dsn)
    await asyncio.to_thread(service.wait_ready)
    found = await asyncio.to_thread(_read, consume_all, topics, len(ticks))

    assert sorted(o.n for o in found) == list(range(len(ticks)))  # each tick exactly once
    expected_kind = {
        ("XNYS", "TWTR"): "inactive_instrument",
        ("XCHI", "ABT"): "inactive_instrument",
        ("XNYS", "NOPE"): "unknown_instrument",
    }
    for o in found:
        t = ticks[o.n]
        listing = (t["venue"], t["symbol"])
        assert o.kind == expected_kind.get(listing, "enriched"), (listing, o.kind)
        assert o.record.key == f"{t['venue']}:{t['symbol']}".encode()
        if o.kind != "enriched":
            assert o.value["service"] == "enrichment"
            assert o.value["source_topic"] == topics["normalized"]
            continue
        seed = SEED[listing]
        v = o.value
        assert v["instrument_id"] == seed.instrument_id
        assert v["symbol"] == seed.symbol
        assert v["asset_class"] == seed.asset_class
        assert v["currency"] == seed.currency
        assert v["tick_size"] == float(seed.tick_size or 0)
        assert v["multiplier"] == float(seed.multiplier or 0)
        assert v["venue_timezone"] == VENUES[seed.venue].timezone
        assert v["price"] == t["price"]
        assert v["ts_ns"] == t["ts_ns"]
        # same partition as the input: the normalized record's partition is the key's partition
        assert o.record.partition == partition_for(o.record.key or b"", PARTITIONS)
    assert any(o.value.get("price") == -7.5 for o in found if o.kind == "enriched")  # power, negative

    # dependency checks run periodically with a timeout: on a loaded machine one may be late once,
    # so wait (bounded) for a healthy report instead of taking the first snapshot
    deadline = time.monotonic() + 30
    health = await asyncio.to_thread(service.health)
    while health["status"] != "healthy" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        health = await asyncio.to_thread(service.health)
    assert health["status"] == "healthy", health
    assert health["dependencies"]["postgres"]["status"] == "up"
    assert await asyncio.to_thread(service.metric, "dp_reference_cache_size", table="instruments") == 299
    assert (
        await asyncio.to_thread(service.metric, "dp_dead_letters_total", reason="inactive_instrument") == 40
    )
    assert await asyncio.to_thread(service.stop) == 0


async def test_live_reload_reaches_the_next_tick(
    refdata_dsn: str,
    topics: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    service = service_factory(refdata_dsn)
    await asyncio.to_thread(service.wait_ready)
    conn = await asyncpg.connect(refdata_dsn)
    n = 0
    expected: dict[int, tuple[str, Any]] = {}

    async def send(venue: str, symbol: str, kind: str, check: Any = None) -> None:
        nonlocal n
        await asyncio.to_thread(
            produce_ticks, kafka_bootstrap, topics["normalized"], PARTITIONS, [tick(venue, symbol, n)]
        )
        expected[n] = (kind, check)
        n += 1
        consumed = n  # wait until the service has looked this tick up before changing the tables
        await asyncio.to_thread(
            wait_for,
            lambda: service.metric("dp_messages_in_total", topic=topics["normalized"]) >= consumed,
            20,
            f"tick {consumed - 1} consumed",
        )

    async def applied(op: str, table: str, count: float) -> None:
        await asyncio.to_thread(
            wait_for,
            lambda: service.metric("dp_reference_changes_total", table=table, op=op) >= count,
            10,
            f"{table} {op} applied",
        )

    try:
        await send("XNYS", "IBM", "enriched", ("tick_size", 0.01))
        await conn.execute("UPDATE instruments SET tick_size = 0.05 WHERE instrument_id = 'XNYS.IBM'")
        await applied("update", "instruments", 1)
        await send("XNYS", "IBM", "enriched", ("tick_size", 0.05))
        await conn.execute(
            "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency,"
            " tick_size, multiplier, active) VALUES ('XNYS.NEWCO', 'XNYS', 'NEWCO', 'NEWCO', 'equity',"
            " 'USD', 0.01, 1, true)"
        )
        await applied("insert", "instruments", 1)
        await send("XNYS", "NEWCO", "enriched", ("instrument_id", "XNYS.NEWCO"))
        await conn.execute("UPDATE instruments SET active = false WHERE instrument_id = 'XNYS.AIG'")
        await applied("deactivate", "instruments", 1)
        await send("XNYS", "AIG", "inactive_instrument")
        await conn.execute("UPDATE venues SET timezone = 'America/Chicago' WHERE mic = 'XNYS'")
        await applied("update", "venues", 1)
        await send("XNYS", "IBM", "enriched", ("venue_timezone", "America/Chicago"))
        await conn.execute("DELETE FROM instruments WHERE instrument_id = 'XNYS.NEWCO'")
        await applied("delete", "instruments", 1)
        await send("XNYS", "NEWCO", "unknown_instrument")
    finally:
        await conn.close()
    found = await asyncio.to_thread(_read, consume_all, topics, len(expected))
    assert sorted(o.n for o in found) == sorted(expected)
    for o in found:
        kind, check = expected[o.n]
        assert o.kind == kind, (o.n, o.kind, kind)
        if check is not None:
            assert o.value[check[0]] == check[1], (o.n, check, o.value[check[0]])
    audit = await asyncio.to_thread(consume_all, [topics["audit"]], timeout=30)
    changes = [r for r in audit if b'"reference_change"' in (r.value or b"")]
    assert len(changes) == 5  # update, insert, deactivate, venue update, delete


@pytest.fixture
async def pg_proxy(refdata_dsn: str) -> AsyncIterator[NetProxy]:
    target = urlsplit(refdata_dsn)
    proxy = await asyncio.to_thread(NetProxy(target.hostname or "127.0.0.1", target.port or 5432).start)
    try:
        yield proxy
    finally:
        await asyncio.to_thread(proxy.close)


async def test_postgres_cut_and_restored_mid_stream(
    refdata_dsn: str,
    pg_proxy: NetProxy,
    topics: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    service = service_factory(with_port(refdata_dsn, "127.0.0.1", pg_proxy.port))
    await asyncio.to_thread(service.wait_ready)
    phase_a = [tick(*KNOWN[n % len(KNOWN)], n) for n in range(100)]
    await asyncio.to_thread(produce_ticks, kafka_bootstrap, topics["normalized"], PARTITIONS, phase_a)
    first = await asyncio.to_thread(_read, consume_all, topics, 100)
    assert {o.kind for o in first} == {"enriched"}

    pg_proxy.refuse(True)
    await asyncio.to_thread(
        wait_for,
        lambda: service.health()["dependencies"]["postgres"]["status"] == "down",
        15,
        "postgres down",
    )
    health = await asyncio.to_thread(service.health)
    assert health["status"] == "degraded"
    assert "password" not in str(health).lower()
    conn = await asyncpg.connect(refdata_dsn)  # directly: the service cannot see this insert yet
    try:
        await conn.execute(
            "INSERT INTO instruments (instrument_id, venue, venue_symbol, symbol, asset_class, currency,"
            " tick_size, multiplier, active) VALUES ('XNYS.LATE', 'XNYS', 'LATE', 'LATE', 'equity',"
            " 'USD', 0.01, 1, true)"
        )
    finally:
        await conn.close()
    phase_b = [tick(*KNOWN[n % len(KNOWN)], n) for n in range(100, 150)]
    phase_b += [tick("XNYS", "LATE", 150), tick("XNYS", "NOPE", 151)]
    phase_b += [tick(*KNOWN[n % len(KNOWN)], n) for n in range(152, 200)]
    await asyncio.to_thread(produce_ticks, kafka_bootstrap, topics["normalized"], PARTITIONS, phase_b)
    await asyncio.sleep(4)  # the service holds the batches with the misses
    during = await asyncio.to_thread(consume_all, [topics["deadletter"]], timeout=30)
    assert during == []  # nothing dead-lettered while the cache could not be trusted
    assert (await asyncio.to_thread(service.get, "/live"))[0] == 200  # waiting on purpose is not a stall
    assert await asyncio.to_thread(service.metric, "dp_dependency_up", dependency="postgres") == 0

    pg_proxy.refuse(False)
    found = await asyncio.to_thread(_read, consume_all, topics, 200)
    counts = Counter(o.n for o in found)
    assert sorted(counts) == list(range(200))
    assert max(counts.values()) == 1  # no duplicates
    kinds = {o.n: o.kind for o in found}
    assert kinds[150] == "enriched"  # resolved after the reconnect reload, not dead-lettered
    assert next(o for o in found if o.n == 150).value["instrument_id"] == "XNYS.LATE"
    assert kinds[151] == "unknown_instrument"
    assert all(kinds[n] == "enriched" for n in range(200) if n not in (151,))
    await asyncio.to_thread(wait_for, lambda: service.health()["status"] == "healthy", 15, "healthy again")
    assert await asyncio.to_thread(service.metric, "dp_enrichment_held_seconds_count") >= 1


async def test_exactly_once_across_kill_9(
    refdata_dsn: str,
    topics: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    listings = [*KNOWN, ("XNYS", "NOPE")]
    ticks = [tick(*listings[n % len(listings)], n) for n in range(3000)]
    await asyncio.to_thread(produce_ticks, kafka_bootstrap, topics["normalized"], PARTITIONS, ticks)
    slow = {"DATA_PROC_LOOP__BATCH_SIZE": "40"}
    first = service_factory(refdata_dsn, **slow)
    await asyncio.to_thread(first.wait_ready)
    await asyncio.to_thread(
        wait_for,
        lambda: first.metric("dp_messages_out_total", topic=topics["enriched"]) >= 300,
        60,
        "first outputs",
    )
    await asyncio.to_thread(first.kill9)
    unknown = sum(1 for t in ticks if t["symbol"] == "NOPE")
    done_before = await asyncio.to_thread(consume_all, [topics["enriched"]], timeout=30)
    assert 0 < len(done_before) < len(ticks) - unknown  # killed mid-stream
    second = service_factory(refdata_dsn, **slow)
    await asyncio.to_thread(second.wait_ready)
    await asyncio.to_thread(_read, consume_all, topics, len(ticks))
    await asyncio.to_thread(second.stop)
    records = await asyncio.to_thread(consume_all, [topics["enriched"], topics["deadletter"]], timeout=60)
    found = outcomes(
        [r for r in records if r.topic == topics["enriched"]],
        [r for r in records if r.topic == topics["deadletter"]],
    )
    counts = Counter(o.n for o in found)
    assert len(found) == len(ticks)  # nothing lost, nothing twice
    assert sorted(counts) == list(range(len(ticks)))
    kinds = Counter(o.kind for o in found)
    assert kinds == {"enriched": len(ticks) - unknown, "unknown_instrument": unknown}


async def test_not_ready_and_nothing_decided_until_the_first_load(
    refdata_dsn: str,
    pg_proxy: NetProxy,
    topics: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    pg_proxy.refuse(True)  # PostgreSQL unreachable from the start
    ticks = [tick(*KNOWN[n % len(KNOWN)], n) for n in range(30)] + [tick("XNYS", "NOPE", 30)]
    await asyncio.to_thread(produce_ticks, kafka_bootstrap, topics["normalized"], PARTITIONS, ticks)
    service = service_factory(with_port(refdata_dsn, "127.0.0.1", pg_proxy.port))
    await asyncio.to_thread(
        wait_for,
        lambda: service.metric("dp_messages_in_total", topic=topics["normalized"]) > 0,
        30,
        "consuming",
    )
    await asyncio.sleep(2)
    assert (await asyncio.to_thread(service.get, "/ready"))[0] == 503
    assert (await asyncio.to_thread(service.get, "/live"))[0] == 200
    nothing = await asyncio.to_thread(consume_all, [topics["enriched"], topics["deadletter"]], timeout=30)
    assert nothing == []
    pg_proxy.refuse(False)
    await asyncio.to_thread(service.wait_ready, 30)
    found = await asyncio.to_thread(_read, consume_all, topics, len(ticks))
    assert sorted(o.n for o in found) == list(range(len(ticks)))
    assert Counter(o.kind for o in found) == {"enriched": 30, "unknown_instrument": 1}


async def test_hold_longer_than_the_poll_interval_loses_and_duplicates_nothing(
    refdata_dsn: str,
    pg_proxy: NetProxy,
    topics: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    consume_all: Callable[..., list[InRecord]],
    kafka_bootstrap: str,
) -> None:
    service = service_factory(
        with_port(refdata_dsn, "127.0.0.1", pg_proxy.port),
        DATA_PROC_LOOP__MAX_POLL_INTERVAL_MS="6000",
        DATA_PROC_LOOP__SESSION_TIMEOUT_MS="6000",
    )
    await asyncio.to_thread(service.wait_ready)
    pg_proxy.refuse(True)
    await asyncio.to_thread(
        wait_for,
        lambda: service.health()["dependencies"]["postgres"]["status"] == "down",
        15,
        "postgres down",
    )
    ticks = [tick(*KNOWN[n % len(KNOWN)], n) for n in range(40)] + [tick("XNYS", "NOPE", 40)]
    ticks += [tick(*KNOWN[n % len(KNOWN)], n) for n in range(41, 80)]
    await asyncio.to_thread(produce_ticks, kafka_bootstrap, topics["normalized"], PARTITIONS, ticks)
    await asyncio.sleep(13)  # held well past max.poll.interval.ms: the consumer leaves its group
    pg_proxy.refuse(False)
    await asyncio.to_thread(_read, consume_all, topics, len(ticks))
    await asyncio.sleep(2)
    records = await asyncio.to_thread(consume_all, [topics["enriched"], topics["deadletter"]], timeout=60)
    found = outcomes(
        [r for r in records if r.topic == topics["enriched"]],
        [r for r in records if r.topic == topics["deadletter"]],
    )
    assert len(found) == len(ticks)
    assert sorted(o.n for o in found) == list(range(len(ticks)))
    assert Counter(o.kind for o in found) == {"enriched": 79, "unknown_instrument": 1}
    service.check_running()
