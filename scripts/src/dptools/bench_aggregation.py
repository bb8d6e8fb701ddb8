"""Drain-mode throughput and memory of the aggregation service next to the plain relay, in the same run.

    uv run python -m dptools.bench_aggregation --records 100000
    uv run python -m dptools.bench_aggregation --records 100000 --instruments 10000   # memory, 10k

Pre-produces a backlog of enriched ticks (Avro, keyed `VENUE:SYMBOL`, partitioned like enrichment
does) to a fresh topic: `--instruments` instruments dealt round-robin (so every instrument is
touched, and each holds open windows at the end), `--trade-share` of them trades, event time moving
`--event-rate` ticks per second so that windows close while the backlog drains. Then it drains the
backlog with the real Kafka loop under the configured guarantee, each time with a fresh consumer
group and `--rounds` times alternately:

1. `relay`: `dataproc_shared.kafka.passthrough.PassthroughProcessor` (same bytes, same partition);
2. `aggregation`: the service's processor (Avro decode, windows for every configured interval,
   changelog state in the transaction, bars to Kafka and to ClickHouse through the embedded chDB
   engine in a temporary folder, migrated like the service does; the tables are rebuilt each round).

Reports records/s of each (first record consumed -> last record consumed, the last commit and its
ClickHouse flush included, mean over rounds) and their ratio; the bars written; and the memory of
this process (VmRSS/VmHWM from /proc/self/status) before the first aggregation drain and after the
last, with the most windows held during it (sampled every 20 ms); the changelog records (and their
key + value bytes) the processor committed, per input record. Topics are uuid-named and deleted
at the end, the chDB folder is removed. Needs the local stack's Kafka (`.stack/env`). The common
part is `dptools.benchkit`.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tempfile
from collections.abc import Iterator
from typing import Any

from aggregation.app import AggregationProcessor
from aggregation.settings import AggregationSettings
from aggregation.sink import BarSink
from aggregation.transform import NS_PER_S
from dataproc_shared import avro
from dataproc_shared.clickhouse import ClickHouseClient, connect
from dataproc_shared.config import kafka_common_config, load_settings
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.migrate import CLICKHOUSE_DATABASE, clickhouse_values, migrate_clickhouse
from dataproc_shared.partitioning import instrument_key, partition_for
from dataproc_shared.records import BatchResult
from dataproc_shared.state import ChangelogStore

from dptools import benchkit

START_NS = 1_763_900_000_000_000_000
VENUE = "XBEN"


def enriched_ticks(count: int, instruments: int, trade_share: float = 0.8, event_rate: float = 200.0,
                   seed: int = 11) -> Iterator[tuple[bytes, bytes]]:
    """`count` (key, Avro value) enriched ticks over `instruments` instruments, dealt round-robin.

    Event time advances `event_rate` ticks per second of event time; prices walk per instrument.
    """
    rng = random.Random(seed)
    step_ns = max(1, int(NS_PER_S / event_rate))
    prices = [100.0 + (i % 400) for i in range(instruments)]
    for n in range(count):
        i = n % instruments
        symbol = f"S{i}"
        trade = rng.random() < trade_share
        prices[i] = max(1.0, round(prices[i] + rng.choice((-0.01, 0.0, 0.01)), 2))
        price = prices[i]
        ts_ns = START_NS + n * step_ns
        record = {
            "instrument_id": f"{symbol}.{VENUE}", "venue": VENUE, "venue_symbol": symbol, "symbol": symbol,
            "asset_class": "equity", "currency": "USD", "tick_size": 0.01, "multiplier": None,
            "venue_timezone": "UTC", "kind": "TRADE" if trade else "QUOTE", "ts_ns": ts_ns, "seq": n,
            "trade_id": f"T{n}" if trade else None, "price": price if trade else None,
            "size": float(rng.randint(1, 500)) if trade else None,
            "bid": None if trade else price - 0.01, "ask": None if trade else price + 0.01,
            "bid_size": None if trade else 100.0, "ask_size": None if trade else 200.0,
            "ingest_ns": ts_ns + 5_000, "source_partition": 0, "source_offset": n,
        }
        yield instrument_key(VENUE, symbol), avro.encode("enriched_tick", record)


class CountingProcessor(AggregationProcessor):
    """The service's processor, counting the changelog records (and their bytes) it commits."""

    changelog_records = 0
    changelog_bytes = 0

    async def before_commit(self) -> BatchResult:
        """`AggregationProcessor.before_commit`, counting the records for the changelog topic."""
        result = await super().before_commit()
        topic = self._store.topic
        for out in result.outputs:
            if out.topic == topic:
                self.changelog_records += 1
                self.changelog_bytes += len(out.key or b"") + len(out.value or b"")
        return result


def fresh_tables(client: ClickHouseClient, settings: AggregationSettings) -> None:
    """Drop and re-create the ClickHouse database (tables, insert deduplication logs) by the migrations."""
    client.command(f"DROP DATABASE IF EXISTS {CLICKHOUSE_DATABASE} SYNC")
    migrate_clickhouse(client, values=clickhouse_values(audit_ttl_days=settings.audit_ttl_days))


