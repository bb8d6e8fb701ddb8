"""A second, private local stack (Kafka, PostgreSQL cluster, Redis) for fault injection.

Built by `scripts/stack.sh up` with its own folder, ports and PostgreSQL cluster, so brokers can be
killed and databases stopped without touching the shared stack on the default ports. `destroy()`
stops all of it and drops the PostgreSQL cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dptools.pipeline import REPO

PG_VERSION = "15"


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export "):].partition("=")
            values[name] = value
    return values


@dataclass
class PrivateStack:
    """Kafka + PostgreSQL + Redis of one fault-injection run, under `folder`."""

    folder: Path
    cluster: str = field(default_factory=lambda: "dpf" + uuid.uuid4().hex[:8])
    kafka_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    postgres_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)

    def _stack_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
        env.update({
            "DATA_PROC_STACK_DIR": str(self.folder), "KAFKA_PORT": str(self.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port), "POSTGRES_PORT": str(self.postgres_port),
            "PG_CLUSTER": self.cluster, "REDIS_PORT": str(self.redis_port),
            "KAFKA_HEAP_MIN": "256m", "KAFKA_HEAP_MAX": "768m",
        })
        return env

    def up(self) -> None:
        """Start (or restart whatever is down of) the stack; idempotent."""
        self.folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["bash", str(REPO / "scripts" / "stack.sh"), "up"], env=self._stack_env(),
                                capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise RuntimeError("private stack did not come up:\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        self.settings = _env_file(self.folder / "env")

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers."""
        return self.settings["DATA_PROC_KAFKA_BOOTSTRAP"]

    @property
    def postgres_dsn(self) -> str:
        """DSN of the stack's `reference_data` database."""
        return self.settings["DATA_PROC_POSTGRES_DSN"]

    @property
    def redis_url(self) -> str:
        """Redis URL (password included)."""
        return self.settings["DATA_PROC_REDIS_URL"]

    def secrets(self) -> list[str]:
        """The generated passwords of this stack (for leak checks)."""
        found = []
        for line in (self.folder / "secrets").read_text().splitlines():
            if "=" in line:
                found.append(line.split("=", 1)[1].strip())
        return found

    def _pid(self, name: str) -> int | None:
        path = self.folder / "run" / f"{name}.pid"
        if not path.exists():
            return None
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def _wait_gone(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def kafka_stop(self, hard: bool) -> None:
        """Stop the broker: kill -9 (`hard`) or SIGTERM and wait for its clean shutdown."""
        pid = self._pid("kafka")
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
        self._wait_gone(pid, 5 if hard else 90)

    def redis_stop(self) -> None:
        """Stop Redis (SIGTERM: it saves its data set and exits)."""
        pid = self._pid("redis")
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            self._wait_gone(pid, 30)

    def redis_start(self) -> None:
        """Start Redis again with its generated configuration."""
        subprocess.run(["redis-server", str(self.folder / "redis" / "redis.conf")], check=True,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._pid("redis") is None:
            time.sleep(0.1)

    def postgres_stop(self) -> None:
        """Stop the PostgreSQL cluster (fast mode)."""
        subprocess.run(["pg_ctlcluster", PG_VERSION, self.cluster, "stop", "-m", "fast"], check=True,
                       capture_output=True, timeout=60)

    def postgres_start(self) -> None:
        """Start the PostgreSQL cluster."""
        subprocess.run(["pg_ctlcluster", PG_VERSION, self.cluster, "start"], check=True,
                       capture_output=True, timeout=60)

    def destroy(self) -> None:
        """Stop the broker and Redis, stop and drop the PostgreSQL cluster."""
        self.kafka_stop(hard=False)
        self.redis_stop()
        subprocess.run(["pg_dropcluster", PG_VERSION, self.cluster, "--stop"], check=False,
                       capture_output=True, timeout=120)
