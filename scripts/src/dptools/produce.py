"""Tick producer: synthetic ticks for the reference-data instruments, or a replay of a file.

    uv run python -m dptools.produce synthetic --count 100000 --rate 5000 --seed 7
    uv run python -m dptools.produce replay ticks.jsonl --paced --speed 10
    uv run python -m dptools.produce synthetic --count 1000 --out sample.jsonl   # to a file

Records go to `ingestion.market.raw.v1` (or `--topic`) keyed `VENUE:SYMBOL`, partitioned with
Kafka's murmur2 partitioner like the services. Settings come from `DATA_PROC_*` (`.stack/env`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from confluent_kafka import Producer
from tqdm import tqdm

from dptools.ticks import GeneratorConfig, Instrument, RawTick, generate

RAW_TOPIC = "ingestion.market.raw.v1"


def load_instruments_from_postgres(dsn: str) -> list[Instrument]:
    """Active instruments of the reference data (the ones enrichment will resolve)."""
    import asyncpg  # local import: only this path needs PostgreSQL

    async def fetch() -> list[Instrument]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT i.venue, i.venue_symbol, i.asset_class, coalesce(i.tick_size, 0.01)::float8 AS tick "
                "FROM instruments i JOIN venues v ON v.mic = i.venue "
                "WHERE i.active AND v.active ORDER BY i.instrument_id"
            )
        finally:
            await conn.close()
        return [Instrument(r["venue"], r["venue_symbol"], r["asset_class"], float(r["tick"])) for r in rows]

    return asyncio.run(fetch())


def read_replay_file(path: Path) -> Iterator[tuple[bytes, bytes, int]]:
    """Raw ticks from JSON lines or CSV (header with the raw-tick field names) as (key, value, ts_ns)."""
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                body = {k: v for k, v in row.items() if v not in (None, "")}
                yield _key(body), json.dumps(body).encode(), _ts_hint(body)
        return
    with path.open("rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                body = json.loads(line)
            except ValueError:
                yield b"", line, 0  # replayed as-is: normalization dead-letters it
                continue
            yield _key(body) if isinstance(body, dict) else b"", line, _ts_hint(body)


def _key(body: dict[str, object]) -> bytes:
    venue = str(body.get("venue", "")).strip().upper()
    return f"{venue}:{str(body.get('symbol', '')).strip().upper()}".encode()


def _ts_hint(body: object) -> int:
    """Best-effort event time in ns for pacing (0 when unknown; normalization does the real parsing)."""
    if not isinstance(body, dict):
        return 0
    ts = body.get("ts")
    try:
        value = float(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0
    for scale in (1e9, 1e6, 1e3, 1.0):
        if value * scale < 1e19 and value * scale > 1e17:
            return int(value * scale)
    return 0


class KafkaSink:
    """Produces raw ticks with the same partitioner as the services."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.errors = 0
        self._producer = Producer({
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "compression.type": "lz4",
            "enable.idempotence": True,
        })

    def _on_delivery(self, err: object, _msg: object) -> None:
        if err is not None:
            self.errors += 1

    def send(self, key: bytes, value: bytes) -> None:
        """Queue one record, waiting for room when the local queue is full."""
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key or None,
                                       on_delivery=self._on_delivery,
                                       timestamp=time.time_ns() // 1_000_000)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def close(self) -> None:
        """Wait for every record to be delivered."""
        remaining = self._producer.flush(60)
        if remaining:
            raise RuntimeError(f"{remaining} records not delivered")


