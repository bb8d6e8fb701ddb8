"""`serve` in-process over the real broker: readiness, metrics, ticks, header propagation, clean stop."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Producer
from dataproc_shared.config import load_settings
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.records import CORRELATION_HEADER, INGEST_TIME_HEADER, BatchResult, InRecord, OutRecord
from dataproc_shared.service import ServiceContext, serve

pytestmark = pytest.mark.integration


class TickingPassthrough(PassthroughProcessor):
    """Pass-through that also emits one `tick` record on its first idle tick."""

    def __init__(self, output_topic: str) -> None:
        super().__init__(output_topic)
        self.ticks = 0
        self.assigned: list[tuple[str, int]] = []

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self.assigned.extend(partitions)

    async def on_tick(self) -> BatchResult:
        self.ticks += 1
        if self.ticks == 1:
            return BatchResult(outputs=[OutRecord(self.output_topic, b"tick", b"tick", partition=0)])
        return BatchResult()


async def test_serve_runs_the_loop_with_health_metrics_and_ticks(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, sink = topic_factory("svc-in", 2), topic_factory("svc-out", 2)
    deadletter = topic_factory("svc-dlq", 1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(30):
        producer.produce(source, b"v%d" % i, b"XNYM:K%d" % (i % 5),
                         headers=[(CORRELATION_HEADER, b"cid-%d" % i)] if i % 2 else None)
    assert producer.flush(30) == 0
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    settings = load_settings(service="svcint", instance_id=uuid.uuid4().hex[:8],
                             kafka_bootstrap=kafka_bootstrap, topics={"deadletter": deadletter},
                             http={"host": "127.0.0.1", "port": 0},
                             kafka={"group_id": f"svc-{uuid.uuid4().hex}"},
                             loop={"tick_interval_ms": 200, "batch_size": 7})
    processor = TickingPassthrough(sink)
    contexts: list[ServiceContext] = []

    def factory(ctx: ServiceContext) -> TickingPassthrough:
        contexts.append(ctx)
        return processor

    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, factory, input_topics=[source], stop=stop))
    outputs = await asyncio.to_thread(consume_all, [sink], expected=31, timeout=60)
    health = contexts[0].health
    async with aiohttp.ClientSession(f"http://127.0.0.1:{health.port}") as http:
        async with http.get("/ready") as resp:
            assert resp.status == 200
        async with http.get("/live") as resp:
            assert resp.status == 200
        async with http.get("/metrics") as resp:
            text = await resp.text()
    assert f'dp_messages_in_total{{service="svcint",topic="{source}"}} 30.0' in text
    assert f'dp_messages_out_total{{service="svcint",topic="{sink}"}}' in text
    assert 'dp_transactions_total{outcome="committed",service="svcint"}' in text
    assert 'dp_rebalances_total{kind="assign",service="svcint"}' in text
    assert sorted(processor.assigned) == [(source, 0), (source, 1)]
    # every step of the committed cycles is timed: 30 records in batches of at most 7
    registry = contexts[0].metrics.registry
    steps = {step: registry.get_sample_value("dp_cycle_step_seconds_count",
                                             {"service": "svcint", "step": step}) or 0.0
             for step in ("consume", "process", "produce", "before_commit", "send_offsets", "commit")}
    assert min(steps.values()) >= 5, steps
    assert (registry.get_sample_value("dp_cycle_step_seconds_sum", {"service": "svcint", "step": "commit"})
            or 0.0) > 0

    stop.set()
    assert await asyncio.wait_for(task, 30) == (0, False)
    assert processor.ticks >= 1
    by_value = {r.value: r for r in outputs}
    assert by_value[b"tick"].key == b"tick"
    for i in range(30):
        rec = by_value[b"v%d" % i]
        headers = dict(rec.headers)
        if i % 2:
            assert headers[CORRELATION_HEADER] == b"cid-%d" % i
        else:
            assert headers[CORRELATION_HEADER].startswith(source.encode() + b"-")
        assert int(headers[INGEST_TIME_HEADER]) > 1_600_000_000 * 10**9


async def test_serve_waits_for_a_missing_topic_then_stops_with_a_clear_error(
    topic_factory: Callable[..., str], kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    port = _free_port()
    settings = load_settings(service="svcint", kafka_bootstrap=kafka_bootstrap,
                             topics={"deadletter": topic_factory("svc-dlq", 1)},
                             http={"host": "127.0.0.1", "port": port}, loop={"startup_topic_wait_s": 4})
    missing = f"no-such-topic-{uuid.uuid4().hex}"
    task = asyncio.create_task(serve(settings, PassthroughProcessor("x"), input_topics=[missing]))
    health = await _health_when(port, _kafka_down)
    assert health["status"] == "unhealthy"
    assert missing in health["dependencies"]["kafka"]["last_error"]
    assert await asyncio.wait_for(task, 60) == (1, False)


async def test_serve_waits_for_an_unreachable_broker_and_stops_cleanly_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    port, nothing = _free_port(), _free_port()
    settings = load_settings(service="svcint", kafka_bootstrap=f"127.0.0.1:{nothing}",
                             http={"host": "127.0.0.1", "port": port}, loop={"startup_backoff_max_s": 1})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, PassthroughProcessor("x"), input_topics=["t"], stop=stop))
    health = await _health_when(port, _kafka_down)
    assert health["status"] == "unhealthy"
    assert f"127.0.0.1:{nothing}" in health["dependencies"]["kafka"]["last_error"]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        async with http.get("/ready") as resp:
            assert resp.status == 503
        async with http.get("/live") as resp:
            assert resp.status == 200
    await asyncio.sleep(3)  # several attempts later it is still waiting, not gone
    assert not task.done()
    stop.set()
    assert await asyncio.wait_for(task, 30) == (0, False)


def _kafka_down(doc: dict[str, Any]) -> bool:
    return bool(doc["dependencies"].get("kafka", {}).get("status") == "down")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _health_when(port: int, condition: Callable[[dict[str, Any]], bool],
                       timeout: float = 30.0) -> dict[str, Any]:
    """The first `/health` document on `port` that satisfies `condition`."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: dict[str, Any] = {}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with http.get("/health") as resp:
                    last = await resp.json()
                if condition(last):
                    return last
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"no such /health within {timeout} s: {last}")


