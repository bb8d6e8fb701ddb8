"""Fixtures of the projection's tests: Redis (the local stack's server, or a private one).

The private server (`PrivateRedis`) is a real `redis-server` process on a free port in a temporary
folder, with an append-only file synced on every write, so a test may kill and restart it without
touching the shared server other engineers use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]


def stack_redis_url() -> str:
    """`DATA_PROC_REDIS_URL` from the environment, else from the local stack's `.stack/env`."""
    url = os.environ.get("DATA_PROC_REDIS_URL")
    if url:
        return url
    env_file = ROOT / ".stack" / "env"
    for line in env_file.read_text().splitlines():
        line = line.removeprefix("export ").strip()
        if line.startswith("DATA_PROC_REDIS_URL="):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise RuntimeError(f"DATA_PROC_REDIS_URL is neither set nor in {env_file}: start the stack (make up)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A `redis-server` owned by one test, with a password and an fsync-always append-only file."""

    password = "private-test-password"  # noqa: S105 - a throwaway server on loopback

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--requirepass", self.password, "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL the server (the append-only file keeps every acknowledged write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def instrument_prefix() -> Iterator[str]:
    """A unique instrument-id prefix: the test's keys cannot collide with anyone else's.

    The test's `md:*` keys in the stack's Redis are deleted afterwards.
    """
    prefix = f"T{uuid.uuid4().hex[:12]}"
    yield prefix
    url = os.environ.get("DATA_PROC_REDIS_URL")
    if url:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"md:*:{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
async def stack_redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(stack_redis_url())
    yield client
    await client.aclose()


class ServiceProcess:
    """`python -m projection` as a child process with its own environment, port and log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "DATA_PROC_HTTP__PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "projection"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        if wait_ready:
            self.wait_for(lambda: self.get("/ready")[0] == 200, timeout, "ready")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())
        except (urllib.error.URLError, OSError):
            return 0, b""

    def metric(self, name: str, **labels: str) -> float:
        _, body = self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log_path.read_text()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout waiting for {what}:\n" + self.log_path.read_text()[-4000:])
            time.sleep(0.2)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Any]:
    """Start projection services for this test; every one still running is killed at the end."""
    started: list[ServiceProcess] = []

    def make(env: dict[str, str], name: str = "projection") -> ServiceProcess:
        svc = ServiceProcess(env, tmp_path / f"{name}-{len(started)}.log")
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.kill9()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    yield server
    server.kill()
