"""The post-deploy smoke check against real HTTP servers answering like the services."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from dataproc_shared.config import SERVICE_PORTS
from dataproc_shared.metrics import ServiceMetrics
from dptools import smoke
from dptools.smoke import Response, evaluate


class Behaviour:
    def __init__(self, service: str) -> None:
        self.metrics = ServiceMetrics(service)
        self.metrics.set_dependency("kafka", True)
        self.health = "healthy"
        self.ready = 200
        self.deps: dict[str, Any] = {"kafka": {"status": "healthy"}}


def serve(behaviour: Behaviour) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                status, body = 200, behaviour.metrics.render()
            elif self.path == "/health":
                status = 200 if behaviour.health != "unhealthy" else 503
                body = json.dumps({"status": behaviour.health, "dependencies": behaviour.deps}).encode()
            elif self.path == "/ready":
                status, body = behaviour.ready, b"{}"
            elif self.path == "/live":
                status, body = 200, b"{}"
            else:
                status, body = 404, b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def fleet() -> Iterator[tuple[dict[str, Behaviour], list[str]]]:
    behaviours = {svc: Behaviour(svc) for svc in SERVICE_PORTS}
    servers = {svc: serve(b) for svc, b in behaviours.items()}
    args = [f"--url={svc}=http://127.0.0.1:{s.server_address[1]}" for svc, s in servers.items()]
    yield behaviours, args
    for s in servers.values():
        s.shutdown()
        s.server_close()


def test_all_healthy_passes(fleet: tuple[dict[str, Behaviour], list[str]], capsys: pytest.CaptureFixture[str]
                            ) -> None:
    _, args = fleet
    assert smoke.main(args) == 0
    out = capsys.readouterr().out
    assert "smoke check: PASSED" in out
    for svc in SERVICE_PORTS:
        assert svc in out


def test_unready_or_unhealthy_service_fails(fleet: tuple[dict[str, Behaviour], list[str]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    behaviours, args = fleet
    behaviours["enrichment"].ready = 503
    behaviours["projection"].health = "unhealthy"
    behaviours["projection"].deps = {"redis": {"status": "unhealthy"}, "kafka": {"status": "healthy"}}
    assert smoke.main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = {s["service"]: s["problems"] for s in report["services"] if not s["ok"]}
    assert set(failed) == {"enrichment", "projection"}
    assert failed["enrichment"] == ["/ready: HTTP 503"]
    assert failed["projection"] == ["/health: unhealthy (redis=unhealthy)"]


def test_degraded_fails_only_when_strict(fleet: tuple[dict[str, Behaviour], list[str]],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    behaviours, args = fleet
    behaviours["aggregation"].health = "degraded"
    assert smoke.main(args) == 0
    assert smoke.main([*args, "--strict"]) == 1
    assert "/health: degraded" in capsys.readouterr().out


def test_unreachable_service_and_monitoring_fail(fleet: tuple[dict[str, Behaviour], list[str]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, args = fleet
    dead = "--url=normalization=http://127.0.0.1:9"  # discard port: nothing listens
    assert smoke.main([*args, dead, "--prometheus", "http://127.0.0.1:9", "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert "/live: no answer" in out
    assert "prometheus: http://127.0.0.1:9/-/healthy" in out


def test_evaluate_requires_dp_metrics() -> None:
    ok = Response(200, b"{}")
    answers = {"/live": ok, "/ready": ok, "/health": Response(200, b'{"status": "healthy"}'),
               "/metrics": Response(200, b"# HELP python_info x\npython_info 1\n")}
    report = evaluate("normalization", "http://x", answers)
    assert not report.ok
    assert report.problems == ("/metrics: no dp_ series",)


def test_default_targets_are_the_contract_ports() -> None:
    targets = smoke.parse_targets("10.0.0.5", "http", [])
    assert targets == {svc: f"http://10.0.0.5:{port}" for svc, port in SERVICE_PORTS.items()}
    with pytest.raises(SystemExit):
        smoke.parse_targets("h", "http", ["nosuch=http://x"])
