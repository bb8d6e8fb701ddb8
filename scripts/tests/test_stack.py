"""The local stack answers: Kafka transactions, PostgreSQL, Redis with its password, chDB, and the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis
from confluent_kafka import Producer
from dataproc_shared.clickhouse import connect

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _producer(bootstrap: str) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"test-{uuid.uuid4().hex}",
                         "enable.idempotence": True, "acks": "all"})
    producer.init_transactions(30)
    return producer


def test_kafka_transactions_and_read_committed(kafka_bootstrap: str, topic_factory, consume_all) -> None:
    topic = topic_factory("stack-txn", partitions=2)
    producer = _producer(kafka_bootstrap)
    producer.begin_transaction()
    producer.produce(topic, b"committed-1", key=b"XNYM:CLZ6", partition=0)
    producer.produce(topic, b"committed-2", key=b"XNYM:CLZ6", partition=1)
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted", key=b"XNYM:CLZ6", partition=0)
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed-3", key=b"XNYM:CLZ6", partition=0)
    producer.commit_transaction(30)

    committed = consume_all([topic], read_committed=True, timeout=30)
    assert sorted(r.value for r in committed) == [b"committed-1", b"committed-2", b"committed-3"]
    assert {r.key for r in committed} == {b"XNYM:CLZ6"}
    # The aborted record is in the log: a read_uncommitted reader sees it.
    everything = consume_all([topic], read_committed=False, timeout=30, expected=4)
    assert b"aborted" in {r.value for r in everything}


def test_broker_does_not_auto_create_topics(kafka_bootstrap: str) -> None:
    name = f"auto-{uuid.uuid4().hex}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.timeout.ms": 3000})
    errors: list[object] = []
    producer.produce(name, b"x", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(10)
    assert len(errors) == 1
    assert errors[0] is not None
    assert name not in producer.list_topics(timeout=10).topics


async def test_postgres_answers(pg_database: str) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        assert await conn.fetchval("SELECT 40 + 2") == 42
        version = await conn.fetchval("SHOW server_version")
        assert version.startswith("15.")
        assert await conn.fetchval("SELECT count(*) FROM instruments") == 0
    finally:
        await conn.close()


async def test_postgres_reference_database_exists() -> None:
    conn = await asyncpg.connect(os.environ["DATA_PROC_POSTGRES_DSN"])
    try:
        assert await conn.fetchval("SELECT current_database()") == "reference_data"
        assert await conn.fetchval("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user") is True
    finally:
        await conn.close()


def test_redis_round_trip_needs_the_password(redis_url: str, redis_key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"{redis_key_prefix}hello"
    try:
        client.hset(key, mapping={"price": "71.25", "version": "3"})
        assert client.hgetall(key) == {b"price": b"71.25", b"version": b"3"}
        assert client.info("server")["redis_version"].startswith("7.")
    finally:
        client.close()
    anonymous = redis.Redis(host="127.0.0.1", port=int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    with pytest.raises(redis.AuthenticationError):
        anonymous.get(key)
    anonymous.close()


def test_redis_key_prefix_cleanup(redis_url: str) -> None:
    from dataproc_shared.testing import delete_key_prefix

    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(f"{prefix}a", 1)
        client.set(f"{prefix}b", 2)
        client.set(f"{prefix[:-1]}x", 3)  # shares the start of the prefix but not the prefix itself
        assert delete_key_prefix(redis_url, prefix) == 2
        assert client.exists(f"{prefix}a", f"{prefix}b") == 0
        assert client.delete(f"{prefix[:-1]}x") == 1
    finally:
        client.close()


def test_chdb_replacing_merge_tree_final(chdb_path: str) -> None:
    client = connect(f"chdb://{chdb_path}")
    try:
        client.command("CREATE DATABASE s")
        client.command("CREATE TABLE s.b (k String, v Float64, version UInt64) "
                       "ENGINE = ReplacingMergeTree(version) ORDER BY k")
        for version, value in ((1, 1.0), (3, 3.0), (2, 2.0)):
            client.insert("s.b", [["bar", value, version]], ["k", "v", "version"])
        assert client.query("SELECT v, version FROM s.b FINAL").rows == ((3.0, 3),)
    finally:
        client.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120, check=False)


def test_topics_cli_twice_same_result(kafka_admin) -> None:
    suffix = uuid.uuid4().hex[:10]
    env = {f"DATA_PROC_TOPICS__{k.upper()}": f"cli-{k}-{suffix}"
           for k in ("raw", "normalized", "enriched", "bars", "deadletter", "normalization_dedup_changelog",
                     "aggregation_windows_changelog")}
    env |= {"DATA_PROC_AUDIT_KAFKA_TOPIC": f"cli-audit-{suffix}", "DATA_PROC_TOPICS__PARTITIONS": "2"}
    try:
        first = _cli("dptools.topics", "create", env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.count("created") == 8
        second = _cli("dptools.topics", "create", env=env)
        assert second.returncode == 0, second.stderr
        assert second.stdout.count("exists") == 8
        listing = _cli("dptools.topics", "list", env=env)
        assert f"cli-raw-{suffix}" in listing.stdout
        mismatch = _cli("dptools.topics", "create", env={**env, "DATA_PROC_TOPICS__PARTITIONS": "3"})
        assert mismatch.returncode == 1
        assert "mismatch" in mismatch.stdout
    finally:
        topics = [v for k, v in env.items() if k != "DATA_PROC_TOPICS__PARTITIONS"]
        for future in kafka_admin.delete_topics(topics, operation_timeout=30).values():
            future.exception()


def test_migrate_cli_twice_same_result(pg_dsn_factory, tmp_path: Path) -> None:
    dsn = pg_dsn_factory(migrate=False)
    env = {"DATA_PROC_POSTGRES_DSN": dsn, "DATA_PROC_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}"}
    first = _cli("dptools.migrate", "all", env=env)
    assert first.returncode == 0, first.stderr
    assert "postgres: applied 001_reference_tables.sql" in first.stdout
    assert "clickhouse: applied 001_create_database.sql" in first.stdout
    second = _cli("dptools.migrate", "all", env=env)
    assert second.returncode == 0, second.stderr
    assert "postgres: applied nothing new" in second.stdout
    assert "clickhouse: applied nothing new" in second.stdout


def test_stack_status_reports_every_part_up() -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), "status"], capture_output=True,
                            text=True, timeout=30, check=True)
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for part in ("kafka", "postgres", "redis"):
        assert lines[part].split()[1] == "up", result.stdout
    assert "127.0.0.1:" in lines["kafka"]
