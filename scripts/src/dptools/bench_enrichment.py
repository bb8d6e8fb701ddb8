"""Drain-mode throughput of the enrichment service next to the plain relay, in the same run.

    uv run python -m dptools.bench_enrichment --records 200000

Creates a fresh PostgreSQL database with the reference migrations and the seed set, pre-produces a
backlog of normalized ticks (Avro, keyed `VENUE:SYMBOL`, partitioned like normalization does) over
the seed's active instruments plus a small share of unknown ones, then drains it with the real
Kafka loop under the configured guarantee (exactly-once by default), once with each processor:

1. `relay`: `dataproc_shared.kafka.passthrough.PassthroughProcessor` (same bytes, same partition);
2. `enrichment`: the service's processor (Avro decode, cache join, spliced Avro output, dead letters).

The pair runs `--rounds` times alternately (each run with a fresh consumer group) so that load from
other processes on a shared machine hits both alike. Reports records/s of each (first record consumed
-> last record consumed, mean over rounds) and their ratio. Topics and the database are uuid-named
and removed at the end. Needs the local stack (`.stack/env`). The common part is `dptools.benchkit`.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from dataproc_shared import avro
from dataproc_shared.config import load_settings
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.migrate import migrate_postgres
from dataproc_shared.partitioning import instrument_key, partition_for
from enrichment.app import EnrichmentProcessor, ServiceReferenceMetrics
from enrichment.refstore import ReferenceStore
from enrichment.settings import EnrichmentSettings
from enrichment.transform import ReferenceCache

from dptools import benchkit
from dptools.refdata import load, read_seed

START_NS = 1_763_900_000_000_000_000


def normalized_ticks(count: int, unknown_share: float = 0.01, seed: int = 7) -> Iterator[tuple[bytes, bytes]]:
    """`count` (key, Avro value) normalized ticks over the seed's active instruments."""
    rng = random.Random(seed)
    reference = read_seed()
    open_venues = {v.mic for v in reference.venues if v.active}
    listings = [
        (i.venue, i.venue_symbol) for i in reference.instruments if i.active and i.venue in open_venues
    ]
    for n in range(count):
        venue, symbol = ("XNYS", f"ZZ{n % 97}") if rng.random() < unknown_share else rng.choice(listings)
        trade = rng.random() < 0.6
        price = round(rng.uniform(10, 500), 2)
        record = {
            "venue": venue,
            "symbol": symbol,
            "kind": "TRADE" if trade else "QUOTE",
            "ts_ns": START_NS + n * 1_000_000,
            "seq": n,
            "trade_id": f"T{n}" if trade else None,
            "price": price if trade else None,
            "size": float(rng.randint(1, 500)) if trade else None,
            "bid": None if trade else price - 0.01,
            "ask": None if trade else price + 0.01,
            "bid_size": None if trade else 100.0,
            "ask_size": None if trade else 200.0,
            "ingest_ns": START_NS + n * 1_000_000 + 5_000,
            "source_partition": 0,
            "source_offset": n,
        }
        yield instrument_key(venue, symbol), avro.encode("normalized_tick", record)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def bench(count: int, partitions: int, rounds: int = 2) -> dict[str, Any]:
    """Create topics and a database, produce the backlog, drain it with relay and service."""
    run = benchkit.run_id()
    topics = {
        "normalized": f"bench-enr-in-{run}",
        "enriched": f"bench-enr-out-{run}",
        "relay": f"bench-enr-relay-{run}",
        "deadletter": f"bench-enr-dlq-{run}",
    }
    base = load_settings(EnrichmentSettings, service="enrichment")
    admin_dsn = os.environ.get("DATA_PROC_POSTGRES_DSN") or (
        base.postgres_dsn.get_secret_value() if base.postgres_dsn else ""
    )
    if not admin_dsn:
        raise RuntimeError("DATA_PROC_POSTGRES_DSN is not set (source .stack/env)")
    database = f"bench_enrich_{run}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    try:
        with benchkit.bench_topics(base, topics, partitions):
            dsn = _with_database(admin_dsn, database)
            await migrate_postgres(dsn)
            await load(dsn)
            overrides = {
                "normalized": topics["normalized"],
                "enriched": topics["enriched"],
                "deadletter": topics["deadletter"],
                "partitions": partitions,
            }
            backlog = ((topics["normalized"], key, value) for key, value in normalized_ticks(count))
            produce_s = benchkit.produce(base.kafka_bootstrap, backlog,
                                         lambda key: partition_for(key, partitions))
            dead: dict[str, float] = {}

            async def relay(round_no: int) -> benchkit.Drained:
                settings = benchkit.bench_settings(base, "relay", f"{run}-{round_no}", overrides,
                                                   audit_enabled=False)
                return await benchkit.relay_drain(settings, topics["relay"], count, [topics["normalized"]])

            async def enrichment(round_no: int) -> benchkit.Drained:
                settings = benchkit.bench_settings(base, "enrichment", f"{run}-{round_no}", overrides,
                                                   audit_enabled=False)
                metrics = ServiceMetrics("enrichment")
                store = ReferenceStore(dsn, ReferenceCache(), options=settings.enrichment.store_options())
                processor = EnrichmentProcessor(settings, store, metrics=ServiceReferenceMetrics(metrics))
                store.set_listener(processor.on_changes)
                async with store:
                    if not await store.wait_loaded(30):
                        raise RuntimeError("reference data did not load")
                    drained = await benchkit.drain(settings, processor, metrics, count,
                                                   [topics["normalized"]])
                dead.clear()
                dead.update(benchkit.counter_totals(metrics, "dp_dead_letters", ("reason",)))
                return drained

            relay_runs, enrich_runs = await benchkit.alternate(rounds, relay, enrichment)
            return {
                **benchkit.setup(base, count, partitions, produce_s),
                **benchkit.throughput("enrichment", count, relay_runs, enrich_runs),
                "dead_letters": dead,
                **benchkit.machine(),
            }
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    args = benchkit.cli(__doc__, default_records=200_000, default_rounds=2).parse_args(argv)
    partitions = args.partitions or load_settings(EnrichmentSettings, service="enrichment").topics.partitions
    result = asyncio.run(bench(args.records, partitions, max(1, args.rounds)))
    benchkit.emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
