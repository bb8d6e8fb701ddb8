"""Drain-mode throughput of the normalization service next to the plain relay, in the same run.

    uv run python -m dptools.bench_normalization --records 100000

Pre-produces a backlog of raw ticks (the real Binance and Lean captures of `dptools.realdata`,
cycled to the wanted count) to a fresh raw topic, then drains it twice with the real Kafka loop
under the configured guarantee (exactly-once by default), each time with a fresh consumer group:

1. `relay`: `dataproc_shared.kafka.passthrough.PassthroughProcessor` (consume -> produce the same
   bytes, same partition);
2. `normalization`: the service's processor (parse, validate, dedup with its changelog, Avro).

Reports records/s of each (first record consumed -> last record consumed) and their ratio. All
topics are uuid-named and deleted at the end. Needs the local stack (`.stack/env`).
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

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from dataproc_shared.config import admin_config, load_settings
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.partitioning import instrument_key, partition_for
from normalization.app import NormalizationProcessor
from normalization.settings import NormalizationSettings

from dptools.realdata import read


def raw_ticks(count: int) -> Iterator[tuple[bytes, bytes]]:
    """`count` (key, value) raw ticks from the real captures, cycled; cycled copies keep trade ids unique."""
    source = list(itertools.islice(itertools.chain(read("binance"), read("lean-equity")), count))
    for n in range(count):
        tick = dict(source[n % len(source)])
        if "trade_id" in tick and n >= len(source):
            tick["trade_id"] = f"{tick['trade_id']}-{n // len(source)}"
        yield instrument_key(str(tick["venue"]), str(tick["symbol"])), json.dumps(tick).encode()


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
    for key, value in raw_ticks(count):
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
    settings: NormalizationSettings, processor: Any, metrics: ServiceMetrics, count: int, input_topic: str
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


async def bench(count: int, partitions: int) -> dict[str, Any]:
    """Create topics, produce the backlog, drain it with the relay and the service; return figures."""
    run = uuid.uuid4().hex[:8]
    topics = {
        "raw": f"bench-raw-{run}",
        "normalized": f"bench-norm-{run}",
        "relay": f"bench-relay-{run}",
        "deadletter": f"bench-dlq-{run}",
        "changelog": f"bench-dedup-{run}",
    }
    base = load_settings(NormalizationSettings)
    admin = AdminClient(admin_config(base))
    compact = {"cleanup.policy": "compact"}
    new = [
        NewTopic(
            name,
            num_partitions=1 if role == "deadletter" else partitions,
            replication_factor=1,
            config=compact if role == "changelog" else {},
        )
        for role, name in topics.items()
    ]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result()
    try:
        overrides = {
            "raw": topics["raw"],
            "normalized": topics["normalized"],
            "deadletter": topics["deadletter"],
            "normalization_dedup_changelog": topics["changelog"],
            "partitions": partitions,
        }
        produce_s = produce(base.kafka_bootstrap, topics["raw"], partitions, count)

        def settings_for(service: str) -> NormalizationSettings:
            topics_model = base.topics.model_copy(update=overrides)
            kafka = base.kafka.model_copy(update={"group_id": f"bench-{service}-{run}"})
            return base.model_copy(
                update={
                    "service": service,
                    "topics": topics_model,
                    "kafka": kafka,
                    "instance_id": f"bench-{run}",
                }
            )

        relay_settings = settings_for("relay")
        relay_s = await drain(
            relay_settings,
            PassthroughProcessor(topics["relay"]),
            ServiceMetrics("relay"),
            count,
            topics["raw"],
        )
        norm_settings = settings_for("normalization")
        metrics = ServiceMetrics("normalization")
        processor = NormalizationProcessor.from_settings(norm_settings, metrics)
        norm_s = await drain(norm_settings, processor, metrics, count, topics["raw"])
        dead = sum(
            s.value
            for m in metrics.registry.collect()
            if m.name == "dp_dead_letters"
            for s in m.samples
            if s.name.endswith("_total")
        )
        return {
            "records": count,
            "partitions": partitions,
            "guarantee": base.loop.guarantee,
            "batch_size": base.loop.batch_size,
            "produce_s": round(produce_s, 2),
            "relay_s": round(relay_s, 2),
            "relay_per_s": round(count / relay_s),
            "normalization_s": round(norm_s, 2),
            "normalization_per_s": round(count / norm_s),
            "ratio": round(relay_s / norm_s, 3),
            "dead_letters": dead,
            "machine": f"{platform.machine()} {platform.system()} {platform.python_version()}",
        }
    finally:
        for future in admin.delete_topics(list(topics.values()), operation_timeout=30).values():
            try:
                future.result()
            except Exception as exc:
                print(f"could not delete a topic: {exc}")


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=None, help="default: topics.partitions")
    args = parser.parse_args(argv)
    partitions = args.partitions or load_settings(NormalizationSettings).topics.partitions
    result = asyncio.run(bench(args.records, partitions))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