def pace(records: Iterable[tuple[bytes, bytes, int]], rate: float | None, paced_speed: float | None
         ) -> Iterator[tuple[bytes, bytes, int]]:
    """Release records at a fixed rate per second, or at their own timestamps sped up by a factor."""
    start = time.perf_counter()
    first_ts: int | None = None
    for n, rec in enumerate(records):
        if rate:
            due = start + n / rate
        elif paced_speed and rec[2]:
            first_ts = rec[2] if first_ts is None else first_ts
            due = start + (rec[2] - first_ts) / 1e9 / paced_speed
        else:
            due = 0.0
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield rec


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.produce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topic", default=os.environ.get("DATA_PROC_TOPICS__RAW", RAW_TOPIC))
    parser.add_argument("--bootstrap", default=os.environ.get("DATA_PROC_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--out", type=Path, help="write JSON lines to this file instead of Kafka")
    parser.add_argument("--rate", type=float, help="records per second (default: as fast as possible)")
    parser.add_argument("--no-progress", action="store_true")
    sub = parser.add_subparsers(dest="mode", required=True)

    syn = sub.add_parser("synthetic", help="random-walk ticks for the reference-data instruments")
    syn.add_argument("--count", type=int, default=10_000)
    syn.add_argument("--seed", type=int, default=1)
    syn.add_argument("--span-seconds", type=float, default=None,
                     help="event-time span of the stream, ending now (default: count * 10 ms)")
    syn.add_argument("--quotes", type=float, default=0.4, help="share of quotes")
    syn.add_argument("--malformed", type=float, default=0.0)
    syn.add_argument("--duplicates", type=float, default=0.0)
    syn.add_argument("--out-of-order", type=float, default=0.0)
    syn.add_argument("--late", type=float, default=0.0)
    syn.add_argument("--unknown", type=float, default=0.0)
    syn.add_argument("--instruments", type=int, default=0, help="use only the first N instruments")
    syn.add_argument("--postgres-dsn", default=os.environ.get("DATA_PROC_POSTGRES_DSN", ""))

    rep = sub.add_parser("replay", help="replay a JSON-lines or CSV file of raw ticks")
    rep.add_argument("file", type=Path)
    rep.add_argument("--paced", action="store_true", help="pace by the ticks' own timestamps")
    rep.add_argument("--speed", type=float, default=1.0, help="speed-up factor with --paced")

    args = parser.parse_args(argv)
    counts: Counter[str] = Counter()
    records: Iterable[tuple[bytes, bytes, int]]
    total: int | None = None
    if args.mode == "synthetic":
        if not args.postgres_dsn:
            parser.error("synthetic needs the reference data: set DATA_PROC_POSTGRES_DSN or --postgres-dsn")
        instruments = load_instruments_from_postgres(args.postgres_dsn)
        if args.instruments:
            instruments = instruments[: args.instruments]
        span_ns = int((args.span_seconds or args.count * 0.01) * 1e9)
        step = max(1, span_ns // max(1, args.count))
        cfg = GeneratorConfig(count=args.count, seed=args.seed, start_ns=time.time_ns() - span_ns - 10**9,
                              step_ns=step, quote_share=args.quotes, malformed_share=args.malformed,
                              duplicate_share=args.duplicates, out_of_order_share=args.out_of_order,
                              late_share=args.late, unknown_share=args.unknown)

        def tagged(stream: Iterable[RawTick]) -> Iterator[tuple[bytes, bytes, int]]:
            for tick in stream:
                counts[tick.tag.value] += 1
                yield tick.key, tick.value, tick.ts_ns

        records, total = tagged(generate(instruments, cfg)), args.count
    else:
        records = read_replay_file(args.file)

    records = pace(records, args.rate, args.speed if getattr(args, "paced", False) else None)
    bar = tqdm(total=total, unit="tick", disable=args.no_progress or not sys.stderr.isatty())
    sent = 0
    if args.out:
        with args.out.open("wb") as fh:
            for _key_bytes, value, _ts in records:
                fh.write(value + b"\n")
                sent += 1
                bar.update()
    else:
        sink = KafkaSink(args.bootstrap, args.topic)
        for key, value, _ts in records:
            sink.send(key, value)
            sent += 1
            bar.update()
        sink.close()
        if sink.errors:
            print(f"{sink.errors} records failed delivery", file=sys.stderr)
            return 1
    bar.close()
    detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) if counts else ""
    where = str(args.out) if args.out else f"{args.topic} @ {args.bootstrap}"
    print(f"produced {sent} raw ticks to {where}" + (f" ({detail})" if detail else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
