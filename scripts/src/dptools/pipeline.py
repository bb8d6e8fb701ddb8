"""Run the four services as separate local processes: start, stop, kill, wait until drained.

    uv run python -m dptools.pipeline start      # start all four, wait until each is ready
    uv run python -m dptools.pipeline status
    uv run python -m dptools.pipeline wait-drained
    uv run python -m dptools.pipeline stop

Each service runs as `python -m <service>` with the environment of this process (`.stack/env`),
logs to `.stack/logs/<service>.log` and leaves its pid in `.stack/run/<service>.pid`. The `Pipeline`
class does the same for tests, with per-test environment overrides and ports.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SERVICES = ("normalization", "enrichment", "aggregation", "projection")
DEFAULT_PORTS = {"normalization": 8080, "enrichment": 8081, "aggregation": 8082, "projection": 8083}
_LAG = re.compile(r'^dp_consumer_lag\{[^}]*\}\s+([0-9.e+-]+)$', re.M)
_IN = re.compile(r'^dp_messages_in_total\{[^}]*\}\s+([0-9.e+-]+)$', re.M)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET (status 0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local http only
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class Pipeline:
    """The four services as child processes sharing one environment."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    run_dir: Path = REPO / ".stack" / "run"
    log_dir: Path = REPO / ".stack" / "logs"
    services: tuple[str, ...] = SERVICES
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, service: str, path: str = "") -> str:
        """Base URL of a service's HTTP port."""
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def start(self, service: str, extra_env: Mapping[str, str] | None = None) -> None:
        """Start one service process (no wait)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        env["DATA_PROC_HTTP__PORT"] = str(self.ports[service])
        env.update(extra_env or {})
        log = (self.log_dir / f"{service}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", service], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO, start_new_session=True,
        )
        log.close()
        self.procs[service] = proc
        (self.run_dir / f"{service}.pid").write_text(str(proc.pid))

    def start_all(self, ready_timeout: float = 120.0) -> None:
        """Start every service and wait until each answers /ready."""
        for service in self.services:
            self.start(service)
        for service in self.services:
            self.wait_ready(service, ready_timeout)

    def wait_ready(self, service: str, timeout: float = 120.0) -> None:
        """Block until the service's /ready answers 200; raise with its log tail if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}:\n{self.log_tail(service)}")
            if http_get(self.url(service, "/ready"))[0] == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{service} not ready after {timeout:.0f}s:\n{self.log_tail(service)}")

    def log_tail(self, service: str, lines: int = 40) -> str:
        """Last lines of a service's log."""
        path = self.log_dir / f"{service}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def pid(self, service: str) -> int | None:
        """Pid of a running service, from this object or its pid file."""
        proc = self.procs.get(service)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        path = self.run_dir / f"{service}.pid"
        if not path.exists():
            return None
        pid = int(path.read_text().strip() or 0)
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one service (kill -9 by default) and reap it."""
        pid = self.pid(service)
        if pid is None:
            return
        os.kill(pid, sig)
        proc = self.procs.get(service)
        if proc is not None and sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=60)

    def stop(self, service: str, timeout: float = 45.0) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL after `timeout`. Returns the exit code."""
        pid = self.pid(service)
        if pid is None:
            return None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        proc = self.procs.get(service)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            if proc is None and self.pid(service) is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        (self.run_dir / f"{service}.pid").unlink(missing_ok=True)
        return proc.wait(timeout=10) if proc is not None else None

    def stop_all(self) -> None:
        """Stop every service (reverse order of the chain)."""
        for service in reversed(self.services):
            self.stop(service)

    def lag_and_input(self) -> tuple[float, float] | None:
        """Total consumer lag and consumed count over all services (None when one doesn't answer)."""
        lag = consumed = 0.0
        for service in self.services:
            status, body = http_get(self.url(service, "/metrics"))
            if status != 200:
                return None
            text = body.decode()
            lag += sum(float(v) for v in _LAG.findall(text))
            consumed += sum(float(v) for v in _IN.findall(text))
        return lag, consumed

    def wait_drained(self, timeout: float = 300.0, settle: float = 3.0) -> None:
        """Block until every service has zero lag and consumed nothing new for `settle` seconds."""
        deadline = time.monotonic() + timeout
        last: tuple[float, float] | None = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            now = self.lag_and_input()
            if now is None or now[0] > 0 or now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= settle:
                return
            time.sleep(0.5)
        raise TimeoutError(f"pipeline not drained after {timeout:.0f}s (lag, consumed = {last})")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status", "wait-drained"))
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    pipe = Pipeline()
    if args.command == "start":
        for service in SERVICES:
            if pipe.pid(service) is None:
                print(f"starting {service} on :{pipe.ports[service]} (log .stack/logs/{service}.log)")
                pipe.start(service)
        for service in SERVICES:
            pipe.wait_ready(service, args.timeout)
            print(f"{service} ready at {pipe.url(service, '/health')}")
    elif args.command == "stop":
        for service in reversed(SERVICES):
            if pipe.pid(service) is not None:
                print(f"stopping {service}")
                pipe.stop(service)
    elif args.command == "status":
        for service in SERVICES:
            code, body = http_get(pipe.url(service, "/health"))
            state = body.decode()[:200] if code else "down"
            print(f"{service:14} pid={pipe.pid(service)} {pipe.url(service, '/health')} -> {code} {state}")
    else:
        pipe.wait_drained(args.timeout)
        print("pipeline drained")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
