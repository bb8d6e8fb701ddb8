"""docker-compose.yml against the Compose Specification's JSON schema, and its shape: every piece of
the stack, health checks, start order, the contract's ports."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dataproc_shared.config import SERVICE_PORTS

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "data" / "schemas" / "compose-spec.json"


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def schema() -> dict[str, Any]:
    assert SCHEMA.exists(), f"the Compose Specification schema is expected at {SCHEMA}"
    data: dict[str, Any] = json.loads(SCHEMA.read_text())
    return data


def test_compose_file_validates_against_the_compose_specification() -> None:
    validator = jsonschema.Draft7Validator(schema())
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert errors == [], [f"{list(e.path)}: {e.message}" for e in errors]


def test_schema_validation_catches_a_broken_compose_file() -> None:
    broken = yaml.safe_load(yaml.safe_dump(compose()))
    broken["services"]["normalization"]["depends_on"]["kafka"]["condition"] = "service_ready"
    broken["services"]["projection"]["ports"] = "8083:8083"
    errors = list(jsonschema.Draft7Validator(schema()).iter_errors(broken))
    assert len(errors) >= 2


def test_compose_runs_the_whole_stack() -> None:
    services = compose()["services"]
    assert set(services) >= {"kafka", "clickhouse", "postgres", "redis", "prometheus", "grafana", "topics",
                             "migrations", *SERVICE_PORTS}


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_each_service_has_its_port_health_check_and_start_order(service: str) -> None:
    svc = compose()["services"][service]
    port = SERVICE_PORTS[service]
    assert svc["ports"] == [f"{port}:{port}"]
    assert svc["build"] == {"context": ".", "dockerfile": f"service-{service}/Dockerfile"}
    assert (ROOT / svc["build"]["dockerfile"]).exists()
    assert f"http://127.0.0.1:{port}/live" in " ".join(svc["healthcheck"]["test"])
    deps = svc["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["topics"]["condition"] == "service_completed_successfully"
    assert deps["migrations"]["condition"] == "service_completed_successfully"
    # Every dependency started by compose must be healthy first (a one-shot job must have completed).
    for name, dep in deps.items():
        if dep["condition"] == "service_healthy":
            assert "healthcheck" in compose()["services"][name], name
    assert svc["read_only"] is True
    assert svc["cap_drop"] == ["ALL"]
    assert svc["environment"]["DATA_PROC_HTTP__HOST"] == "0.0.0.0"  # noqa: S104 - reachable from other containers


def test_kafka_is_single_node_kraft_with_transactions_and_no_auto_creation() -> None:
    env = compose()["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    internal = compose()["services"]["normalization"]["environment"]["DATA_PROC_KAFKA_BOOTSTRAP"]
    assert f"INTERNAL://{internal}" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_databases_match_the_contract() -> None:
    services = compose()["services"]
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "reference_data"
    assert services["clickhouse"]["environment"]["CLICKHOUSE_DB"] == "market_data"
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")


def test_monitoring_mounts_point_at_real_files() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
    prom_config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-compose.yml").read_text())
    targets = {t for sc in prom_config["scrape_configs"] if sc["job_name"] == "data-processing"
               for c in sc["static_configs"] for t in c["targets"]}
    assert targets == {f"{s}:{p}" for s, p in SERVICE_PORTS.items()}
    provider = ROOT / "deploy/grafana/provisioning/dashboards/data-processing.yml"
    provisioning = yaml.safe_load(provider.read_text())
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"] if v.startswith("./")}
    assert provisioning["providers"][0]["options"]["path"] in mounted


def test_jobs_run_once_in_order() -> None:
    services = compose()["services"]
    assert services["topics"]["restart"] == "no"
    assert services["migrations"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["command"][:3] == ["python", "-m", "dptools.topics"]
    assert services["migrations"]["command"][:3] == ["python", "-m", "dptools.migrate"]
