"""The loop survives a transactional call that never returns (librdkafka#5456), on the real broker.

After a broker restart librdkafka can block in `send_offsets_to_transaction` forever. That hang
cannot be triggered on demand, so the first such call of the loop's producer is made to block (a
`Producer` subclass: the real client otherwise, the real broker, real transactions). The loop must
abandon that producer after its deadline, continue with a new one under the same transactional id
(which fences the old one and aborts its open transaction) and deliver every record exactly once,
without a process restart.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from dataproc_shared.config import load_settings
from dataproc_shared.kafka import loop as loop_module
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import InRecord
from dataproc_shared.testing import unique_name

pytestmark = pytest.mark.integration

N = 40


class _HangOnce(Producer):
    """The first `send_offsets_to_transaction` of the process blocks until released."""

    hung = threading.Event()
    release = threading.Event()

    def send_offsets_to_transaction(self, *args: Any, **kwargs: Any) -> None:
        if not _HangOnce.hung.is_set():
            _HangOnce.hung.set()
            _HangOnce.release.wait(120)
            return
        super().send_offsets_to_transaction(*args, **kwargs)


def test_hung_send_offsets_is_abandoned_and_every_record_delivered_once(
    monkeypatch: pytest.MonkeyPatch, topic_factory: Callable[..., str], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    monkeypatch.setattr(loop_module, "Producer", _HangOnce)
    monkeypatch.setattr(loop_module, "TXN_CALL_DEADLINE_S", 3.0)
    source, sink = topic_factory("hung-in", 2), topic_factory("hung-out", 2)
    settings = load_settings(service="hungtest", kafka_bootstrap=kafka_bootstrap,
                             instance_id=unique_name("i"), kafka={"group_id": unique_name("g")},
                             loop={"transaction_timeout_ms": 10_000, "batch_timeout_ms": 50})
    metrics = ServiceMetrics("hungtest")
    kafka_loop = KafkaLoop(settings, PassthroughProcessor(sink), input_topics=[source], metrics=metrics)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(N):
        producer.produce(source, b"v%d" % i, b"k%d" % i)
    assert producer.flush(30) == 0

    async def scenario() -> list[InRecord]:
        stop = asyncio.Event()
        task = asyncio.create_task(kafka_loop.run(stop))
        try:
            out: list[InRecord] = []
            for _ in range(120):
                await asyncio.sleep(0.5)
                assert not task.done(), "the loop ended"
                out = await asyncio.to_thread(consume_all, [sink], timeout=20)
                if len(out) >= N:
                    break
            return out
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    try:
        out = asyncio.run(scenario())
    finally:
        _HangOnce.release.set()
    assert _HangOnce.hung.is_set()
    assert len(kafka_loop._abandoned) == 1
    assert Counter(r.value for r in out) == Counter(b"v%d" % i for i in range(N))  # each exactly once
    text = metrics.render().decode()
    assert 'dp_abandoned_producers_total{service="hungtest"} 1.0' in text
    assert 'dp_transactions_total{outcome="failed",service="hungtest"} 1.0' in text


class _HangAfterSending(Producer):
    """The first `send_offsets_to_transaction` really runs, then blocks before returning.

    The offsets are part of the open transaction at the broker (`AddOffsetsToTxn`, and a pending
    `TxnOffsetCommit` at the group coordinator) when the loop abandons the producer: the case of
    the broker fault runs, where the request got through and librdkafka never returned.
    """

    hung = threading.Event()
    release = threading.Event()

    def send_offsets_to_transaction(self, *args: Any, **kwargs: Any) -> None:
        super().send_offsets_to_transaction(*args, **kwargs)
        if not _HangAfterSending.hung.is_set():
            _HangAfterSending.hung.set()
            _HangAfterSending.release.wait(120)


def test_abandoned_after_the_offsets_reached_the_broker_every_record_is_read_again_once(
    monkeypatch: pytest.MonkeyPatch, topic_factory: Callable[..., str], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    """The rolled-back cycle's records are read again after the producer is abandoned.

    The new producer's `init_transactions` aborts the old transaction, its pending offset commit
    included; the rewind reads the committed offsets (stable again) and the records of the cycle
    come out exactly once, through the new producer, with records arriving after it too.
    """
    monkeypatch.setattr(loop_module, "Producer", _HangAfterSending)
    monkeypatch.setattr(loop_module, "TXN_CALL_DEADLINE_S", 3.0)
    source, sink = topic_factory("hungsent-in", 3), topic_factory("hungsent-out", 3)
    settings = load_settings(service="hungtest", kafka_bootstrap=kafka_bootstrap,
                             instance_id=unique_name("i"), kafka={"group_id": unique_name("g")},
                             loop={"transaction_timeout_ms": 10_000, "batch_timeout_ms": 50})
    metrics = ServiceMetrics("hungtest")
    kafka_loop = KafkaLoop(settings, PassthroughProcessor(sink), input_topics=[source], metrics=metrics)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(N):
        producer.produce(source, b"v%d" % i, b"k%d" % i)
    assert producer.flush(30) == 0

    async def scenario() -> list[InRecord]:
        stop = asyncio.Event()
        task = asyncio.create_task(kafka_loop.run(stop))
        try:
            out: list[InRecord] = []
            for i in range(240):
                await asyncio.sleep(0.5)
                assert not task.done(), "the loop ended"
                if i == 10:  # after the abandonment: more records on every partition
                    for j in range(N, 2 * N):
                        producer.produce(source, b"v%d" % j, b"k%d" % j)
                    assert producer.flush(30) == 0
                out = await asyncio.to_thread(consume_all, [sink], timeout=20)
                if len(out) >= 2 * N and kafka_loop._abandoned:
                    break
            await asyncio.sleep(2)  # anything written twice would show up now
            return await asyncio.to_thread(consume_all, [sink], timeout=20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    try:
        out = asyncio.run(scenario())
    finally:
        _HangAfterSending.release.set()
    assert _HangAfterSending.hung.is_set()
    assert len(kafka_loop._abandoned) == 1
    assert Counter(r.value for r in out) == Counter(b"v%d" % i for i in range(2 * N))  # each exactly once
    text = metrics.render().decode()
    assert 'dp_abandoned_producers_total{service="hungtest"} 1.0' in text
    assert kafka_loop._consumer_restarts == []  # the rewind read the committed offsets itself
