"""Every DATA_PROC_* variable that docker-compose.yml and the Helm chart hand to a service or job is a
setting the code defines (read from the settings models themselves), and the settings load with them."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import types
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from dataproc_shared.config import ENV_PREFIX, NESTED_DELIMITER, SERVICE_PORTS, Settings, load_settings
from dptools.deploytools import KUBE_VERSION, ToolMissingError, find_tool
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(SERVICE_PORTS)
#: Compose services and Helm Jobs that run the operator tools (plain `Settings`).
TOOLS = {"topics", "migrations"}
VALUES = ["values.yaml", "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
#: What an operator puts into the existing Secret of staging/prod (docs/deployment.md).
SECRET_KEYS = {
    "DATA_PROC_POSTGRES_DSN": "postgresql://dataproc:pw@db:5432/reference_data",
    "DATA_PROC_REDIS_URL": "rediss://:pw@redis:6379/0",
    "DATA_PROC_CLICKHOUSE_PASSWORD": "pw",
    "DATA_PROC_KAFKA__SASL_PASSWORD": "pw",
}


def settings_class(name: str) -> type[Settings]:
    """The settings model of a service (its `settings` module's `Settings` subclass), else the base."""
    if name not in SERVICES:
        return Settings
    try:
        module = importlib.import_module(f"{name}.settings")
    except ModuleNotFoundError:
        return Settings
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Settings) and v is not Settings]
    assert len(found) == 1, f"{name}.settings defines {found}"
    return found[0]


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _models(a)]
    return []


def env_names(model: type[BaseModel], prefix: str = ENV_PREFIX) -> set[str]:
    """Every environment variable the model reads: leaves and nested groups (`__`)."""
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = prefix + field_name.upper()
        names.add(name)  # a group may also be given whole, as JSON
        for sub in _models(field.annotation):
            names |= env_names(sub, name + NESTED_DELIMITER)
    return names


@cache
def known(name: str) -> frozenset[str]:
    return frozenset(env_names(settings_class(name)))


def test_env_names_come_from_the_models() -> None:
    base = known("tools-none")
    assert {"DATA_PROC_KAFKA_BOOTSTRAP", "DATA_PROC_CLICKHOUSE_URL", "DATA_PROC_POSTGRES_DSN",
            "DATA_PROC_REDIS_URL", "DATA_PROC_AUDIT_ENABLED", "DATA_PROC_NORMALIZATION_AUDIT_ENABLED",
            "DATA_PROC_AUDIT_KAFKA_TOPIC",
            "DATA_PROC_AUDIT_QUEUE_SIZE", "DATA_PROC_AUDIT_FLUSH_INTERVAL_MS", "DATA_PROC_LOOP__BATCH_SIZE",
            "DATA_PROC_TOPICS__RETENTION_MS__RAW"} <= base
    assert "DATA_PROC_KAFKA_BOOTSTRAPS" not in base
    assert "DATA_PROC_LOOP_BATCH_SIZE" not in base


def _substitute(value: str) -> str:
    """Compose's `${VAR:-default}` interpolation, with the defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@cache
def compose_envs() -> dict[str, dict[str, str]]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    out: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        out[name] = {k: _substitute(str(v)) for k, v in env.items()}
    return out


def _load(cls: type[Settings], service: str, env: dict[str, str],
          monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(cls, service=service)


@pytest.mark.parametrize("name", [*SERVICES, *sorted(TOOLS)])
def test_compose_environment_names_only_known_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose_envs()[name]
    unknown = sorted(k for k in env if k not in known(name))
    assert unknown == [], f"{name}: unknown settings {unknown}"
    settings = _load(settings_class(name), name if name in SERVICES else "topics", env, monkeypatch)
    assert settings.kafka_bootstrap == "kafka:29092"
    assert settings.clickhouse_url == "http://clickhouse:8123"
    assert not settings.clickhouse_embedded
    if name in SERVICES:
        assert settings.http.port == SERVICE_PORTS[name]
        assert settings.http.host == "0.0.0.0"  # noqa: S104


def test_infrastructure_containers_get_no_service_settings() -> None:
    for name, env in compose_envs().items():
        if name not in SERVICES and name not in TOOLS:
            assert not [k for k in env if k.startswith(ENV_PREFIX)], name


def test_unknown_setting_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**compose_envs()["normalization"], "DATA_PROC_LOOP__BATCHSIZE": "10"}
    assert "DATA_PROC_LOOP__BATCHSIZE" not in known("normalization")
    with pytest.raises(Exception, match="DATA_PROC_LOOP"):
        _load(settings_class("normalization"), "normalization", env, monkeypatch)


@cache
def rendered(values: str) -> tuple[dict[str, Any], ...]:
    try:
        helm = str(find_tool("helm"))
    except ToolMissingError as exc:
        pytest.fail(str(exc))
    extra = [] if values == "values.yaml" else ["-f", str(ROOT / "helm" / values)]
    command = [helm, "template", "dp", str(ROOT / "helm"), "--kube-version", KUBE_VERSION, *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def pod_env(values: str, workload: dict[str, Any]) -> dict[str, str]:
    """The environment a pod of `workload` gets: ConfigMap + Secret (envFrom) + its own `env`."""
    docs = rendered(values)
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == source["configMapRef"]["name"]]
            env.update(cm["data"])
        else:
            secrets = [d for d in docs if d["kind"] == "Secret"
                       and d["metadata"]["name"] == source["secretRef"]["name"]]
            env.update(secrets[0]["stringData"] if secrets else SECRET_KEYS)
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "pod-0")
    return env


@pytest.mark.parametrize("values", VALUES)
def test_helm_configmap_and_env_name_only_known_settings(values: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered(values)
    environment = values.removeprefix("values-").removesuffix(".yaml")
    if values == "values.yaml":
        environment = yaml.safe_load((ROOT / "helm" / values).read_text())["global"]["environment"]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(workloads) == len(SERVICES) + len(TOOLS)
    for workload in workloads:
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        name = component if component in SERVICES else "topics"
        env = pod_env(values, workload)
        unknown = sorted(k for k in env if k not in known(name))
        assert unknown == [], f"{workload['metadata']['name']}: unknown settings {unknown}"
        # The settings load and pass the environment's own rules (strict in staging and prod).
        settings = _load(settings_class(name), name, env, monkeypatch)
        assert settings.env == environment
        assert settings.instance_id == "pod-0"
        assert settings.clickhouse_database == "market_data"
        if name in SERVICES:
            assert settings.http.port == SERVICE_PORTS[name]


def test_helm_configmap_keys_are_all_settings() -> None:
    for values in VALUES:
        for doc in rendered(values):
            if doc["kind"] == "ConfigMap":
                assert all(k in known("tools-none") for k in doc["data"]), values
            if doc["kind"] == "Secret":
                assert all(k in known("tools-none") for k in doc["stringData"]), values
    assert set(SECRET_KEYS) <= known("tools-none")
