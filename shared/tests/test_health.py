from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from dataproc_shared.config import load_settings
from dataproc_shared.health import HealthServer, sanitize_error
from dataproc_shared.metrics import ServiceMetrics

UP_POSTGRES = 'dp_dependency_up{dependency="postgres",service="enrichment"}'


class Flaky:
    """A dependency check whose outcome the test flips."""

    def __init__(self) -> None:
        self.ok = True
        self.hang = False
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(10)
        if not self.ok:
            raise ConnectionError("connect to postgresql://dataproc:pg-secret@db:5432/reference_data failed")


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    metrics = ServiceMetrics("enrichment")
    srv = HealthServer(
        "enrichment", metrics, instance_id="pod-1", version="1.2.3", port=0,
        live_stall_timeout_s=30.0, check_interval_s=0.05, check_timeout_s=0.2,
    )
    yield srv
    await srv.stop()


async def get(srv: HealthServer, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{srv.port}{path}") as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


async def wait_for_status(srv: HealthServer, path: str, status: int, timeout: float = 3.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        code, body = await get(srv, path)
        if code == status:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} stayed {code}: {body}")
        await asyncio.sleep(0.03)


async def test_ready_waits_for_start_and_flips_with_critical_dependency(server: HealthServer) -> None:
    db = Flaky()
    server.add_check("postgres", db, critical=True)
    await server.start()
    assert server.port > 0
    assert (await get(server, "/ready"))[0] == 503  # not started yet
    server.set_ready()
    server.heartbeat()
    body = await wait_for_status(server, "/health", 200)
    body = await wait_for_status(server, "/ready", 200)
    code, body = await get(server, "/health")
    assert body["status"] == "healthy"
    assert body["service"] == "enrichment"
    assert body["instance_id"] == "pod-1"
    assert body["version"] == "1.2.3"
    dep = body["dependencies"]["postgres"]
    assert dep["status"] == "up"
    assert dep["critical"] is True
    assert dep["latency_ms"] >= 0
    assert dep["last_error"] is None
    assert dep["checked_at"].endswith("Z")

    db.ok = False
    await wait_for_status(server, "/ready", 503)
    code, body = await get(server, "/health")
    assert code == 503
    assert body["status"] == "unhealthy"
    error = body["dependencies"]["postgres"]["last_error"]
    assert error.startswith("ConnectionError: connect to postgresql://dataproc:***@db:5432")
    assert "pg-secret" not in error
    assert f"{UP_POSTGRES} 0.0" in (await get(server, "/metrics"))[1]

    db.ok = True
    await wait_for_status(server, "/ready", 200)
    code, body = await get(server, "/health")
    assert (code, body["status"]) == (200, "healthy")
    assert f"{UP_POSTGRES} 1.0" in (await get(server, "/metrics"))[1]


async def test_non_critical_dependency_degrades_only(server: HealthServer) -> None:
    cache = Flaky()
    cache.ok = False
    server.add_check("redis", cache, critical=False)
    server.set_ready()
    await server.start()
    await asyncio.sleep(0.1)
    server.heartbeat()
    code, body = await get(server, "/health")
    assert (code, body["status"]) == (200, "degraded")
    assert (await get(server, "/ready"))[0] == 200


async def test_check_timeout_marks_dependency_down(server: HealthServer) -> None:
    slow = Flaky()
    slow.hang = True
    server.add_check("clickhouse", slow, timeout_s=0.05)
    status = await server.run_check("clickhouse")
    assert status.status == "down"
    assert status.last_error == "no answer within 0.05 s"


async def test_pushed_status(server: HealthServer) -> None:
    await server.start()
    server.set_ready()
    server.report("kafka", up=True, latency_ms=1.5)
    assert (await get(server, "/ready"))[0] == 200
    server.report("kafka", up=False, error=RuntimeError("broker down: sasl.password=hunter2"))
    code, body = await get(server, "/health")
    assert code == 503
    assert body["dependencies"]["kafka"]["last_error"] == "RuntimeError: broker down: sasl.password=***"
    assert (await get(server, "/ready"))[0] == 503


async def test_live_flips_when_heartbeat_stalls(server: HealthServer) -> None:
    server.live_stall_timeout_s = 0.3
    await server.start()
    server.heartbeat()
    assert (await get(server, "/live"))[0] == 200
    await wait_for_status(server, "/live", 503)
    code, body = await get(server, "/health")
    assert (code, body["status"], body["live"]) == (503, "unhealthy", False)
    server.heartbeat()
    assert (await get(server, "/live"))[0] == 200
    assert "dp_loop_last_tick_timestamp_seconds{service=\"enrichment\"}" in (await get(server, "/metrics"))[1]


async def test_metrics_and_extra_routes(server: HealthServer) -> None:
    async def bars(_request: web.Request) -> web.Response:
        return web.json_response({"bars": []})

    server.add_routes([web.get("/api/bars", bars)])
    server.metrics.record_in("enriched.market.ticks.v1", 5)
    await server.start()
    code, text = await get(server, "/metrics")
    assert code == 200
    assert 'dp_messages_in_total{service="enrichment",topic="enriched.market.ticks.v1"} 5.0' in text
    assert (await get(server, "/api/bars")) == (200, {"bars": []})


async def test_from_settings_uses_service_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_INSTANCE_ID", "i-9")
    settings = load_settings(service="projection")
    srv = HealthServer.from_settings(settings, ServiceMetrics("projection"))
    assert (srv.port, srv.instance_id, srv.live_stall_timeout_s) == (8083, "i-9", 60.0)


def test_sanitize_error() -> None:
    assert sanitize_error(None) is None
    assert sanitize_error(OSError()) == "OSError"
    assert sanitize_error("x" * 1000) is not None
    assert len(sanitize_error("x" * 1000) or "") == 300
    assert sanitize_error("redis://:pw@h:6379\nboom") == "redis://:***@h:6379 boom"


async def test_loop_listener_hooks(server: HealthServer) -> None:
    await server.start()
    assert (await get(server, "/ready"))[0] == 503
    server.assigned(frozenset({("enriched.market.ticks.v1", 0), ("enriched.market.ticks.v1", 1)}))
    code, body = await get(server, "/health")
    assert code == 200
    assert body["assigned_partitions"] == 2
    assert (await get(server, "/ready"))[0] == 200
    server.assigned(frozenset())
    assert (await get(server, "/ready"))[0] == 200
