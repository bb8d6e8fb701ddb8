"""The loop replaces a consumer that cannot go on instead of ending the process (real broker).

Two causes seen in the broker fault runs (`docs/reliability.md`): librdkafka's fatal "static
consumer fenced by other consumer with same group.instance.id" after a broker restart, and a
consumer whose `committed()` keeps timing out so that the rewind after a rolled-back cycle fails.
The first is made for real here: a second consumer joins the group with the loop's
`group.instance.id`, the broker fences the loop's consumer. The second is made by a `Consumer`
subclass whose first `committed()` calls time out (the real client otherwise) after a cycle that
is rolled back. Either way the loop must close the consumer, subscribe a new one, restore through
the usual assignment path and deliver every record exactly once, without ending.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from dataproc_shared.config import Settings, load_settings
from dataproc_shared.kafka import loop as loop_module
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import BatchResult, InRecord
from dataproc_shared.testing import unique_name

pytestmark = pytest.mark.integration

N = 60


class _Tracking(PassthroughProcessor):
    """Passthrough that records assignments and revocations, and can fail `before_commit` once."""

    def __init__(self, output_topic: str) -> None:
        super().__init__(output_topic)
        self.assigned: list[list[tuple[str, int]]] = []
        self.revoked: list[list[tuple[str, int]]] = []
        self.fail_next_commit = False

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self.assigned.append(sorted(partitions))

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.revoked.append(sorted(partitions))

    async def before_commit(self) -> BatchResult:
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise RuntimeError("sink failed once")
        return BatchResult()


def _settings(kafka_bootstrap: str) -> Settings:
    return load_settings(service="replacetest", kafka_bootstrap=kafka_bootstrap,
                         instance_id=unique_name("i"), kafka={"group_id": unique_name("g")},
                         loop={"transaction_timeout_ms": 10_000, "batch_timeout_ms": 50,
                               "session_timeout_ms": 10_000})


def _produce(bootstrap: str, topic: str, values: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in values:
        producer.produce(topic, b"v%d" % i, b"k%d" % i)
    assert producer.flush(30) == 0


async def _until(what: Callable[[], Any], timeout: float, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(what):
        assert not task.done(), "the loop ended"
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def _all_delivered(consume_all: Callable[..., list[InRecord]], sink: str,
                         task: asyncio.Task[None]) -> list[InRecord]:
    """The sink's records once all N are there, read again 2 s later (anything written twice shows then)."""
    await _until(lambda: len(consume_all([sink], timeout=10)) >= N, 120, task)
    await asyncio.sleep(2)
    return await asyncio.to_thread(consume_all, [sink], timeout=10)


def test_a_fenced_static_member_is_replaced_and_every_record_delivered_once(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
) -> None:
    source, sink = topic_factory("fence-in", 2), topic_factory("fence-out", 2)
    settings = _settings(kafka_bootstrap)
    processor = _Tracking(sink)
    kafka_loop = KafkaLoop(settings, processor, input_topics=[source], metrics=ServiceMetrics("replacetest"))
    _produce(kafka_bootstrap, source, range(N // 2))

    async def scenario() -> list[InRecord]:
        stop = asyncio.Event()
        task = asyncio.create_task(kafka_loop.run(stop))
        try:
            await _until(lambda: len(consume_all([sink], timeout=10)) >= N // 2, 120, task)
            # the same group.instance.id joins: the broker fences the loop's consumer (fatal in librdkafka)
            intruder = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": settings.group_id,
                                 "group.instance.id": f"replacetest-{settings.instance_id}",
                                 "enable.auto.commit": False, "session.timeout.ms": 10_000})
            intruder.subscribe([source])
            deadline = time.monotonic() + 60
            while not kafka_loop._consumer_restarts and time.monotonic() < deadline:
                await asyncio.to_thread(intruder.poll, 0.5)
            await asyncio.to_thread(intruder.close)
            assert kafka_loop._consumer_restarts, "the loop's consumer was not replaced"
            _produce(kafka_bootstrap, source, range(N // 2, N))
            return await _all_delivered(consume_all, sink, task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    out = asyncio.run(scenario())
    assert Counter(r.value for r in out) == Counter(b"v%d" % i for i in range(N))  # each exactly once
    assert len(kafka_loop._consumer_restarts) == 1
    every = sorted((source, p) for p in range(2))
    # the replacement revoked what the old consumer had, the new one got it back through on_assign
    assert processor.revoked[0] == every
    assert processor.assigned[0] == every
    assert processor.assigned[-1] == every
    assert len(processor.assigned) >= 2


class _CommittedTimesOut(Consumer):
    """`committed()` of the rewind (`KafkaLoop._rewind`) times out for its first `failures` calls.

    Only the rewind's calls are counted and failed; other callers (the lag and alignment look-ups of
    a partition not consumed yet) get the real client's answer.
    """

    failures = 0
    calls = 0

    def committed(self, *args: Any, **kwargs: Any) -> Any:
        if _called_by("_rewind"):
            _CommittedTimesOut.calls += 1
            if _CommittedTimesOut.calls <= _CommittedTimesOut.failures:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Failed to get committed offsets"))
        return super().committed(*args, **kwargs)


def _called_by(function: str) -> bool:
    """Whether a function named `function` is on the calling thread's stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_a_consumer_whose_committed_offsets_stay_unreadable_is_replaced(
    monkeypatch: pytest.MonkeyPatch, topic_factory: Callable[..., str], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    monkeypatch.setattr(loop_module, "Consumer", _CommittedTimesOut)
    monkeypatch.setattr(_CommittedTimesOut, "failures", loop_module.REWIND_ATTEMPTS)
    monkeypatch.setattr(_CommittedTimesOut, "calls", 0)
    source, sink = topic_factory("rewind-in", 2), topic_factory("rewind-out", 2)
    processor = _Tracking(sink)
    processor.fail_next_commit = True  # the first cycle with records is rolled back
    kafka_loop = KafkaLoop(_settings(kafka_bootstrap), processor, input_topics=[source],
                           metrics=ServiceMetrics("replacetest"))
    _produce(kafka_bootstrap, source, range(N))

    async def scenario() -> list[InRecord]:
        stop = asyncio.Event()
        task = asyncio.create_task(kafka_loop.run(stop))
        try:
            return await _all_delivered(consume_all, sink, task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    out = asyncio.run(scenario())
    # every rewind attempt failed, then a new consumer: no rewind after that (nothing else rolled back)
    assert _CommittedTimesOut.calls == loop_module.REWIND_ATTEMPTS
    assert len(kafka_loop._consumer_restarts) == 1
    assert Counter(r.value for r in out) == Counter(b"v%d" % i for i in range(N))
    assert len(processor.revoked) >= 1
    assert len(processor.assigned) >= 2
