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
