"""Prometheus configs and alert rules, checked by the real `promtool`, and a real `prometheus` scraping
the services' metrics exposition and answering the overview dashboard's queries."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from dataproc_shared.config import SERVICE_PORTS
from dataproc_shared.metrics import CONTENT_TYPE, ServiceMetrics
from dptools.deploytools import (
    ALERT_RULES,
    PrometheusServer,
    ToolMissingError,
    find_tool,
    overview_queries,
    write_local_config,
)

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    try:
        binary = str(find_tool("promtool"))
    except ToolMissingError as exc:
        pytest.fail(str(exc))
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_alert_rules_pass_promtool_check() -> None:
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 11 rules found" in proc.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    proc = promtool("test", "rules", "tests/alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == fired
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
            assert {"summary", "description"} <= set(r["annotations"]), r["alert"]


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n"
        "        expr: sum by (service (dp_consumer_lag)\n")
    proc = promtool("check", "rules", "bad.yml", cwd=tmp_path)
    assert proc.returncode != 0


def test_local_scrape_config_passes_promtool(tmp_path: Path) -> None:
    for name in ("prometheus-local.yml", "alerts.yml"):
        (tmp_path / name).write_text((PROM / name).read_text())
    proc = promtool("check", "config", "prometheus-local.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((PROM / "prometheus-local.yml").read_text())
    targets = {t for sc in config["scrape_configs"] for c in sc["static_configs"] for t in c["targets"]}
    assert targets == {f"127.0.0.1:{port}" for port in SERVICE_PORTS.values()}


def test_compose_scrape_config_passes_promtool() -> None:
    proc = promtool("check", "config", "--syntax-only", "prometheus-compose.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


class _Exposition(BaseHTTPRequestHandler):
    metrics: ServiceMetrics

    def do_GET(self) -> None:
        body = self.metrics.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def exporters() -> Iterator[dict[str, tuple[ServiceMetrics, int]]]:
    """The four services' real `ServiceMetrics`, each served on its own free port."""
    servers: list[ThreadingHTTPServer] = []
    out: dict[str, tuple[ServiceMetrics, int]] = {}
    for service in SERVICE_PORTS:
        metrics = ServiceMetrics(service)
        handler = type(f"Exposition_{service}", (_Exposition,), {"metrics": metrics})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        out[service] = (metrics, server.server_address[1])
    yield out
    for server in servers:
        server.shutdown()
        server.server_close()


def test_real_prometheus_scrapes_services_and_answers_overview_queries(
    tmp_path: Path, exporters: dict[str, tuple[ServiceMetrics, int]]
) -> None:
    ports = {service: port for service, (_, port) in exporters.items()}
    config_path = write_local_config(tmp_path, ports)

    chain = ["ingestion.market.raw.v1", "normalized.market.ticks.v1", "enriched.market.ticks.v1"]
    stop = threading.Event()

    def feed() -> None:  # the services keep processing while Prometheus scrapes them
        step = 0
        while not stop.is_set():
            for i, (metrics, _) in enumerate(exporters.values()):
                topic = chain[min(i, 2)]
                metrics.record_in(topic, 100)
                metrics.record_out(topic, 90)
                metrics.record_dead_letter("not_json", 1 + i)
                now = time.time_ns()
                metrics.record_latencies(event_ns=now - 200_000_000, ingest_ns=now - 50_000_000)
                metrics.set_lag(topic, 0, 10 * step)
                metrics.set_dependency("kafka", True)
                metrics.heartbeat()
            step += 1
            stop.wait(0.2)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    prom = PrometheusServer(config_path, rule_files=(ALERT_RULES,))
    prom.start()
    try:
        targets = prom.wait_for_targets(up=4, timeout_s=30)
        assert {t["labels"]["service"] for t in targets} == set(SERVICE_PORTS)
        assert {t["labels"]["job"] for t in targets} == {"data-processing"}
        time.sleep(4)  # a few more scrapes for rate()
        main = overview_queries(window="30s")
        answered: dict[str, set[str]] = {}
        for title in ("Throughput per stage (records out/s)", "Input per stage (records in/s)",
                      "End-to-end latency since ingest", "Consumer lag", "Dead letters by reason (/s)",
                      "Dependency health", "Stages up"):
            samples = prom.query(main[title])
            answered[title] = {s.labels.get("service", "") for s in samples}
            assert answered[title] == set(SERVICE_PORTS), (title, samples)
        throughput = prom.query('sum by (service) (rate(dp_messages_out_total[30s]))')
        assert all(s.value > 0 for s in throughput)
        latency = prom.query(main["End-to-end latency since ingest"])
        assert all(0.01 <= s.value <= 0.1 for s in latency), latency  # 50 ms observations
        rules = prom._get("/api/v1/rules")
        loaded = {r["name"] for g in rules["groups"] for r in g["rules"]}
        written = {r["alert"] for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]}
        assert loaded == written
        assert len(written) >= 10
    finally:
        prom.stop()
        stop.set()
        feeder.join()
