"""Hostile input on the raw-tick path: the real transform (unit) and the running service (integration)."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from dataproc_shared.records import InRecord
from dataproc_shared.testing import ContractTopics
from dptools import fuzz
from dptools.pipeline import Pipeline, http_get


def test_fuzzing_the_transform_crashes_nothing_and_accounts_for_everything() -> None:
    report = fuzz.run(6_000, seed=3)
    assert report.crashes == []
    assert report.unaccounted == 0
    assert report.bad_avro == 0
    assert report.insane_outputs == []
    assert sum(report.outcomes.values()) == 6_000
    # every family is exercised and the hostile ones are mostly rejected
    assert len(report.by_family) == 13
    for family in ("random_bytes", "deep_json", "raw_number_literal", "not_object", "truncated"):
        assert set(report.by_family[family]) <= {"dead_lettered"}, family
    assert report.by_family["valid"].get("normalized", 0) > 300
    assert report.rss_growth_mib < report.rss_bound_mib
    assert report.ok


def test_generator_is_seeded_and_covers_the_families() -> None:
    first = [(c.family, c.key, c.value) for c in fuzz.cases(500, seed=9)]
    again = [(c.family, c.key, c.value) for c in fuzz.cases(500, seed=9)]
    assert first == again
    assert len({family for family, _, _ in first}) == 13
    assert any(v is not None and len(v) >= 10_000 for _, _, v in first), "no huge message"


@pytest.mark.parametrize("ts", ["1e-400", "4.9e-324", 1e-320, "0.0000000000000000001"])
def test_a_timestamp_that_rounds_to_zero_is_rejected(ts: object) -> None:
    from dataproc_shared.records import DeadLetterReason
    from normalization.transform import Lineage, Rejection, parse_tick

    body = json.dumps({"venue": "XNYS", "symbol": "IBM", "type": "trade", "ts": ts, "price": 1, "size": 1,
                       "trade_id": "t1"}).encode()
    outcome = parse_tick(body, lineage=Lineage(1, 0, 0), now_ns=time.time_ns(), max_future_skew_ns=10**12)
    assert isinstance(outcome, Rejection)
    assert outcome.reason is DeadLetterReason.BAD_TIMESTAMP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_hostile_messages_through_the_running_service(
    contract_topics: Callable[..., ContractTopics], kafka_bootstrap: str, tmp_path: Path,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    run_id = "fuzz-" + uuid.uuid4().hex[:8]
    topics = contract_topics(2)  # with the plan's settings: the dead-letter topic takes 1 MB records
    raw, audit = topics.raw, topics.audit
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
    env.update({"DATA_PROC_ENV": "local", "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap,
                "DATA_PROC_LOG_LEVEL": "WARNING", "DATA_PROC_KAFKA__GROUP_ID": run_id,
                "DATA_PROC_INSTANCE_ID": run_id, **topics.env()})
    pipe = Pipeline(env=env, ports={"normalization": _free_port()}, run_dir=tmp_path / "run",
                    log_dir=tmp_path / "logs", services=("normalization",))
    cases = list(fuzz.cases(2_000, seed=5))
    assert any(c.value is not None and len(c.value) >= 1_000_000 for c in cases), "no 1 MB message"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 8_000_000})
    for case in cases:
        producer.produce(raw, key=case.key, value=case.value)
        producer.poll(0)
    assert producer.flush(60) == 0
    try:
        pipe.start("normalization")
        pipe.wait_ready("normalization", 120)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status, body = http_get(pipe.url("normalization", "/metrics"))
            assert status == 200, pipe.log_tail("normalization")
            done = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                       if line.startswith("dp_messages_in_total"))
            if done >= len(cases):
                break
            time.sleep(1)
        pipe.wait_drained(timeout=120)
        assert pipe.pid("normalization") is not None, "the service died on hostile input"
        status, health = http_get(pipe.url("normalization", "/health"))
        assert status == 200, health
    finally:
        pipe.stop_all()
    normalized = consume_all([topics.normalized], timeout=60)
    dead = [json.loads(r.value) for r in consume_all([topics.deadletter], timeout=60) if r.value]
    dups = [json.loads(r.value) for r in consume_all([audit], timeout=60) if r.value]
    dups = [d for d in dups if d.get("event_type") == "duplicate_dropped"]
    assert len(normalized) + len(dead) + len(dups) == len(cases)
    assert Counter(d["service"] for d in dead) == Counter({"normalization": len(dead)})
    assert len(dead) > len(cases) // 2
