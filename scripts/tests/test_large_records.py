"""Raw records near and above the size limits through `python -m normalization` on the real broker.

Every bad record reaches the dead-letter topic and the partition keeps flowing: a ~1 MB record
(the raw topic's default limit) is dead-lettered whole, and one larger than the dead-letter topic
takes (an operator raised the raw topic's limit only) is dead-lettered with its payload truncated.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from dataproc_shared import avro
from dataproc_shared.deadletter import TRUNCATED_HEADER, decode_dead_letter
from dataproc_shared.records import InRecord
from dataproc_shared.testing import ContractTopics
from dptools.pipeline import Pipeline

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tick(i: int, **extra: object) -> bytes:
    ts = time.time_ns() - 60_000_000_000 + i
    return json.dumps({"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": ts, "price": "101.5",
                       "size": 1 + i, "trade_id": f"big-{i}", **extra}).encode()


def test_huge_records_are_dead_lettered_and_the_partition_keeps_flowing(
    contract_topics: Callable[..., ContractTopics], kafka_bootstrap: str, kafka_admin: AdminClient,
    tmp_path: Path, consume_all: Callable[..., list[InRecord]],
) -> None:
    topics = contract_topics(1)
    # The operator allows 3 MB raw records but leaves the dead-letter topic at its planned size.
    entry = ConfigEntry("max.message.bytes", "3000000", incremental_operation=AlterConfigOpType.SET)
    for future in kafka_admin.incremental_alter_configs(
            [ConfigResource(ResourceType.TOPIC, topics.raw, incremental_configs=[entry])]).values():
        future.result()
    one_mb = os.urandom(1_040_000)  # not UTF-8, just under the raw topic's default limit
    huge = b"\xff" + b"x" * 2_500_000  # above what the dead-letter topic takes base64-encoded
    values = [_tick(1), one_mb, _tick(2, pad="p" * 1_000_000), huge, _tick(3)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 8_000_000})
    for value in values:
        producer.produce(topics.raw, key=b"XNYS:IBM", value=value)
    assert producer.flush(60) == 0

    run_id = "big-" + uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
    env.update({"DATA_PROC_ENV": "local", "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap,
                "DATA_PROC_LOG_LEVEL": "INFO", "DATA_PROC_KAFKA__GROUP_ID": run_id,
                "DATA_PROC_INSTANCE_ID": run_id, "DATA_PROC_AUDIT_SINKS": "kafka", **topics.env()})
    pipe = Pipeline(env=env, ports={"normalization": _free_port()}, run_dir=tmp_path / "run",
                    log_dir=tmp_path / "logs", services=("normalization",))
    try:
        pipe.start("normalization")
        normalized = consume_all([topics.normalized], expected=3, timeout=120)
        dead = consume_all([topics.deadletter], expected=2, timeout=60)
        assert pipe.pid("normalization") is not None, pipe.log_tail("normalization")
    finally:
        pipe.stop_all()
    # the tick after each huge record got through, in order
    assert [avro.decode(r.value or b"", "normalized_tick")["trade_id"] for r in normalized] == [
        "big-1", "big-2", "big-3"]
    whole, cut = (decode_dead_letter(r.value or b"") for r in dead)
    assert (whole["reason"], whole["source_offset"], whole["payload"]) == ("not_utf8", 1, one_mb)
    assert TRUNCATED_HEADER not in dict(dead[0].headers)
    assert (cut["reason"], cut["source_offset"]) == ("not_utf8", 3)
    assert dict(dead[1].headers)[TRUNCATED_HEADER] == b"2500001"
    kept = len(cut["payload"])
    assert 1_000_000 < kept < len(huge)
    assert cut["payload"] == huge[:kept]
    assert cut["detail"].endswith(f"[payload truncated: {kept} of 2500001 bytes kept]")
    log = (tmp_path / "logs" / "normalization.log").read_text(errors="replace")
    assert "dead letter payload truncated" in log
    assert "cycle rolled back" not in log
