"""Deployment tooling: locate `helm`/`promtool`/`prometheus`, and run a real Prometheus for a while.

`find_tool` looks on `PATH` and in the cache folder `scripts/install-tools.sh` installs into, and
raises `ToolMissingError` (with the install command) when the tool is nowhere.

`PrometheusServer` starts Debian's `prometheus` on a free loopback port with a given config in a
temporary folder, waits until it is ready, answers instant queries, and stops it::

    config = write_local_config(tmp_dir, ports={"normalization": 8080, ...})
    with PrometheusServer(config, rule_files=(ALERT_RULES,)) as prom:
        prom.wait_for_targets(up=4, timeout_s=60)
        for title, expr in overview_queries(window="30s").items():
            assert prom.query(expr), title
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import yaml

#: Where `scripts/install-tools.sh` puts tools that Debian does not package (helm).
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
TOOLS_BIN = Path(os.environ.get("DATAPROC_TOOLS_BIN") or _CACHE / "dataproc-tools" / "bin")
#: Helm release the project builds and tests with (`go install helm.sh/helm/v3/cmd/helm@HELM_VERSION`).
HELM_VERSION = "v3.17.3"
#: Kubernetes version `helm template` renders for (a `go install`ed helm reports v1.20 by default).
KUBE_VERSION = "1.30.0"

INSTALL_HINT = "run `bash scripts/install-tools.sh` (CI does this in .ci/run)"


#: The repository's deployment files.
DEPLOY_DIR = Path(__file__).resolve().parents[3] / "deploy"
LOCAL_CONFIG = DEPLOY_DIR / "prometheus" / "prometheus-local.yml"
ALERT_RULES = DEPLOY_DIR / "prometheus" / "alerts.yml"
OVERVIEW_DASHBOARD = DEPLOY_DIR / "grafana" / "dashboards" / "data-processing-overview.json"


class ToolMissingError(RuntimeError):
    """A command-line tool the deployment checks need is not installed."""


def find_tool(name: str) -> Path:
    """Absolute path of `name` from `PATH` or the tools cache; `ToolMissingError` says how to install it."""
    found = shutil.which(name) or shutil.which(name, path=str(TOOLS_BIN))
    if found is None:
        raise ToolMissingError(f"`{name}` is not installed: {INSTALL_HINT}")
    return Path(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_local_config(dest: Path, ports: dict[str, int] | None = None, scrape_interval: str = "1s") -> Path:
    """`prometheus-local.yml` with the services' ports replaced (`service -> port`), written into `dest`."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    for static in config["scrape_configs"][0]["static_configs"]:
        service = static["labels"]["service"]
        if ports and service in ports:
            static["targets"] = [f"127.0.0.1:{ports[service]}"]
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["scrape_timeout"] = scrape_interval
    path = dest / "prometheus-local.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def overview_queries(window: str | None = None) -> dict[str, str]:
    """Panel title -> first PromQL expression of the overview dashboard (range windows set to `window`)."""
    board = json.loads(OVERVIEW_DASHBOARD.read_text())
    out: dict[str, str] = {}
    for panel in board["panels"]:
        expr: str = panel["targets"][0]["expr"]
        out[panel["title"]] = re.sub(r"\[\d+[smh]\]", f"[{window}]", expr) if window else expr
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of an instant-query result."""

    labels: dict[str, str]
    value: float


class PrometheusServer:
    """A real `prometheus` process on a free loopback port, with its data in a temporary folder."""

    def __init__(self, config: Path, *, rule_files: tuple[Path, ...] = (), port: int | None = None) -> None:
        self.config = config
        self.rule_files = rule_files
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._log: BinaryIO | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait until `/-/ready` answers."""
        binary = find_tool("prometheus")
        self._dir = tempfile.TemporaryDirectory(prefix="dp-prometheus-")
        work = Path(self._dir.name)
        config = work / "prometheus.yml"
        shutil.copy(self.config, config)
        for rule in self.rule_files:
            shutil.copy(rule, work / rule.name)
        self._log = log = (work / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [str(binary), f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout_s} s")

    def stop(self) -> None:
        """Terminate the process (kill after 10 s) and remove its folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's log."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "prometheus.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:  # noqa: S310
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus answered {body}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate an instant PromQL query now."""
        data = self._get("/api/v1/query", {"query": expr})
        return [Sample(labels=r["metric"], value=float(r["value"][1])) for r in data["result"]]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health."""
        data = self._get("/api/v1/targets", {"state": "active"})
        targets: list[dict[str, Any]] = data["activeTargets"]
        return targets

    def wait_for_targets(self, up: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until at least `up` targets report health `up`; return the targets."""
        deadline = time.monotonic() + timeout_s
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if sum(t.get("health") == "up" for t in targets) >= up:
                return targets
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {up} targets up after {timeout_s} s: {targets}")

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
