"""Drain-mode throughput of the projection service next to the plain relay, in the same run.

    uv run python -m dptools.bench_projection --records 100000

Pre-produces a backlog to fresh enriched-tick and bar topics: real ticks (the Binance and Lean
captures of `dptools.realdata`, normalized with the normalization service's parser, cycled to the
wanted count) as `enriched_tick.v1`, plus 1-minute `bar.v1` emissions built from their trades (an
update every 20 trades of an instrument, a final one when its window changes). Then it drains both
topics twice with the real Kafka loop under the configured guarantee, each time with a fresh
consumer group:

1. `relay`: `dataproc_shared.kafka.passthrough.PassthroughProcessor` (consume -> produce the same
   bytes to a relay topic, same partition);
2. `projection`: the service's processor writing to the local stack's Redis (`DATA_PROC_REDIS_URL`).

Reports records/s of each (first record consumed -> last record consumed) and their ratio, and how
many Redis writes the projection made. Instrument ids are prefixed with a run id, so the run's keys
never meet real ones; topics and keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from dataproc_shared import avro
from dataproc_shared.config import admin_config, load_settings
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.partitioning import instrument_key, partition_for
from normalization.transform import Lineage, NormalizedTick, parse_tick
from projection.app import build_processor
from projection.settings import ProjectionSettings

from dptools.realdata import read

MINUTE_MS = 60_000
BAR_EVERY = 20


def normalized_ticks(limit: int) -> list[NormalizedTick]:
    """Up to `limit` valid real ticks, normalized."""
    out: list[NormalizedTick] = []
    lineage = Lineage(ingest_ns=0, source_partition=0, source_offset=0)
    far_future = 10**19
    for raw in itertools.islice(itertools.chain(read("binance"), read("lean-equity")), limit):
        parsed = parse_tick(json.dumps(raw).encode(), lineage=lineage, now_ns=far_future,
                            max_future_skew_ns=0)
        if isinstance(parsed, NormalizedTick):
            out.append(parsed)
    return out


def _enriched(tick: NormalizedTick, instrument_id: str, ts_ns: int) -> dict[str, Any]:
    record = tick.to_avro()
    record.update(ts_ns=ts_ns, ingest_ns=ts_ns, venue_symbol=tick.symbol, instrument_id=instrument_id,
                  asset_class="bench", currency="USD", tick_size=None, multiplier=None,
                  venue_timezone="UTC")
    return record


def backlog(count: int, run: str, spread: int = 1) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """`count` (schema, key, record): enriched ticks and the bars their trades make, in stream order.

    `spread` > 1 deals each real instrument's ticks round-robin over that many instrument ids, so a
    batch holds many more instruments (less coalescing, more Redis writes per record).
    """
    source = normalized_ticks(min(count, 200_000))
    span_ns = max(t.ts_ns for t in source) - min(t.ts_ns for t in source) + 1
    bars: dict[str, dict[str, Any]] = {}
    emitted = 0
    for n in itertools.count():
        tick = source[n % len(source)]
        ts_ns = tick.ts_ns + (n // len(source)) * span_ns  # cycled copies continue in time
        copy = f"~{n % spread}" if spread > 1 else ""
        iid = f"bench-{run}-{tick.key}{copy}"
        key = instrument_key(tick.venue, tick.symbol + copy)
        yield "enriched_tick", key, _enriched(tick, iid, ts_ns)
        emitted += 1
        if emitted >= count:
            return
        if tick.price is None:
            continue
        start = ts_ns // 1_000_000 // MINUTE_MS * MINUTE_MS
        bar = bars.get(iid)
        if bar is not None and bar["window_start_ms"] != start:
            yield "bar", key, {**bar, "is_final": True, "version": bar["version"] + 1}
            emitted += 1
            bar = None
        price, size = tick.price, tick.size or 0.0
        if bar is None:
            bar = {"instrument_id": iid, "venue": tick.venue, "symbol": tick.symbol, "currency": "USD",
                   "interval": "1m", "window_start_ms": start, "window_end_ms": start + MINUTE_MS,
                   "open": price, "high": price, "low": price, "close": price, "volume": 0.0, "vwap": price,
                   "trade_count": 0, "is_final": False, "version": 0, "first_ts_ns": ts_ns,
                   "last_ts_ns": ts_ns, "max_ingest_ns": ts_ns, "source_partition": 0, "offset_from": 0,
                   "offset_to": 0}
        volume = bar["volume"] + size
        bar = {**bar, "high": max(bar["high"], price), "low": min(bar["low"], price), "close": price,
               "volume": volume, "trade_count": bar["trade_count"] + 1, "version": bar["version"] + 1,
               "vwap": (bar["vwap"] * bar["volume"] + price * size) / volume if volume else price,
               "last_ts_ns": ts_ns}
        bars[iid] = bar
        if bar["trade_count"] % BAR_EVERY == 0:
            yield "bar", key, bar
            emitted += 1
            if emitted >= count:
                return


def produce(bootstrap: str, topics: dict[str, str], partitions: int, count: int, run: str,
            spread: int = 1) -> dict[str, int]:
    """Produce the backlog; return how many records went to each topic."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "compression.type": "lz4", "enable.idempotence": True})
    sent = {"enriched_tick": 0, "bar": 0}
    for schema, key, record in backlog(count, run, spread):
        topic = topics["ticks"] if schema == "enriched_tick" else topics["bars"]
        value = avro.encode(schema, record)
        while True:
            try:
                producer.produce(topic, value, key, partition=partition_for(key, partitions))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        sent[schema] += 1
    if producer.flush(120) != 0:
        raise RuntimeError("backlog not fully delivered")
    return sent


