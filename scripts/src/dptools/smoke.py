"""Post-deploy smoke check: hit every service's health endpoints and report.

    python -m dptools.smoke                          # the four services on 127.0.0.1:8080-8083
    python -m dptools.smoke --host normalization.example.internal --strict
    python -m dptools.smoke --url aggregation=https://agg.example.com --prometheus http://127.0.0.1:9090

For each service: `GET /live` and `GET /ready` (200 expected), `GET /health` (JSON with an overall
`status` and one entry per dependency) and `GET /metrics` (Prometheus text with `dp_` metrics).
Exit status 0 when every service is live, ready and not unhealthy (`--strict`: and not degraded),
1 otherwise; a table (or `--json`) says what failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from dataproc_shared.config import SERVICE_PORTS

ENDPOINTS = ("/live", "/ready", "/health", "/metrics")


@dataclass(frozen=True, slots=True)
class Response:
    """What one endpoint answered (`status` 0: no answer, with `error`)."""

    status: int
    body: bytes = b""
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True, slots=True)
class ServiceReport:
    """The verdict on one service."""

    service: str
    url: str
    ok: bool
    live: bool
    ready: bool
    health: str
    dependencies: dict[str, str] = field(default_factory=dict)
    metrics: int = 0
    problems: tuple[str, ...] = ()


Fetch = Callable[[str], Response]


def _dependency_states(health: Mapping[str, Any]) -> dict[str, str]:
    """Dependency name -> status from a /health document (a list or a mapping of entries)."""
    deps = health.get("dependencies", health.get("checks", {}))
    out: dict[str, str] = {}
    if isinstance(deps, Mapping):
        for name, entry in deps.items():
            out[str(name)] = str(entry.get("status", entry) if isinstance(entry, Mapping) else entry)
    elif isinstance(deps, list):
        for entry in deps:
            if isinstance(entry, Mapping):
                out[str(entry.get("name", "?"))] = str(entry.get("status", "?"))
    return out


def evaluate(service: str, url: str, answers: Mapping[str, Response], strict: bool = False) -> ServiceReport:
    """Judge one service from its endpoints' answers (pure: no I/O)."""
    problems: list[str] = []
    for path in ENDPOINTS:
        r = answers[path]
        if r.status == 0:
            problems.append(f"{path}: no answer ({r.error})")
        elif path != "/health" and r.status != 200:
            problems.append(f"{path}: HTTP {r.status}")
    live = answers["/live"].status == 200
    ready = answers["/ready"].status == 200
    health, deps = "unknown", {}
    h = answers["/health"]
    if h.status:
        try:
            doc = json.loads(h.body)
            health = str(doc.get("status", "unknown"))
            deps = _dependency_states(doc)
        except (ValueError, AttributeError):
            problems.append("/health: not a JSON object")
        if health not in ("healthy", "degraded", "unhealthy"):
            problems.append(f"/health: status {health!r}")
        elif health == "unhealthy" or (strict and health == "degraded"):
            down = [f"{n}={s}" for n, s in deps.items() if s != "healthy"]
            problems.append(f"/health: {health}" + (f" ({', '.join(down)})" if down else ""))
    metrics = 0
    m = answers["/metrics"]
    if m.status == 200:
        metrics = sum(1 for line in m.body.decode(errors="replace").splitlines()
                      if line.startswith("dp_"))
        if not metrics:
            problems.append("/metrics: no dp_ series")
    return ServiceReport(service=service, url=url, ok=not problems, live=live, ready=ready, health=health,
                         dependencies=deps, metrics=metrics, problems=tuple(problems))


def http_get(url: str, timeout_s: float = 5.0) -> Response:
    """GET `url`; any HTTP status is an answer, a connection failure is status 0."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - operator-given URL
            return Response(resp.status, resp.read(), time.monotonic() - start)
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), time.monotonic() - start)
    except (OSError, ValueError) as exc:
        return Response(0, b"", time.monotonic() - start, str(getattr(exc, "reason", exc)))


def check(targets: Mapping[str, str], fetch: Fetch = http_get, strict: bool = False) -> list[ServiceReport]:
    """Check every service of `targets` (service -> base URL), all endpoints in parallel."""
    urls = [(svc, base.rstrip("/") + path) for svc, base in targets.items() for path in ENDPOINTS]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda item: fetch(item[1]), urls))
    by_service: dict[str, dict[str, Response]] = {svc: {} for svc in targets}
    for (svc, url), answer in zip(urls, answers, strict=True):
        by_service[svc][url.removeprefix(targets[svc].rstrip("/"))] = answer
    return [evaluate(svc, targets[svc], by_service[svc], strict=strict) for svc in targets]


def check_monitoring(prometheus: str | None, grafana: str | None, fetch: Fetch = http_get) -> list[str]:
    """Problems with Prometheus (`/-/healthy`) and Grafana (`/api/health`), when given."""
    problems = []
    for name, url in (("prometheus", prometheus and prometheus.rstrip("/") + "/-/healthy"),
                      ("grafana", grafana and grafana.rstrip("/") + "/api/health")):
        if url:
            r = fetch(url)
            if r.status != 200:
                problems.append(f"{name}: {url} answered {r.status or r.error}")
    return problems


def render(reports: list[ServiceReport], monitoring: list[str]) -> str:
    """A plain-text table of the reports."""
    lines = [f"{'service':<14} {'live':<5} {'ready':<6} {'health':<10} {'dp_ series':>10}  url"]
    for r in reports:
        lines.append(f"{r.service:<14} {'yes' if r.live else 'NO':<5} {'yes' if r.ready else 'NO':<6} "
                     f"{r.health:<10} {r.metrics:>10}  {r.url}")
        for dep, status in sorted(r.dependencies.items()):
            lines.append(f"{'':<14} - {dep}: {status}")
        for problem in r.problems:
            lines.append(f"{'':<14} ! {problem}")
    lines.extend(f"! {p}" for p in monitoring)
    ok = all(r.ok for r in reports) and not monitoring
    lines.append("smoke check: " + ("PASSED" if ok else "FAILED"))
    return "\n".join(lines)


def parse_targets(host: str, scheme: str, urls: list[str]) -> dict[str, str]:
    """Service -> base URL: `scheme://host:port` by default, `--url svc=URL` overrides."""
    targets = {svc: f"{scheme}://{host}:{port}" for svc, port in SERVICE_PORTS.items()}
    for item in urls:
        svc, sep, url = item.partition("=")
        if not sep or svc not in SERVICE_PORTS:
            raise SystemExit(f"--url expects SERVICE=URL with SERVICE one of {', '.join(SERVICE_PORTS)}")
        targets[svc] = url
    return targets


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="host of every service (default: %(default)s)")
    parser.add_argument("--scheme", default="http", choices=["http", "https"])
    parser.add_argument("--url", action="append", default=[], metavar="SERVICE=URL",
                        help="base URL of one service (repeatable)")
    parser.add_argument("--prometheus", help="also check Prometheus at this URL")
    parser.add_argument("--grafana", help="also check Grafana at this URL")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    parser.add_argument("--strict", action="store_true", help="a degraded service fails the check")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    targets = parse_targets(args.host, args.scheme, args.url)

    def fetch(url: str) -> Response:
        return http_get(url, args.timeout)

    reports = check(targets, fetch, strict=args.strict)
    monitoring = check_monitoring(args.prometheus, args.grafana, fetch)
    ok = all(r.ok for r in reports) and not monitoring
    if args.json:
        print(json.dumps({"ok": ok, "services": [asdict(r) for r in reports], "monitoring": monitoring},
                         indent=2))
    else:
        print(render(reports, monitoring))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
