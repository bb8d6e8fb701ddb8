"""Drain-mode throughput of the projection service next to the plain relay, in the same run.

    uv run python -m dptools.bench_projection --records 100000

Pre-produces a backlog to fresh enriched-tick and bar topics: real ticks (the Binance and Lean
captures of `dptools.realdata`, normalized with the normalization service's parser, cycled to the
wanted count) as `enriched_tick.v1`, plus 1-minute `bar.v1` emissions built from their trades (an
update every 20 trades of an instrument, a final one when its window changes). Then it drains both
topics with the real Kafka loop under the configured guarantee, each time with a fresh consumer
group (`--rounds` relay/projection pairs, alternating; default one):

1. `relay`: `dataproc_shared.kafka.passthrough.PassthroughProcessor` (consume -> produce the same
   bytes to a relay topic, same partition);
2. `projection`: the service's processor writing to the local stack's Redis (`DATA_PROC_REDIS_URL`).

Reports records/s of each (first record consumed -> last record consumed) and their ratio, and how
many Redis writes the projection made. Instrument ids are prefixed with a run id, so the run's keys
never meet real ones; topics and keys are deleted at the end. The common part is `dptools.benchkit`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import redis
from dataproc_shared import avro
from dataproc_shared.config import load_settings
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.partitioning import instrument_key, partition_for
from normalization.transform import Lineage, NormalizedTick, parse_tick
from projection.app import build_processor
from projection.settings import ProjectionSettings

from dptools import benchkit
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


def encoded(count: int, run: str, topics: dict[str, str], spread: int, sent: dict[str, int]
            ) -> Iterator[tuple[str, bytes, bytes]]:
    """The backlog as (topic, key, Avro value); counts the records per schema in `sent`."""
    for schema, key, record in backlog(count, run, spread):
        sent[schema] = sent.get(schema, 0) + 1
        topic = topics["ticks"] if schema == "enriched_tick" else topics["bars"]
        yield topic, key, avro.encode(schema, record)


def _delete_keys(url: str, run: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"md:*:bench-{run}-*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        return len(keys)
    finally:
        client.close()


async def bench(count: int, partitions: int, spread: int = 1, rounds: int = 1) -> dict[str, Any]:
    """Create topics, produce the backlog, drain it with the relay and the service; return figures."""
    run = benchkit.run_id()
    topics = {"ticks": f"bench-enriched-{run}", "bars": f"bench-bars-{run}", "relay": f"bench-relay-{run}",
              "deadletter": f"bench-dlq-{run}"}
    base = load_settings(ProjectionSettings, service="projection")
    try:
        with benchkit.bench_topics(base, topics, partitions):
            sent = {"enriched_tick": 0, "bar": 0}
            produce_s = benchkit.produce(base.kafka_bootstrap, encoded(count, run, topics, spread, sent),
                                         lambda key: partition_for(key, partitions))
            inputs = [topics["ticks"], topics["bars"]]
            overrides = {"enriched": topics["ticks"], "bars": topics["bars"],
                         "deadletter": topics["deadletter"], "partitions": partitions}
            last: dict[str, Any] = {}

            async def relay(round_no: int) -> benchkit.Drained:
                settings = benchkit.bench_settings(base, "relay", f"{run}-{round_no}", overrides)
                return await benchkit.relay_drain(settings, topics["relay"], count, inputs,
                                                  until_stopped=True)

            async def projection(round_no: int) -> benchkit.Drained:
                settings = benchkit.bench_settings(base, "projection", f"{run}-{round_no}", overrides)
                metrics = ServiceMetrics("projection")
                processor = build_processor(settings, metrics)
                await processor.start()
                try:
                    # The last cycle (and its Redis flush) commits before the loop returns.
                    drained = await benchkit.drain(settings, processor, metrics, count, inputs,
                                                   until_stopped=True)
                finally:
                    await processor.close()
                last.update(
                    redis_writes=benchkit.counter_totals(metrics, "dp_redis_writes", ("key_type", "outcome")),
                    redis_flushes=processor.flushes,
                    projection_process_s=round(processor.process_seconds, 2),
                    projection_flush_s=round(processor.flush_seconds, 2),
                )
                return drained

            relay_runs, proj_runs = await benchkit.alternate(rounds, relay, projection)
            return {
                **benchkit.setup(base, count, partitions, produce_s),
                "ticks": sent["enriched_tick"],
                "bars": sent["bar"],
                "spread": spread,
                **benchkit.throughput("projection", count, relay_runs, proj_runs),
                **last,
                **benchkit.machine(),
            }
    finally:
        if base.redis_url is not None:
            _delete_keys(base.redis_url.get_secret_value(), run)


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = benchkit.cli(__doc__, default_records=100_000, default_rounds=1)
    parser.add_argument("--spread", type=int, default=1,
                        help="deal each real instrument over this many instrument ids (less coalescing)")
    args = parser.parse_args(argv)
    partitions = args.partitions or load_settings(ProjectionSettings, service="projection").topics.partitions
    result = asyncio.run(bench(args.records, partitions, args.spread, max(1, args.rounds)))
    benchkit.emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