class SlowSinkPassthrough(PassthroughProcessor):
    """Pass-through whose first `before_commit` (a sink flush) takes longer than max.poll.interval.ms."""

    def __init__(self, output_topic: str, delay_s: float) -> None:
        super().__init__(output_topic)
        self.delay_s = delay_s
        self.flushes = 0

    async def before_commit(self) -> BatchResult:
        self.flushes += 1
        if self.flushes == 1:
            await asyncio.sleep(self.delay_s)
        return BatchResult()


async def test_a_slow_sink_pauses_consumption_without_losing_the_group(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, sink = topic_factory("slow-in", 2), topic_factory("slow-out", 2)
    deadletter = topic_factory("slow-dlq", 1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(40):
        producer.produce(source, b"v%d" % i, b"K%d" % (i % 4))
    assert producer.flush(30) == 0
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    settings = load_settings(service="svcslow", instance_id=uuid.uuid4().hex[:8],
                             kafka_bootstrap=kafka_bootstrap, http={"host": "127.0.0.1", "port": 0},
                             topics={"deadletter": deadletter},
                             kafka={"group_id": f"slow-{uuid.uuid4().hex}"},
                             loop={"batch_size": 10, "session_timeout_ms": 6000,
                                   "max_poll_interval_ms": 7000})
    processor = SlowSinkPassthrough(sink, delay_s=12.0)
    contexts: list[ServiceContext] = []

    def factory(ctx: ServiceContext) -> SlowSinkPassthrough:
        contexts.append(ctx)
        return processor

    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, factory, input_topics=[source], stop=stop))
    outputs = await asyncio.to_thread(consume_all, [sink], expected=40, timeout=90)
    registry = contexts[0].metrics.registry
    stop.set()
    assert await asyncio.wait_for(task, 30) == (0, False)
    assert sorted(r.value or b"" for r in outputs) == sorted(b"v%d" % i for i in range(40))
    assert registry.get_sample_value("dp_transactions_total",
                                     {"service": "svcslow", "outcome": "aborted"}) is None
    assert registry.get_sample_value("dp_rebalances_total", {"service": "svcslow", "kind": "revoke"}) is None
    assert processor.flushes > 1
