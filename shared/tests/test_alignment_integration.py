"""Event-time alignment on the real broker: a skewed multi-partition backlog merged into one partition.

Three input partitions hold the same number of records, but their event time advances at very
different rates (1 ms, 5 ms and 25 ms per record), as raw partitions with Zipf-skewed instruments
do. A small processor merges them into one output partition, as normalization does when it
re-partitions by instrument. Downstream, the output partition's watermark is the highest event
time seen on it; a record behind it by more than the allowed lateness would be a late trade.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Producer
from dataproc_shared.config import Settings, load_settings
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import BatchResult, InRecord, OutRecord

pytestmark = pytest.mark.integration

PER_PARTITION = 1_500
STEP_NS = {0: 1_000_000, 1: 5_000_000, 2: 25_000_000}
BASE_NS = 1_763_900_000 * 10**9
BOUND_MS = 500


class MergingProcessor:
    """Forwards every record to partition 0 of `output` as `partition:offset:ts`, reporting event times.

    `fail_commit_at` makes the n-th `before_commit` raise once (an aborted transaction mid-stream).
    `advances` collects, per batch and input partition, how far the batch moved the partition's
    event time (its last record's minus the previous batch's last record's).
    """

    def __init__(self, output: str, fail_commit_at: int = 0) -> None:
        self.output = output
        self.fail_commit_at = fail_commit_at
        self.commits = 0
        self.advances: list[int] = []
        self._reached: dict[tuple[str, int], int] = {}

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        pass

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        pass

    async def process(self, batch: list[InRecord]) -> BatchResult:
        result = BatchResult()
        first: dict[tuple[str, int], int] = {}
        for rec in batch:
            ts = int(rec.value or b"0")
            tp = (rec.topic, rec.partition)
            first.setdefault(tp, ts)
            result.event_time_ns[tp] = ts
            value = b"%d:%d:%d" % (rec.partition, rec.offset, ts)
            result.outputs.append(OutRecord(self.output, rec.key, value, partition=0))
        for tp, ts in first.items():
            last = result.event_time_ns[tp]
            self.advances.append(last - self._reached.get(tp, ts))
            self._reached[tp] = last
        return result

    async def on_tick(self) -> BatchResult:
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        self.commits += 1
        if self.commits == self.fail_commit_at:
            raise RuntimeError("injected sink failure")
        return BatchResult()

    async def on_abort(self) -> None:
        pass


def _produce_backlog(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(PER_PARTITION):
        for partition, step in STEP_NS.items():
            producer.produce(topic, b"%d" % (BASE_NS + i * step), b"K%d" % partition, partition=partition)
    assert producer.flush(30) == 0


@pytest.fixture
def backlog(topic_factory: Callable[..., str], kafka_bootstrap: str,
            monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(source, sink): the skewed backlog on three partitions, an empty one-partition output; audit off."""
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    source, sink = topic_factory("align-in", 3), topic_factory("align-out", 1)
    _produce_backlog(kafka_bootstrap, source)
    return source, sink


def _settings(bootstrap: str, align_ms: int, group: str | None = None, **loop: int) -> Settings:
    """Small batches, alignment bound `align_ms` (0 = off); a fresh consumer group unless `group`."""
    return load_settings(service="aligntest", instance_id=uuid.uuid4().hex[:8], kafka_bootstrap=bootstrap,
                         kafka={"group_id": group or f"align-{uuid.uuid4().hex}"},
                         loop={"batch_size": 20, "batch_timeout_ms": 50, "align_max_ahead_ms": align_ms,
                               "align_max_pause_ms": 10_000, **loop})


async def _drain(settings: Settings, processor: MergingProcessor, source: str,
                 consume_all: Callable[..., list[InRecord]], sink: str) -> tuple[list[InRecord], KafkaLoop]:
    loop = KafkaLoop(settings, processor, input_topics=[source], metrics=ServiceMetrics("aligntest"))
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        outputs = await asyncio.to_thread(consume_all, [sink], expected=3 * PER_PARTITION, timeout=120)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return outputs, loop


def _max_lateness_ns(outputs: list[InRecord]) -> int:
    """Largest distance of a record behind the watermark (highest event time before it) of the topic."""
    return _lateness(outputs)[0]


def _lateness(outputs: list[InRecord]) -> tuple[int, str]:
    """The largest lateness and, to explain a failure, the record that has it and the watermark's."""
    watermark, worst, where, wm_from = 0, 0, "", b""
    for index, rec in enumerate(outputs):
        value = rec.value or b""
        ts = int(value.split(b":")[2])
        if watermark - ts > worst:
            worst, where = watermark - ts, f"#{index} {value!r} behind {wm_from!r}"
        if ts > watermark:
            watermark, wm_from = ts, value
    return worst, where


def _assert_exactly_once(outputs: list[InRecord]) -> None:
    seen = [tuple(int(x) for x in (rec.value or b"").split(b":")[:2]) for rec in outputs]
    assert len(seen) == len(set(seen)) == 3 * PER_PARTITION
    assert set(seen) == {(p, o) for p in STEP_NS for o in range(PER_PARTITION)}


async def test_without_alignment_the_fast_partition_overtakes_the_others(
    backlog: tuple[str, str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
) -> None:
    source, sink = backlog
    settings = _settings(kafka_bootstrap, 0)
    outputs, _ = await _drain(settings, MergingProcessor(sink), source, consume_all, sink)
    _assert_exactly_once(outputs)
    # far beyond an allowed lateness of 5 s: these would be late trades downstream
    assert _max_lateness_ns(outputs) > 5 * 10**9


async def test_alignment_keeps_every_record_within_the_bound_exactly_once_across_an_abort(
    backlog: tuple[str, str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
) -> None:
    source, sink = backlog
    processor = MergingProcessor(sink, fail_commit_at=40)
    outputs, loop = await _drain(_settings(kafka_bootstrap, BOUND_MS), processor, source, consume_all, sink)
    _assert_exactly_once(outputs)
    assert processor.commits > 40  # the abort happened, while partitions were paused
    alignment = loop._alignment
    assert alignment is not None
    assert alignment.pauses > 0
    # A partition overshoots the bound by at most how far one batch advances its event time.
    slack = max(processor.advances)
    assert slack <= 20 * max(STEP_NS.values())
    lateness, where = _lateness(outputs)
    assert lateness <= BOUND_MS * 1_000_000 + slack, (lateness, slack, where)


async def test_alignment_keeps_exactly_once_when_a_second_instance_joins_and_leaves(
    backlog: tuple[str, str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
) -> None:
    source, sink = backlog
    group = f"align-{uuid.uuid4().hex}"

    def loop() -> KafkaLoop:
        settings = _settings(kafka_bootstrap, BOUND_MS, group, session_timeout_ms=6_000)
        return KafkaLoop(settings, MergingProcessor(sink), input_topics=[source],
                         metrics=ServiceMetrics("aligntest"))

    first, second = loop(), loop()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    task_first = asyncio.create_task(first.run(stop_first))
    try:
        while first.committed_cycles < 30:
            await asyncio.sleep(0.05)
        task_second = asyncio.create_task(second.run(stop_second))
        while second.committed_cycles < 20:
            await asyncio.sleep(0.05)
        stop_second.set()
        await asyncio.wait_for(task_second, 60)
        outputs = await asyncio.to_thread(consume_all, [sink], expected=3 * PER_PARTITION, timeout=120)
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(task_first, 60)
    _assert_exactly_once(outputs)
    alignment = first._alignment
    assert alignment is not None
    assert alignment.pauses > 0
