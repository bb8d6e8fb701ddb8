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
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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
def instrument_prefix() -> str:
    """A unique instrument-id prefix: the test's keys cannot collide with anyone else's."""
    return f"T{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def stack_redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(stack_redis_url())
    yield client
    await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    yield server
    server.kill()
