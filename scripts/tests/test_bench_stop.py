"""A benchmark stopped with SIGTERM stops what it started (real broker, PostgreSQL, Redis, services).

`python -m dptools.bench` starts four service processes and creates a set of `bench-<run id>-*`
topics; stopped by SIGTERM (a CI timeout, `kill`, a terminal closed) it must stop the services and
delete the topics as it does at its normal end, not leave them running on the shared machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]
from dptools.pipeline import REPO

pytestmark = pytest.mark.integration


def processes_of_run(run_id: str) -> list[int]:
    """Pids whose environment names the benchmark run (its services carry it in their instance id)."""
    marker = f"bench-{run_id}-".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def test_sigterm_stops_the_services_and_deletes_the_topics(tmp_path: Path) -> None:
    bootstrap = os.environ["DATA_PROC_KAFKA_BOOTSTRAP"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dptools.bench", "--ticks", "2000", "--drain-only", "--redis-db", "14",
         "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    run_id = None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"bench-([0-9a-f]{8})-raw", line)
            if found:
                run_id = found.group(1)
            if line.startswith("drain mode"):  # every service is ready and draining
                break
        assert run_id is not None, "".join(lines)
        assert len(processes_of_run(run_id)) >= 4, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 30
    while processes_of_run(run_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of_run(run_id) == []
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 30
    left = ["?"]
    while left and time.monotonic() < deadline:
        left = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"bench-{run_id}-")]
        time.sleep(0.5)
    assert left == []
    assert not list(tmp_path.glob("bench-*.json"))  # stopped runs write no result


def test_delete_topics_waits_for_the_broker_before_its_client_is_dropped() -> None:
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]
    from dptools.benchkit import delete_topics

    bootstrap = os.environ["DATA_PROC_KAFKA_BOOTSTRAP"]
    names = [f"test-delete-{os.getpid()}-{i}-{time.time_ns()}" for i in range(3)]
    creator = AdminClient({"bootstrap.servers": bootstrap})
    for future in creator.create_topics([NewTopic(n, num_partitions=2, replication_factor=1)
                                         for n in names], operation_timeout=30).values():
        future.result()

    def drop() -> None:  # the client goes out of scope at once, as in the benchmark's cleanup
        delete_topics(AdminClient({"bootstrap.servers": bootstrap}), [*names, "test-delete-never-existed"])

    drop()
    deadline = time.monotonic() + 15
    left = names
    while left and time.monotonic() < deadline:
        left = [n for n in names if n in creator.list_topics(timeout=10).topics]
        time.sleep(0.2)
    assert left == []
