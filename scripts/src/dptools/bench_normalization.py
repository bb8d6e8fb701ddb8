"""Drain-mode throughput of the normalization service next to the plain relay, in the same run.

    uv run python -m dptools.bench_normalization --records 100000

Pre-produces a backlog of raw ticks (the real Binance and Lean captures of `dptools.realdata`,
cycled to the wanted count) to a fresh raw topic, then drains it with the real Kafka loop
under the configured guarantee (exactly-once by default), each time with a fresh consumer group:

1. `relay`: `dataproc_shared.kafka.passthrough.PassthroughProcessor` (consume -> produce the same
   bytes, same partition);
2. `normalization`: the service's processor (parse, validate, dedup with its changelog, Avro).

The pair runs `--rounds` times alternately (default once). Reports records/s of each (first record
consumed -> last record consumed, mean over rounds) and their ratio. All topics are uuid-named and
deleted at the end. Needs the local stack (`.stack/env`). The common part is `dptools.benchkit`.

    uv run python -m dptools.bench_normalization --records 30000 --transform-only

measures the service's processor alone (no Kafka, no stack needed): `process` and `before_commit`
over the same records in 2000-record batches, `--rounds` times with a fresh processor each time;
reports the CPU µs per record of each round (`time.process_time`) and the best.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

from dataproc_shared.config import load_settings
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.partitioning import instrument_key, partition_for
from dataproc_shared.records import InRecord
from dataproc_shared.state import ChangelogStore
from normalization.app import NormalizationProcessor
from normalization.settings import NormalizationSettings

from dptools import benchkit
from dptools.realdata import read


def raw_ticks(count: int) -> Iterator[tuple[bytes, bytes]]:
    """`count` (key, value) raw ticks from the real captures, cycled; cycled copies keep trade ids unique."""
    source = list(itertools.islice(itertools.chain(read("binance"), read("lean-equity")), count))
    for n in range(count):
        tick = dict(source[n % len(source)])
        if "trade_id" in tick and n >= len(source):
            tick["trade_id"] = f"{tick['trade_id']}-{n // len(source)}"
        yield instrument_key(str(tick["venue"]), str(tick["symbol"])), json.dumps(tick).encode()


async def bench(count: int, partitions: int, rounds: int = 1) -> dict[str, Any]:
    """Create topics, produce the backlog, drain it with the relay and the service; return figures."""
    run = benchkit.run_id()
    topics = {
        "raw": f"bench-raw-{run}",
        "normalized": f"bench-norm-{run}",
        "relay": f"bench-relay-{run}",
        "deadletter": f"bench-dlq-{run}",
    }
    # One dedup changelog per round: a round must not start from the state another one left.
    changelogs = {f"changelog{r}": f"bench-dedup-{run}-{r}" for r in range(rounds)}
    base = load_settings(NormalizationSettings)
    with benchkit.bench_topics(base, {**topics, **changelogs}, partitions, compacted=changelogs):
        backlog = ((topics["raw"], key, value) for key, value in raw_ticks(count))
        produce_s = benchkit.produce(base.kafka_bootstrap, backlog,
                                     lambda key: partition_for(key, partitions))
        overrides = {"raw": topics["raw"], "normalized": topics["normalized"],
                     "deadletter": topics["deadletter"], "partitions": partitions}
        dead: dict[str, float] = {}

        async def relay(round_no: int) -> benchkit.Drained:
            settings = benchkit.bench_settings(base, "relay", f"{run}-{round_no}", overrides)
            return await benchkit.relay_drain(settings, topics["relay"], count, [topics["raw"]])

        async def normalization(round_no: int) -> benchkit.Drained:
            settings = benchkit.bench_settings(
                base, "normalization", f"{run}-{round_no}",
                {**overrides, "normalization_dedup_changelog": changelogs[f"changelog{round_no}"]})
            metrics = ServiceMetrics("normalization")
            processor = NormalizationProcessor.from_settings(settings, metrics)
            drained = await benchkit.drain(settings, processor, metrics, count, [topics["raw"]])
            dead.update(benchkit.counter_totals(metrics, "dp_dead_letters", ("reason",)))
            return drained

        relay_runs, norm_runs = await benchkit.alternate(rounds, relay, normalization)
        return {
            **benchkit.setup(base, count, partitions, produce_s),
            **benchkit.throughput("normalization", count, relay_runs, norm_runs),
            "dead_letters": dead,
            **benchkit.machine(),
        }


def transform_cost(count: int, partitions: int, rounds: int, batch_size: int = 2000) -> dict[str, Any]:
    """CPU µs per record of the processor's `process` + `before_commit`, without Kafka (see docstring)."""
    settings = load_settings(NormalizationSettings)
    raw = settings.topics.raw
    records = sorted(
        (InRecord(raw, partition_for(key, partitions), n, key, value, 1_763_908_200_000 + n)
         for n, (key, value) in enumerate(raw_ticks(count))),
        key=lambda rec: rec.partition,
    )
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]

    async def one_round() -> float:
        store = ChangelogStore(topic="bench-dedup", kafka_config={}, codec="bytes")
        processor = NormalizationProcessor(settings, store=store)
        started = time.process_time()
        for batch in batches:
            await processor.process(batch)
            await processor.before_commit()
        return (time.process_time() - started) / count * 1e6

    runs = [round(asyncio.run(one_round()), 2) for _ in range(rounds)]
    return {"records": count, "batch_size": batch_size, "transform_cpu_us_per_record": runs,
            "best": min(runs), **benchkit.machine()}


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = benchkit.cli(__doc__, default_records=100_000, default_rounds=1)
    parser.add_argument("--transform-only", action="store_true",
                        help="the processor alone, no Kafka: CPU µs per record")
    args = parser.parse_args(argv)
    partitions = args.partitions or load_settings(NormalizationSettings).topics.partitions
    if args.transform_only:
        benchkit.emit(transform_cost(args.records, partitions, max(1, args.rounds)), args.out)
        return 0
    result = asyncio.run(bench(args.records, partitions, max(1, args.rounds)))
    benchkit.emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
