"""A service started while the broker is down waits for it (real processes, a private broker).

`python -m normalization` starts against a port where nothing listens yet: it serves its health
routes (unhealthy, `kafka` down with the reason, not ready, live) and keeps retrying; once a broker
comes up there (a private stack, `dptools.privstack`) and the topics are created, it becomes ready
and processes records.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from dataproc_shared.config import Settings, load_settings
from dataproc_shared.testing import ContractTopics, consume_all
from dataproc_shared.topics import ensure_topics, plan_topics
from dptools.pipeline import Pipeline, http_get
from dptools.privstack import PrivateStack, free_port

pytestmark = pytest.mark.integration


def _tick(i: int) -> bytes:
    ts = time.time_ns() - 60_000_000_000 + i
    return json.dumps({"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": ts, "price": "101.5",
                       "size": 1, "trade_id": f"s-{i}"}).encode()


def test_a_service_started_before_the_broker_waits_then_processes(tmp_path: Path) -> None:
    stack = PrivateStack(tmp_path / "stack")
    bootstrap = f"127.0.0.1:{stack.kafka_port}"
    tag = uuid.uuid4().hex[:10]
    topics = ContractTopics(raw=f"raw-{tag}", normalized=f"norm-{tag}", enriched=f"enr-{tag}",
                            bars=f"bars-{tag}", deadletter=f"dlq-{tag}", audit=f"audit-{tag}",
                            normalization_dedup_changelog=f"dedup-{tag}",
                            aggregation_windows_changelog=f"windows-{tag}", partitions=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
    env.update({"DATA_PROC_ENV": "local", "DATA_PROC_KAFKA_BOOTSTRAP": bootstrap,
                "DATA_PROC_LOG_LEVEL": "INFO",
                "DATA_PROC_KAFKA__GROUP_ID": f"startup-{tag}", "DATA_PROC_INSTANCE_ID": f"startup-{tag}",
                "DATA_PROC_AUDIT_SINKS": "kafka", "DATA_PROC_LOOP__STARTUP_BACKOFF_MAX_S": "2",
                "DATA_PROC_LOOP__STARTUP_TOPIC_WAIT_S": "120", **topics.env()})
    # The stack's ports are free until it starts: the service's port must not be one of them.
    taken = {stack.kafka_port, stack.controller_port, stack.postgres_port, stack.redis_port}
    port = free_port()
    while port in taken:
        port = free_port()
    pipe = Pipeline(env=env, ports={"normalization": port}, run_dir=tmp_path / "run",
                    log_dir=tmp_path / "logs", services=("normalization",))
    try:
        pipe.start("normalization")
        deadline = time.monotonic() + 60
        health: dict[str, object] = {}
        while time.monotonic() < deadline:
            status, body = http_get(pipe.url("normalization", "/health"))
            if status:
                health = json.loads(body)
                break
            time.sleep(0.2)
        assert health, pipe.log_tail("normalization")
        assert status == 503
        assert health["status"] == "unhealthy"
        kafka = health["dependencies"]["kafka"]  # type: ignore[index]
        assert kafka["status"] == "down"
        assert bootstrap in kafka["last_error"]
        assert http_get(pipe.url("normalization", "/ready"))[0] == 503
        assert http_get(pipe.url("normalization", "/live"))[0] == 200

        stack.up()  # the broker (and the rest of a private stack) comes up on that port
        assert pipe.pid("normalization") is not None, pipe.log_tail("normalization")
        assert http_get(pipe.url("normalization", "/ready"))[0] == 503  # no topics yet
        settings = load_settings(Settings, topics=topics.topic_options(), audit_kafka_topic=topics.audit)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), plan_topics(settings))
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        for i in range(20):
            producer.produce(topics.raw, key=b"XNYS:IBM", value=_tick(i))
        assert producer.flush(60) == 0

        pipe.wait_ready("normalization", 180)
        normalized = consume_all(bootstrap, [topics.normalized], expected=20, timeout=120)
        assert len(normalized) == 20
        log = (tmp_path / "logs" / "normalization.log").read_text(errors="replace")
        assert "waiting for kafka" in log
        assert "kafka reachable" in log
    finally:
        pipe.stop_all()
        stack.destroy()
