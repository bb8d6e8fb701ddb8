"""Every PromQL expression of the Grafana dashboards and the alert rules names only metrics and labels
the services really export: read from `ServiceMetrics`' registry, not from a hand-written list."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from dataproc_shared.config import SERVICE_PORTS
from dataproc_shared.metrics import ServiceMetrics
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SERVICES = sorted(SERVICE_PORTS)
#: Labels Prometheus attaches to every scraped series (the scrape configs set `service` too).
TARGET_LABELS = {"job", "instance", "service"}
#: Series Prometheus itself makes per target.
SYNTHETIC = {"up": TARGET_LABELS, "scrape_duration_seconds": TARGET_LABELS}
#: Values the runtime gives bounded labels (`ServiceMetrics` docstrings and `docs/metrics.md`).
KNOWN_VALUES = {
    "service": set(SERVICES),
    "outcome": {"committed", "aborted", "failed", "applied", "stale"},
    "kind": {"assign", "revoke", "lost"},
    "final": {"true", "false"},
    "job": {"data-processing"},
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                "count_values", "group"}

TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<brace>\{)
  | (?P<paren>\()
  | (?P<other>\S)
""", re.VERBOSE)
MATCHER = re.compile(r"""\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?""")


@dataclass
class Parsed:
    """Selectors and grouping labels found in one expression."""

    selectors: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def parse_promql(expr: str) -> Parsed:
    """Metric selectors (name + matchers) and grouping labels of a PromQL expression."""
    out = Parsed()
    tokens = [(m.lastgroup or "", m.group(), m.end()) for m in TOKEN.finditer(expr)]
    i = 0
    while i < len(tokens):
        kind, text, _ = tokens[i]
        nxt = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in GROUPING:
            if nxt == "paren":
                close = expr.index(")", tokens[i + 1][2])
                out.grouping |= {label.strip() for label in expr[tokens[i + 1][2]:close].split(",")
                                 if label.strip()}
                while i < len(tokens) and tokens[i][2] <= close:
                    i += 1
                continue
        elif kind == "ident" and (nxt == "paren" or text.lower() in KEYWORDS | AGGREGATIONS):
            pass
        elif kind == "ident":
            matchers: list[tuple[str, str, str]] = []
            if nxt == "brace":
                close = expr.index("}", tokens[i + 1][2])
                body = expr[tokens[i + 1][2]:close]
                pos = 0
                while pos < len(body):
                    m = MATCHER.match(body, pos)
                    assert m, f"cannot read matchers {body!r} in {expr!r}"
                    matchers.append((m.group(1), m.group(2), json.loads(m.group(3))))
                    pos = m.end()
                while i < len(tokens) and tokens[i][2] <= close + 1:
                    i += 1
                out.selectors.append((text, matchers))
                continue
            out.selectors.append((text, matchers))
        elif kind == "brace":
            raise AssertionError(f"selector without a metric name in {expr!r}")
        i += 1
    return out


@cache
def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from the registries of the four services' `ServiceMetrics`."""
    series: dict[str, set[str]] = {}
    for service in SERVICES:
        metrics = ServiceMetrics(service)
        for value in vars(metrics).values():
            if isinstance(value, MetricWrapperBase):
                labelnames = value._labelnames  # what the collector was declared with
                value.labels(**{n: service if n == "service" else "x" for n in labelnames})
        for family in metrics.registry.collect():
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_exprs() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
    return found


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"alerts.yml: {r.get('alert') or r.get('record')}", r["expr"])
            for g in rules["groups"] for r in g["rules"]]


ALL_EXPRS = dashboard_exprs() + alert_exprs()


def check_expr(expr: str) -> list[str]:
    """Problems with one expression: unknown metrics, labels or label values."""
    series = exported()
    parsed = parse_promql(expr)
    problems: list[str] = []
    available: set[str] = set(TARGET_LABELS)
    if not parsed.selectors:
        problems.append("no metric selector")
    for name, matchers in parsed.selectors:
        labels = series.get(name, SYNTHETIC.get(name))
        if labels is None:
            problems.append(f"metric {name} is not exported")
            continue
        labels = labels | TARGET_LABELS
        available |= labels
        for label, op, value in matchers:
            if label not in labels:
                problems.append(f"{name} has no label {label}")
            if label in KNOWN_VALUES and op in ("=", "=~"):
                values = set(value.split("|")) if op == "=~" else {value}
                if not values <= KNOWN_VALUES[label]:
                    problems.append(f"{name}{{{label}}} never takes {sorted(values - KNOWN_VALUES[label])}")
    for label in parsed.grouping - available:
        problems.append(f"grouping by {label}, which no selected metric has")
    return problems