def bar_counts(client: ClickHouseClient) -> dict[str, int]:
    """Rows in `market_data.bars` (every version) and bars in it (`FINAL`)."""
    rows = client.query(f"SELECT count() FROM {CLICKHOUSE_DATABASE}.bars").rows  # noqa: S608
    final = client.query(f"SELECT count() FROM {CLICKHOUSE_DATABASE}.bars FINAL").rows  # noqa: S608
    return {"rows": int(rows[0][0]), "bars": int(final[0][0])}


async def bench(count: int, partitions: int, instruments: int, rounds: int = 1, trade_share: float = 0.8,
                event_rate: float = 200.0) -> dict[str, Any]:
    """Create topics and a chDB folder, produce the backlog, drain it with relay and service."""
    run = benchkit.run_id()
    topics = {
        "enriched": f"bench-agg-in-{run}",
        "bars": f"bench-agg-bars-{run}",
        "relay": f"bench-agg-relay-{run}",
        "deadletter": f"bench-agg-dlq-{run}",
    }
    # One window changelog per round: a round must not start from the windows another one left.
    changelogs = {f"changelog{r}": f"bench-agg-windows-{run}-{r}" for r in range(rounds)}
    base = load_settings(AggregationSettings, service="aggregation")
    with tempfile.TemporaryDirectory(prefix="bench-agg-chdb-") as folder, \
            benchkit.bench_topics(base, {**topics, **changelogs}, partitions, compacted=changelogs):
        client = connect(folder)
        try:
            backlog = ((topics["enriched"], key, value)
                       for key, value in enriched_ticks(count, instruments, trade_share, event_rate))
            produce_s = benchkit.produce(base.kafka_bootstrap, backlog,
                                         lambda key: partition_for(key, partitions))
            overrides = {"enriched": topics["enriched"], "bars": topics["bars"],
                         "deadletter": topics["deadletter"], "partitions": partitions}
            facts: dict[str, Any] = {}

            async def relay(round_no: int) -> benchkit.Drained:
                settings = benchkit.bench_settings(base, "relay", f"{run}-{round_no}", overrides)
                return await benchkit.relay_drain(settings, topics["relay"], count, [topics["enriched"]],
                                                  until_stopped=True)

            async def aggregation(round_no: int) -> benchkit.Drained:
                settings = benchkit.bench_settings(
                    base, "aggregation", f"{run}-{round_no}",
                    {**overrides, "aggregation_windows_changelog": changelogs[f"changelog{round_no}"]})
                await asyncio.to_thread(fresh_tables, client, settings)
                metrics = ServiceMetrics("aggregation")
                store = ChangelogStore(topic=settings.topics.changelog("aggregation", "windows"),
                                       kafka_config=kafka_common_config(settings), codec="bytes")
                processor = CountingProcessor(
                    config=settings.aggregation.window_config(), input_topic=topics["enriched"],
                    bars_topic=topics["bars"], store=store, sink=BarSink(client, metrics), metrics=metrics)
                gc.collect()
                if round_no == 0:
                    facts["memory_before"] = benchkit.memory_mib()
                peak = {"open_windows": 0}

                def sample() -> None:
                    peak["open_windows"] = max(peak["open_windows"], processor.engine.open_windows())

                drained = await benchkit.drain(settings, processor, metrics, count, [topics["enriched"]],
                                               until_stopped=True, sample=sample)
                facts.update(
                    memory_after=benchkit.memory_mib(),
                    max_open_windows=peak["open_windows"],
                    bars_emitted=benchkit.counter_totals(metrics, "dp_bars_emitted", ("interval", "final")),
                    dead_letters=benchkit.counter_totals(metrics, "dp_dead_letters", ("reason",)),
                    clickhouse=await asyncio.to_thread(bar_counts, client),
                    changelog_records=processor.changelog_records,
                    changelog_records_per_input=round(processor.changelog_records / count, 3),
                    changelog_bytes_per_input=round(processor.changelog_bytes / count, 1),
                )
                return drained

            relay_runs, agg_runs = await benchkit.alternate(rounds, relay, aggregation)
            return {
                **benchkit.setup(base, count, partitions, produce_s),
                "instruments": instruments,
                "trade_share": trade_share,
                "event_rate": event_rate,
                "intervals": list(base.aggregation.intervals),
                **benchkit.throughput("aggregation", count, relay_runs, agg_runs),
                **facts,
                **benchkit.machine(),
            }
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = benchkit.cli(__doc__, default_records=100_000, default_rounds=1)
    parser.add_argument("--instruments", type=int, default=1_000, help="instruments the backlog touches")
    parser.add_argument("--trade-share", type=float, default=0.8, help="share of trades among the ticks")
    parser.add_argument("--event-rate", type=float, default=200.0,
                        help="ticks per second of event time (how fast windows close)")
    args = parser.parse_args(argv)
    base = load_settings(AggregationSettings, service="aggregation")
    partitions = args.partitions or base.topics.partitions
    result = asyncio.run(bench(args.records, partitions, max(1, args.instruments), max(1, args.rounds),
                               args.trade_share, args.event_rate))
    benchkit.emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