async def drain(settings: ProjectionSettings, processor: Any, metrics: ServiceMetrics, count: int,
                input_topics: list[str]) -> float:
    """Run the loop until `count` records were consumed and committed; return first-to-last seconds."""
    loop = KafkaLoop(settings, processor, input_topics=input_topics, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    first: float | None = None
    deadline = time.monotonic() + 1800
    while True:
        consumed = sum(
            metrics.registry.get_sample_value("dp_messages_in_total",
                                              {"service": settings.service, "topic": t}) or 0.0
            for t in input_topics)
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
    await task  # the last cycle (and its Redis flush) commits before the loop returns
    return time.perf_counter() - (first or now)


def _redis_writes(metrics: ServiceMetrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.name == "dp_redis_writes":
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    out[f"{s.labels['key_type']}/{s.labels['outcome']}"] = s.value
    return out


def _delete_keys(url: str, run: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"md:*:bench-{run}-*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        return len(keys)
    finally:
        client.close()


async def bench(count: int, partitions: int, spread: int = 1) -> dict[str, Any]:
    """Create topics, produce the backlog, drain it with the relay and the service; return figures."""
    run = uuid.uuid4().hex[:8]
    topics = {"ticks": f"bench-enriched-{run}", "bars": f"bench-bars-{run}", "relay": f"bench-relay-{run}",
              "deadletter": f"bench-dlq-{run}"}
    base = load_settings(ProjectionSettings, service="projection")
    admin = AdminClient(admin_config(base))
    new = [NewTopic(name, num_partitions=1 if role == "deadletter" else partitions, replication_factor=1)
           for role, name in topics.items()]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result()
    try:
        started = time.perf_counter()
        sent = produce(base.kafka_bootstrap, topics, partitions, count, run, spread)
        produce_s = time.perf_counter() - started
        inputs = [topics["ticks"], topics["bars"]]

        def settings_for(service: str) -> ProjectionSettings:
            topics_model = base.topics.model_copy(update={
                "enriched": topics["ticks"], "bars": topics["bars"], "deadletter": topics["deadletter"],
                "partitions": partitions})
            kafka = base.kafka.model_copy(update={"group_id": f"bench-{service}-{run}"})
            return base.model_copy(update={"service": service, "topics": topics_model, "kafka": kafka,
                                           "instance_id": f"bench-{run}"})

        relay_s = await drain(settings_for("relay"), PassthroughProcessor(topics["relay"]),
                              ServiceMetrics("relay"), count, inputs)
        proj_settings = settings_for("projection")
        metrics = ServiceMetrics("projection")
        processor = build_processor(proj_settings, metrics)
        await processor.start()
        try:
            proj_s = await drain(proj_settings, processor, metrics, count, inputs)
        finally:
            await processor.close()
        return {
            "records": count,
            "ticks": sent["enriched_tick"],
            "bars": sent["bar"],
            "partitions": partitions,
            "spread": spread,
            "guarantee": base.loop.guarantee,
            "batch_size": base.loop.batch_size,
            "produce_s": round(produce_s, 2),
            "relay_s": round(relay_s, 2),
            "relay_per_s": round(count / relay_s),
            "projection_s": round(proj_s, 2),
            "projection_per_s": round(count / proj_s),
            "ratio": round(relay_s / proj_s, 3),
            "redis_writes": _redis_writes(metrics),
            "redis_flushes": processor.flushes,
            "projection_process_s": round(processor.process_seconds, 2),
            "projection_flush_s": round(processor.flush_seconds, 2),
            "machine": f"{platform.machine()} {platform.system()} {platform.python_version()}",
        }
    finally:
        if base.redis_url is not None:
            _delete_keys(base.redis_url.get_secret_value(), run)
        for future in admin.delete_topics(list(topics.values()), operation_timeout=30).values():
            try:
                future.result()
            except Exception as exc:
                print(f"could not delete a topic: {exc}")


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=None, help="default: topics.partitions")
    parser.add_argument("--spread", type=int, default=1,
                        help="deal each real instrument over this many instrument ids (less coalescing)")
    args = parser.parse_args(argv)
    partitions = args.partitions or load_settings(ProjectionSettings, service="projection").topics.partitions
    result = asyncio.run(bench(args.records, partitions, args.spread))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