def test_registry_exports_the_documented_metrics() -> None:
    shared_section = (ROOT / "docs" / "metrics.md").read_text().split("## Service-specific metrics")[0]
    documented = set(re.findall(r"^\| `(dp_[a-z_]+)`", shared_section, re.M))
    names = set(exported())
    for metric in documented:
        assert metric in names or f"{metric}_bucket" in names, metric
    assert exported()["dp_ingest_latency_seconds_bucket"] == {"service", "le"}


def test_there_are_expressions_to_check() -> None:
    assert len(dashboard_exprs()) >= 40
    assert len(alert_exprs()) >= 6


@pytest.mark.parametrize(("where", "expr"), ALL_EXPRS, ids=[w for w, _ in ALL_EXPRS])
def test_expression_uses_only_exported_metrics_and_labels(where: str, expr: str) -> None:
    assert check_expr(expr) == [], f"{where}: {expr}"


@pytest.mark.parametrize(("expr", "problem"), [
    ("sum(rate(dp_messages_total[5m]))", "metric dp_messages_total is not exported"),
    ('sum(rate(dp_messages_in_total{reason="x"}[5m]))', "dp_messages_in_total has no label reason"),
    ("sum by (instrument_id) (rate(dp_messages_in_total[5m]))", "grouping by instrument_id"),
    ('dp_bars_emitted_total{final="True"}', "never takes ['True']"),
    ('dp_transactions_total{outcome=~"aborted|crashed"}', "never takes ['crashed']"),
    ('up{job="dataproc"}', "never takes ['dataproc']"),
    ("histogram_quantile(0.99, sum by (le) (rate(dp_batch_size[5m])))",
     "metric dp_batch_size is not exported"),
])
def test_checker_catches_wrong_names_and_labels(expr: str, problem: str) -> None:
    assert any(problem in p for p in check_expr(expr)), check_expr(expr)


def test_parser_reads_selectors_and_grouping() -> None:
    parsed = parse_promql(
        'histogram_quantile(0.99, sum by (service, le) (rate(dp_ingest_latency_seconds_bucket'
        '{service="projection", le!="+Inf"}[5m] offset 1m))) > 5 and on (service) up == 1'
    )
    assert parsed.selectors == [
        ("dp_ingest_latency_seconds_bucket", [("service", "=", "projection"), ("le", "!=", "+Inf")]),
        ("up", []),
    ]
    assert parsed.grouping == {"service", "le"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def test_dashboards_are_provisioned_and_well_formed() -> None:
    boards = dashboards()
    values = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    assert set(boards) == set(values["monitoring"]["grafana"]["dashboards"])
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources}
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] in uids, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            grid = panel["gridPos"]
            assert grid["x"] >= 0, (name, panel["title"])
            assert grid["x"] + grid["w"] <= 24, (name, panel["title"])


def test_overview_covers_the_pipeline() -> None:
    overview = dashboards()["data-processing-overview"]
    exprs = " ".join(t["expr"] for p in overview["panels"] for t in p["targets"])
    for metric in ("dp_messages_out_total", "dp_ingest_latency_seconds_bucket", "dp_consumer_lag",
                   "dp_dead_letters_total", "dp_bars_emitted_total", "dp_clickhouse_rows_written_total",
                   "dp_dependency_up"):
        assert metric in exprs, metric
    for service in SERVICES:
        board = dashboards()[f"{service}-service"]
        selected = [s for p in board["panels"] for t in p["targets"]
                    for s in parse_promql(t["expr"]).selectors if s[0] != "up"]
        # A service's dashboard shows that service only.
        assert all(("service", "=", service) in m for _, m in selected), service
