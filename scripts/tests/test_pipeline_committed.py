"""Drained means committed: `uncommitted_inputs` and `wait_committed` against the real broker.

`Pipeline.wait_drained` reads the services' lag and consumed counts; the lag counts from the
consumer's position, which moves when a record is taken, before it is processed and committed. A
cycle still running (a slow sink, a loaded machine) therefore looks drained there. A check that must
see every output and external write (Redis, ClickHouse) reads the groups' committed offsets instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from dataproc_shared.records import InRecord
from dptools.pipeline import REPO, Pipeline, uncommitted_inputs, wait_committed
from dptools.privstack import free_port

pytestmark = pytest.mark.integration

LOOP_APP = REPO / "shared" / "tests" / "loop_app.py"


def produce_in_a_transaction(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Transactional, so the input ends with a commit marker past the last record."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"test-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for value in values:
        producer.produce(topic, value, b"XNYM:K1")
    producer.commit_transaction(30)


def test_a_cycle_in_progress_is_not_committed_although_consumed(
        topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
        tmp_path: Path) -> None:
    source, output = topic_factory("drain-in", 1), topic_factory("drain-out", 1)
    group = f"drain-group-{uuid.uuid4().hex[:8]}"
    hold = tmp_path / "hold"
    hold.touch()
    port = free_port()
    env = {**os.environ, "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap, "APP_INPUT": source,
           "APP_OUTPUT": output,
           "APP_CHANGELOG": topic_factory("drain-changelog", 1, {"cleanup.policy": "compact"}),
           "APP_HOLD_FILE": str(hold), "DATA_PROC_TOPICS__DEADLETTER": topic_factory("drain-dlq", 1),
           "DATA_PROC_KAFKA__GROUP_ID": group, "DATA_PROC_INSTANCE_ID": f"i{time.time_ns()}",
           "DATA_PROC_AUDIT_ENABLED": "false", "DATA_PROC_HTTP__PORT": str(port)}
    produce_in_a_transaction(kafka_bootstrap, source, [b"a", b"b", b"c", b"d", b"e"])
    with (tmp_path / "app.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(LOOP_APP)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        pipe = Pipeline(env=env, ports={"loopapp": port}, services=("loopapp",))
        deadline = time.monotonic() + 120
        while (pipe.lag_and_input() or (0.0, 0.0))[1] < 5:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            assert time.monotonic() < deadline, "the records were not consumed"
            time.sleep(0.2)
        # every record taken (the consumer's position is past them, which is what the lag counts
        # from), the cycle held before its commit: nothing of it is committed
        assert consume_all([output], timeout=30) == []
        assert uncommitted_inputs(kafka_bootstrap, {group: [source]}) == {f"{group} {source}[0]": 5}

        hold.unlink()
        wait_committed(kafka_bootstrap, {group: [source]}, timeout=60)
        # committed up to the commit marker that ends the input: nothing left, every output there
        assert uncommitted_inputs(kafka_bootstrap, {group: [source]}) == {}
        assert sorted(r.value for r in consume_all([output], timeout=30)) == [b"A|1", b"B|2", b"C|3", b"D|4",
                                                                               b"E|5"]
    finally:
        proc.kill()
        proc.wait(10)
