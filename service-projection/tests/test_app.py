from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions
from dataproc_shared import avro
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import InRecord
from projection.app import (
    ProjectionMetrics,
    ProjectionProcessor,
    RedisUnavailable,
    backoff_delays,
)
from projection.redis_sink import WriteOutcome
from projection.settings import ProjectionOptions
from projection.transform import InputTopics, KeyType, Write

TS = 1_763_908_200_123_456_789


class FakeSink:
    """Records what it is asked to apply; fails the first `failures` calls like an unreachable Redis."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[list[Write]] = []

    async def load_scripts(self) -> None:
        if self.failures:
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6399.")

    async def ping(self) -> bool:
        return self.failures == 0

    async def apply(self, writes: list[Write]) -> WriteOutcome:
        self.calls.append(list(writes))
        if self.failures:
            self.failures -= 1
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6399.")
        outcome = WriteOutcome()
        outcome.applied[KeyType.TICK] += len(writes)
        return outcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def tick_record(offset: int, price: float, iid: str = "I1") -> InRecord:
    value = avro.encode("enriched_tick", {
        "instrument_id": iid, "venue": "XNYM", "venue_symbol": "CLZ6", "symbol": "CL", "asset_class": "fut",
        "currency": "USD", "tick_size": None, "multiplier": None, "venue_timezone": "UTC", "kind": "TRADE",
        "ts_ns": TS + offset, "seq": None, "trade_id": None, "price": price, "size": 1.0, "bid": None,
        "ask": None, "bid_size": None, "ask_size": None, "ingest_ns": TS, "source_partition": 0,
        "source_offset": offset})
    return InRecord(topic="ticks", partition=0, offset=offset, key=b"XNYM:CLZ6", value=value, timestamp_ms=0)


def make(sink: FakeSink, clock: Clock, metrics: ServiceMetrics | None = None,
         **opts: Any) -> ProjectionProcessor:
    on_health = opts.pop("on_health", None)
    defaults: dict[str, Any] = {"retry_initial_ms": 100, "retry_max_ms": 400, "flush_deadline_s": 2.0}
    options = ProjectionOptions(**{**defaults, **opts})
    return ProjectionProcessor(sink, InputTopics(ticks="ticks", bars="bars"), options,  # type: ignore[arg-type]
                               ProjectionMetrics(metrics or ServiceMetrics("projection")), sleep=clock.sleep,
                               monotonic=clock.monotonic, on_health=on_health)


def test_backoff_doubles_to_the_cap() -> None:
    delays = backoff_delays(0.1, 0.5)
    assert [delays() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


async def test_batch_is_coalesced_and_flushed_once_before_commit() -> None:
    sink, clock, metrics = FakeSink(), Clock(), ServiceMetrics("projection")
    proc = make(sink, clock, metrics)
    result = await proc.process([tick_record(i, float(i)) for i in range(10)])
    assert result.dead_letters == []
    assert sink.calls == []  # nothing reaches Redis before the commit point
    await proc.before_commit()
    assert len(sink.calls) == 1
    assert len(sink.calls[0]) == 1  # ten trades of one instrument: only the newest can survive
    assert dict(sink.calls[0][0].fields)["trade_price"] == "9.0"  # type: ignore[union-attr]
    assert metrics.registry.get_sample_value("dp_redis_writes_total", {
        "service": "projection", "key_type": "tick", "outcome": "applied"}) == 1.0
    await proc.before_commit()
    assert len(sink.calls) == 1  # nothing pending any more


async def test_redis_down_retries_with_backoff_then_recovers() -> None:
    sink, clock, metrics = FakeSink(failures=3), Clock(), ServiceMetrics("projection")
    reports: list[bool] = []
    proc = make(sink, clock, metrics, on_health=lambda up, _detail: reports.append(up))
    await proc.process([tick_record(1, 1.0)])
    await proc.before_commit()
    assert clock.sleeps == [0.1, 0.2, 0.4]
    assert len(sink.calls) == 4
    assert proc.health.up
    assert proc.flushes == 1
    labels = {"service": "projection", "dependency": "redis"}
    assert metrics.registry.get_sample_value("dp_dependency_up", labels) == 1
    assert reports[:3] == [False, False, False]
    assert reports[-1] is True


async def test_redis_down_past_deadline_aborts_and_replay_resends() -> None:
    sink, clock = FakeSink(failures=100), Clock()
    proc = make(sink, clock)
    await proc.process([tick_record(1, 1.0)])
    with pytest.raises(RedisUnavailable, match="ConnectionError"):
        await proc.before_commit()
    assert not proc.health.up
    assert "6399" in proc.health.detail
    assert sum(clock.sleeps) <= 2.0
    await proc.on_abort()
    await proc.before_commit()  # nothing pending after the abort
    calls = len(sink.calls)
    assert calls > 1
    sink.failures = 0
    await proc.process([tick_record(1, 1.0)])  # the loop's replay of the same records
    await proc.before_commit()
    assert len(sink.calls) == calls + 1
    assert proc.health.up


async def test_start_and_idle_ping_report_health() -> None:
    sink, clock = FakeSink(failures=1), Clock()
    proc = make(sink, clock)
    await proc.start()
    assert not proc.health.up
    sink.failures = 0
    await proc.on_tick()
    assert proc.health.up
    sink.failures = 1
    await proc.on_tick()  # within the ping interval: no new check
    assert proc.health.up
    clock.now += 10
    await proc.on_tick()
    assert not proc.health.up


async def test_error_reply_is_retried_not_spun_on() -> None:
    class WrongTypeSink(FakeSink):
        async def apply(self, writes: list[Write]) -> WriteOutcome:
            self.calls.append(list(writes))
            raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    sink, clock = WrongTypeSink(), Clock()
    proc = make(sink, clock)
    await proc.process([tick_record(1, 1.0)])
    with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
        await proc.before_commit()
    assert clock.sleeps[:3] == [0.1, 0.2, 0.4]  # backoff, not a hot loop
    assert not proc.health.up
