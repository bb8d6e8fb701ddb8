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
and removed at the end. Needs the local stack (`.stack/env`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from dataproc_shared import avro
from dataproc_shared.config import admin_config, load_settings
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.migrate import migrate_postgres
from dataproc_shared.partitioning import instrument_key, partition_for
from enrichment.app import EnrichmentProcessor, ServiceReferenceMetrics
from enrichment.refstore import ReferenceStore
from enrichment.settings import EnrichmentSettings
from enrichment.transform import ReferenceCache

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


def produce(bootstrap: str, topic: str, partitions: int, count: int) -> float:
    """Produce the backlog; return the seconds it took."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "enable.idempotence": True,
        }
    )
    started = time.perf_counter()
    for key, value in normalized_ticks(count):
        while True:
            try:
                producer.produce(topic, value, key, partition=partition_for(key, partitions))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("backlog not fully delivered")
    return time.perf_counter() - started


async def drain(
    settings: EnrichmentSettings, processor: Any, metrics: ServiceMetrics, count: int, input_topic: str
) -> float:
    """Run the loop until `count` records were consumed; return first-to-last consume seconds."""
    loop = KafkaLoop(settings, processor, input_topics=[input_topic], metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    first: float | None = None
    deadline = time.monotonic() + 1800
    while True:
        consumed = (
            metrics.registry.get_sample_value(
                "dp_messages_in_total", {"service": settings.service, "topic": input_topic}
            )
            or 0.0
        )
        now = time.perf_counter()
        if consumed and first is None:
            first = now
        if consumed >= count:
            break
        if task.done():
            task.result()
            raise RuntimeError("the loop stopped early")
        if time.monotonic() > deadline:
            raise TimeoutError(f"drained {consumed:.0f} of {count}")
        await asyncio.sleep(0.02)
    stop.set()
    await task
    return now - (first or now)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def bench(count: int, partitions: int, rounds: int = 2) -> dict[str, Any]:
    """Create topics and a database, produce the backlog, drain it with relay and service."""
    run = uuid.uuid4().hex[:8]
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
    admin = AdminClient(admin_config(base))
    new = [
        NewTopic(name, num_partitions=1 if role == "deadletter" else partitions, replication_factor=1)
        for role, name in topics.items()
    ]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result()
    try:
        dsn = _with_database(admin_dsn, database)
        await migrate_postgres(dsn)
        await load(dsn)
        overrides = {
            "normalized": topics["normalized"],
            "enriched": topics["enriched"],
            "deadletter": topics["deadletter"],
            "partitions": partitions,
        }
        produce_s = produce(base.kafka_bootstrap, topics["normalized"], partitions, count)

        def settings_for(service: str, round_no: int) -> EnrichmentSettings:
            topics_model = base.topics.model_copy(update=overrides)
            kafka = base.kafka.model_copy(update={"group_id": f"bench-{service}-{run}-{round_no}"})
            return base.model_copy(
                update={
                    "service": service,
                    "topics": topics_model,
                    "kafka": kafka,
                    "instance_id": f"bench-{run}-{round_no}",
                    "audit_enabled": False,
                }
            )

        relay_runs: list[float] = []
        enrich_runs: list[float] = []
        dead: dict[str, float] = {}
        for round_no in range(rounds):
            relay_runs.append(
                await drain(
                    settings_for("relay", round_no),
                    PassthroughProcessor(topics["relay"]),
                    ServiceMetrics("relay"),
                    count,
                    topics["normalized"],
                )
            )
            settings = settings_for("enrichment", round_no)
            metrics = ServiceMetrics("enrichment")
            store = ReferenceStore(dsn, ReferenceCache(), options=settings.enrichment.store_options())
            processor = EnrichmentProcessor(settings, store, metrics=ServiceReferenceMetrics(metrics))
            store.set_listener(processor.on_changes)
            async with store:
                if not await store.wait_loaded(30):
                    raise RuntimeError("reference data did not load")
                enrich_runs.append(await drain(settings, processor, metrics, count, topics["normalized"]))
            dead = {
                s.labels["reason"]: s.value
                for m in metrics.registry.collect()
                if m.name == "dp_dead_letters"
                for s in m.samples
                if s.name.endswith("_total")
            }
        relay_s = sum(relay_runs) / rounds
        enrich_s = sum(enrich_runs) / rounds
        return {
            "records": count,
            "partitions": partitions,
            "guarantee": base.loop.guarantee,
            "batch_size": base.loop.batch_size,
            "produce_s": round(produce_s, 2),
            "relay_s": round(relay_s, 2),
            "relay_per_s": round(count / relay_s),
            "enrichment_s": round(enrich_s, 2),
            "enrichment_per_s": round(count / enrich_s),
            "ratio": round(relay_s / enrich_s, 3),
            "rounds": rounds,
            "relay_runs_s": [round(x, 2) for x in relay_runs],
            "enrichment_runs_s": [round(x, 2) for x in enrich_runs],
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "dead_letters": dead,
            "machine": f"{platform.machine()} {platform.system()} {platform.python_version()} "
            f"{os.cpu_count()} cpus",
        }
    finally:
        for future in admin.delete_topics(list(topics.values()), operation_timeout=30).values():
            try:
                future.result()
            except Exception as exc:
                print(f"could not delete a topic: {exc}")
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=None, help="default: topics.partitions")
    parser.add_argument("--rounds", type=int, default=2, help="relay/enrichment pairs, alternating")
    args = parser.parse_args(argv)
    partitions = args.partitions or load_settings(EnrichmentSettings, service="enrichment").topics.partitions
    result = asyncio.run(bench(args.records, partitions, max(1, args.rounds)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
