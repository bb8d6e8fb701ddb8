"""The processor over encoded records, without servers (the changelog store is used in memory only)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aggregation.app import AggregationProcessor
from aggregation.settings import AggregationOptions
from aggregation.transform import NS_PER_S, decode_instrument_state
from dataproc_shared import avro
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import DeadLetterReason, InRecord
from dataproc_shared.state import ChangelogStore
from pydantic import ValidationError

MIN = 60 * NS_PER_S


def enriched(ts_ns: int, price: float | None, size: float | None = 1.0, kind: str = "TRADE") -> bytes:
    doc: dict[str, Any] = {
        "instrument_id": "CLZ6.XNYM", "venue": "XNYM", "venue_symbol": "CLZ6", "symbol": "CL",
        "asset_class": "future", "currency": "USD", "tick_size": 0.01, "multiplier": 1000.0,
        "venue_timezone": "America/New_York", "kind": kind, "ts_ns": ts_ns, "seq": None, "trade_id": None,
        "price": price, "size": size, "bid": None, "ask": None, "bid_size": None, "ask_size": None,
        "ingest_ns": ts_ns + 5, "source_partition": 2, "source_offset": 9,
    }
    return avro.encode("enriched_tick", doc)


def rec(offset: int, value: bytes | None, partition: int = 2) -> InRecord:
    return InRecord("in", partition, offset, b"XNYM:CLZ6", value, 0)


class Clock:
    now = 10**18

    def __call__(self) -> int:
        return self.now


def make() -> tuple[AggregationProcessor, ChangelogStore]:
    store = ChangelogStore(topic="cl", kafka_config={}, codec="bytes")
    opts = AggregationOptions(intervals=("1m",), allowed_lateness_ms=0, update_interval_ms=0)
    proc = AggregationProcessor(config=opts.window_config(), input_topic="in", bars_topic="bars",
                                store=store, clock=Clock())
    return proc, store


async def test_bars_dead_letters_and_changelog() -> None:
    proc, _ = make()
    res = await proc.process([
        rec(0, enriched(MIN, 10.0, 2.0)),
        rec(1, enriched(MIN + 1, None, None, kind="QUOTE")),
        rec(2, b"garbage"),
        rec(3, enriched(MIN + 2, None, 1.0)),
        rec(4, enriched(2 * MIN + 1, 11.0)),  # closes the first minute
        rec(5, enriched(MIN + 3, 99.0)),  # late
    ])
    bars = [avro.decode(o.value or b"", "bar") for o in res.outputs]
    assert all(o.topic == "bars" and o.key == b"XNYM:CLZ6" and o.partition == 2 for o in res.outputs)
    finals = [b for b in bars if b["is_final"]]
    assert len(finals) == 1
    f = finals[0]
    assert (f["open"], f["close"], f["volume"], f["trade_count"], f["version"]) == (10.0, 10.0, 2.0, 1, 2)
    assert (f["window_start_ms"], f["window_end_ms"]) == (60_000, 120_000)
    assert (f["source_partition"], f["offset_from"], f["offset_to"]) == (2, 0, 0)
    assert f["symbol"] == "CL"
    updates = [b for b in bars if not b["is_final"]]
    assert [(u["window_start_ms"], u["version"]) for u in updates] == [(120_000, 1)]
    reasons = [(d.source.offset, d.reason) for d in res.dead_letters]
    assert reasons == [(2, DeadLetterReason.UNDECODABLE), (3, DeadLetterReason.UNDECODABLE),
                       (5, DeadLetterReason.LATE_TRADE)]
    changes = (await proc.before_commit()).outputs
    keys = {c.key: c.value for c in changes}
    assert keys[b"meta"] is not None
    assert orjson.loads(keys[b"meta"] or b"")["wm"] == 2 * MIN + 1
    # one entry for the instrument, holding its one open window
    [window] = decode_instrument_state(keys[b"i|CLZ6.XNYM"] or b"")
    assert (window.interval, window.start, window.count) == ("1m", 2 * MIN, 1)
    assert all(c.topic == "cl" and c.partition == 2 for c in changes)
    assert (await proc.before_commit()).outputs == []


def test_update_cadence_per_interval_from_the_settings() -> None:
    opts = AggregationOptions(intervals=("1m", "1h"), update_interval_ms=2000,
                              update_intervals_ms={"1h": 15000})
    config = opts.window_config()
    assert (config.update_every_ns("1m"), config.update_every_ns("1h")) == (2 * NS_PER_S, 15 * NS_PER_S)
    with pytest.raises(ValidationError, match="not among the intervals"):
        AggregationOptions(intervals=("1m",), update_intervals_ms={"5m": 1000})
    with pytest.raises(ValidationError):
        AggregationOptions(intervals=("1m",), update_intervals_ms={"1m": -1})


async def test_idle_timer_closes_ended_windows_and_counts_the_open_ones() -> None:
    clock = Clock()
    clock.now = 1_000 * NS_PER_S
    metrics = ServiceMetrics("aggregation")
    store = ChangelogStore(topic="cl", kafka_config={}, codec="bytes")
    opts = AggregationOptions(intervals=("1m", "1h"), allowed_lateness_ms=5_000, idle_timeout_ms=10_000)
    proc = AggregationProcessor(config=opts.window_config(), input_topic="in", bars_topic="bars",
                                store=store, metrics=metrics, clock=clock)
    await proc.process([rec(0, enriched(955 * NS_PER_S, 10.0))])  # minute [900 s, 960 s), hour [0, 3600 s)
    clock.now = 1_011 * NS_PER_S
    res = await proc.on_tick()
    finals = [b for b in (avro.decode(o.value or b"", "bar") for o in res.outputs) if b["is_final"]]
    assert [(b["interval"], b["window_start_ms"]) for b in finals] == [("1m", 900_000)]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"service": "aggregation", **labels})

    assert sample("dp_idle_closed_windows_total", interval="1m") == 1
    assert sample("dp_idle_closed_windows_total", interval="1h") is None
    assert sample("dp_idle_open_windows") == 1  # the hour: its close (3605 s) lies ahead
    clock.now = 3_606 * NS_PER_S
    res = await proc.on_tick()
    assert [avro.decode(o.value or b"", "bar")["interval"] for o in res.outputs] == ["1h"]
    assert sample("dp_idle_closed_windows_total", interval="1h") == 1
    assert sample("dp_idle_open_windows") == 0


def test_default_update_cadences_follow_the_configured_intervals() -> None:
    # unset: 5m every 5 s and 1h every 15 s, the rest at update_interval_ms
    assert AggregationOptions().update_cadences_ms() == {"1m": 1000, "5m": 5000, "1h": 15000}
    # intervals without a default cadence take update_interval_ms; no error for the defaults' names
    assert AggregationOptions(intervals=("1m", "15m")).update_cadences_ms() == {"1m": 1000, "15m": 1000}
    assert AggregationOptions(intervals=("1m", "5m"), update_interval_ms=200).update_cadences_ms() == {
        "1m": 200, "5m": 5000}
    # a slower general cadence is never made faster by the defaults
    assert AggregationOptions(update_interval_ms=30_000).update_cadences_ms() == {
        "1m": 30_000, "5m": 30_000, "1h": 30_000}
    # set explicitly (even empty) it replaces the defaults
    assert AggregationOptions(update_intervals_ms={}).update_cadences_ms() == {
        "1m": 1000, "5m": 1000, "1h": 1000}
    assert AggregationOptions(update_intervals_ms={"1h": 60_000}).update_cadences_ms() == {
        "1m": 1000, "5m": 1000, "1h": 60_000}
    config = AggregationOptions().window_config()
    assert [config.update_every_ns(n) for n in ("1m", "5m", "1h")] == [NS_PER_S, 5 * NS_PER_S, 15 * NS_PER_S]
