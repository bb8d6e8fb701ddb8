"""The Helm chart: real `helm lint` + `helm template` per values file, manifests validated offline
against the Kubernetes schemas, the restricted Pod Security Standard, and the contract's shape."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dptools.deploytools import KUBE_VERSION, ToolMissingError, find_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm"
VALUES = ["values.yaml", "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
#: Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema set on hand.
SCHEMA_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
PORTS = {"normalization": 8080, "enrichment": 8081, "aggregation": 8082, "projection": 8083}
CHAIN = ["ingestion.market.raw.v1", "normalized.market.ticks.v1", "enriched.market.ticks.v1",
         "aggregated.market.bars.v1"]
#: Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def helm() -> str:
    try:
        return str(find_tool("helm"))
    except ToolMissingError as exc:
        pytest.fail(str(exc))


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, check=False)


def values_args(values: str) -> list[str]:
    return [] if values == "values.yaml" else ["-f", str(CHART / values)]


@cache
def render(values: str) -> tuple[dict[str, Any], ...]:
    proc = run_helm("template", "dp", str(CHART), "--namespace", "data-processing",
                    "--kube-version", KUBE_VERSION, *values_args(values))
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def of_kind(values: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in render(values) if d["kind"] == kind]


def values_of(values: str) -> dict[str, Any]:
    base: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    if values != "values.yaml":
        merge(base, yaml.safe_load((CHART / values).read_text()))
    return base


def merge(into: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def pod_specs(values: str) -> list[tuple[str, dict[str, Any]]]:
    pods = [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in render(values) if d["kind"] in ("Deployment", "Job")]
    assert pods
    return pods


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint_is_clean(values: str) -> None:
    proc = run_helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *values_args(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", VALUES)
def test_rendered_manifests_validate_against_kubernetes_schemas(values: str) -> None:
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "NetworkPolicy", "Job"} <= kinds
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a custom resource: no schema; checked structurally below
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_broken_manifest() -> None:
    deployment = of_kind("values.yaml", "Deployment")[0]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.parametrize("values", VALUES)
def test_every_pod_meets_the_restricted_pod_security_standard(values: str) -> None:
    for name, spec in pod_specs(values):
        psc = spec.get("securityContext", {})
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert psc.get("runAsUser", 1) != 0, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for vol in volumes.values():
            assert set(vol) - {"name"} <= RESTRICTED_VOLUMES, (name, vol)
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert sc.get("privileged", False) is False, (name, c["name"])
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, (name, c["name"])
            assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, (name, c["name"])
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), (name, c["name"])
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, (name, c["name"])
            assert sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") == "RuntimeDefault"
            assert sc.get("readOnlyRootFilesystem") is True, (name, c["name"])
            assert not any(p.get("hostPort") for p in c.get("ports", [])), (name, c["name"])
            # A read-only root needs somewhere to write temporary files.
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, (name, c["name"])
            assert "emptyDir" in volumes[tmp[0]["name"]], (name, c["name"])


@pytest.mark.parametrize("values", VALUES)
def test_services_match_the_contract_ports_and_probes(values: str) -> None:
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
                   for d in of_kind(values, "Deployment")}
    services = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(values, "Service")}
    assert set(deployments) == set(services) == set(PORTS)
    for name, port in PORTS.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["python", "-m", name]
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"]["path"] == "/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["startupProbe"]["httpGet"]["path"] == "/live"
        assert services[name]["spec"]["ports"][0]["port"] == port
        assert services[name]["spec"]["selector"] == deployments[name]["spec"]["selector"]["matchLabels"]
        refs = [e.get("configMapRef", e.get("secretRef"))["name"] for e in container["envFrom"]]
        assert len(refs) == 2


@pytest.mark.parametrize("values", VALUES)
def test_replicas_autoscaling_and_disruption_budgets_follow_the_values(values: str) -> None:
    vals = values_of(values)
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(values, "HorizontalPodAutoscaler")}
    pdbs = {d["metadata"]["name"] for d in of_kind(values, "PodDisruptionBudget")}
    for d in of_kind(values, "Deployment"):
        svc = vals["services"][d["metadata"]["labels"]["app.kubernetes.io/component"]]
        name = d["metadata"]["name"]
        if svc["autoscaling"]["enabled"]:
            assert "replicas" not in d["spec"], name
            assert hpas[name]["spec"]["minReplicas"] == svc["autoscaling"]["minReplicas"]
            assert hpas[name]["spec"]["maxReplicas"] == svc["autoscaling"]["maxReplicas"]
        else:
            assert d["spec"]["replicas"] == svc["replicaCount"], name
            assert name not in hpas
        assert (name in pdbs) == svc["podDisruptionBudget"]["enabled"], name
        limits = d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits == svc["resources"]["limits"], name


@pytest.mark.parametrize("values", VALUES)
def test_configmap_carries_topic_layout_from_values(values: str) -> None:
    vals = values_of(values)
    topics = {t["name"]: t for t in vals["infrastructure"]["kafka"]["topics"]}
    config = next(c for c in of_kind(values, "ConfigMap") if c["metadata"]["name"].endswith("-config"))
    data = config["data"]
    assert data["DATA_PROC_TOPICS__PARTITIONS"] == str(topics[CHAIN[0]]["partitions"])
    assert data["DATA_PROC_TOPICS__SIDE_PARTITIONS"] == str(topics["deadletter.market.v1"]["partitions"])
    assert data["DATA_PROC_TOPICS__REPLICATION_FACTOR"] == str(topics[CHAIN[0]]["replicationFactor"])
    assert data["DATA_PROC_KAFKA_BOOTSTRAP"] == vals["infrastructure"]["kafka"]["bootstrapServers"]
    assert data["DATA_PROC_ENV"] == vals["global"]["environment"]
    assert data["DATA_PROC_CLICKHOUSE_DATABASE"] == "market_data"  # fixed by the contract
    assert not any("PASSWORD" in k or k.endswith(("_DSN", "REDIS_URL")) for k in data)


def test_environment_values_differ_where_they_should() -> None:
    prod = values_of("values-prod.yaml")
    dev = values_of("values-dev.yaml")
    assert prod["global"]["environment"] == "prod"
    assert dev["global"]["environment"] == "dev"
    assert prod["services"]["aggregation"]["replicaCount"] == 15
    assert {t["partitions"] for t in prod["infrastructure"]["kafka"]["topics"] if t["name"] in CHAIN} == {50}
    # Production credentials never pass through values: an existing Secret is referenced.
    assert prod["secrets"]["existingSecret"]
    assert not [d for d in render("values-prod.yaml") if d["kind"] == "Secret"]
    assert [d for d in render("values-dev.yaml") if d["kind"] == "Secret"]
    # Strict environments get TLS endpoints (the settings refuse plain http in staging/prod).
    for env in ("values-staging.yaml", "values-prod.yaml"):
        assert values_of(env)["infrastructure"]["clickhouse"]["url"].startswith("https://")


def test_chart_refuses_unequal_chain_partitions(tmp_path: Path) -> None:
    topics = values_of("values.yaml")["infrastructure"]["kafka"]["topics"]
    topics[1]["partitions"] = 7
    override = tmp_path / "values-bad.yaml"
    override.write_text(yaml.safe_dump({"infrastructure": {"kafka": {"topics": topics}}}))
    proc = run_helm("template", "dp", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(override))
    assert proc.returncode != 0
    assert "same partition count" in proc.stderr


def test_chart_refuses_more_replicas_than_partitions() -> None:
    proc = run_helm("template", "dp", str(CHART), "--kube-version", KUBE_VERSION,
                    "--set", "services.normalization.autoscaling.maxReplicas=13")
    assert proc.returncode != 0
    assert "only 12 partitions" in proc.stderr


@pytest.mark.parametrize("values", VALUES)
def test_network_policies_deny_by_default_and_allow_only_dependencies(values: str) -> None:
    vals = values_of(values)
    policies = of_kind(values, "NetworkPolicy")
    deny = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1
    assert deny[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny[0]["spec"]
    assert "egress" not in deny[0]["spec"]
    infra = vals["infrastructure"]
    dep_ports = {"kafka": infra["kafka"]["port"], "clickhouse": infra["clickhouse"]["port"],
                 "postgresql": infra["postgresql"]["port"], "redis": infra["redis"]["port"]}
    for p in policies:
        component = p["metadata"]["labels"].get("app.kubernetes.io/component")
        if component not in PORTS:
            continue
        ports = {(port["protocol"], port["port"]) for rule in p["spec"]["egress"] for port in rule["ports"]}
        expected = {("UDP", 53), ("TCP", 53)} | {("TCP", dep_ports[d])
                                                  for d in vals["services"][component]["dependencies"]}
        assert ports == expected, component
        ingress_ports = {port["port"] for rule in p["spec"]["ingress"] for port in rule["ports"]}
        assert ingress_ports == {PORTS[component]}


@pytest.mark.parametrize("values", VALUES)
def test_servicemonitor_is_structurally_sound(values: str) -> None:
    monitors = of_kind(values, "ServiceMonitor")
    if not values_of(values)["monitoring"]["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    assert len(monitors) == 1
    sm = monitors[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selector = sm["spec"]["selector"]["matchLabels"]
    services = of_kind(values, "Service")
    matched = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert len(matched) == len(PORTS)
    assert all(s["metadata"]["labels"][sm["spec"]["jobLabel"]] == "data-processing" for s in matched)
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert all(p["name"] == "http" for s in matched for p in s["spec"]["ports"])
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0]["targetLabel"] == "service"


@pytest.mark.parametrize("values", VALUES)
def test_jobs_are_ordered_pre_install_hooks(values: str) -> None:
    jobs = {d["metadata"]["name"].rsplit("-", 1)[-1]: d for d in of_kind(values, "Job")}
    assert set(jobs) == {"topics", "migrations"}
    for job in jobs.values():
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    weight = {n: int(j["metadata"]["annotations"]["helm.sh/hook-weight"]) for n, j in jobs.items()}
    assert weight["topics"] < weight["migrations"]
    # What the Jobs read must exist before them: hook resources with a lower weight.
    for d in render(values):
        if d["kind"] in ("ConfigMap", "Secret"):
            assert int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) < min(weight.values())


def test_chart_refuses_a_strict_environment_without_passwords() -> None:
    proc = run_helm("template", "dp", str(CHART), "--kube-version", KUBE_VERSION,
                    "--set", "global.environment=prod")
    assert proc.returncode != 0
    assert "prod needs passwords" in proc.stderr
