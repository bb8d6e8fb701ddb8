"""pytest plugin with factory fixtures over the real local stack (loaded by the root `conftest.py`).

Every test gets its own resources, named by uuid and removed afterwards, so tests can share one broker,
one PostgreSQL server and one Redis with each other and with running services:

- `kafka_bootstrap`, `kafka_admin`;
- `topic_factory(name_prefix="t", partitions=1, config=None) -> topic name` (deleted after the test);
- `contract_topics(partitions=1) -> ContractTopics`: every topic of the plan under uuid names, with
  the plan's settings (`.env()` gives the `DATA_PROC_TOPICS__...` variables, `.topic_options()` the
  settings group); deleted after the test;
- `consume_all(topics, read_committed=True, timeout=30.0, expected=None) -> list[InRecord]`
  (also importable as a plain function, `consume_all(bootstrap, topics, ...)`);
- `pg_dsn_factory(migrate=True) -> DSN` of a fresh database (migrations applied), dropped after;
  `pg_database` is one such DSN;
- `redis_url`, `redis_key_prefix` (keys under it are deleted after the test);
- `chdb_path` (an empty folder for an embedded ClickHouse engine), `chdb_client` (a client on it with
  the ClickHouse migrations applied).

The stack's connection settings come from `DATA_PROC_*` variables (`.stack/env`, loaded by the root
conftest). A fixture whose part of the stack is not configured fails the test with what to run:
tests that need the stack are never silently skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dataproc_shared.clickhouse import ChdbClickHouse
from dataproc_shared.migrate import migrate_clickhouse, migrate_postgres
from dataproc_shared.records import InRecord

T = TypeVar("T")


def _stack_setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: bring the local stack up with `make up` (it writes .stack/env)",
                    pytrace=False)
    return value


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also when an event loop already runs here."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def unique_name(prefix: str) -> str:
    """`<prefix>-<12 hex digits>`."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---- Kafka ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of the local broker (`DATA_PROC_KAFKA_BOOTSTRAP`)."""
    return _stack_setting("DATA_PROC_KAFKA_BOOTSTRAP")


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    """An AdminClient on the local broker."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def topic_factory(kafka_admin: AdminClient) -> Iterator[Callable[..., str]]:
    """Create uuid-named topics for this test; all of them are deleted when it ends."""
    created: list[str] = []

    def create(name_prefix: str = "t", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = unique_name(name_prefix)
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30, request_timeout=30,
        )
        futures[name].result()
        created.append(name)
        return name

    yield create
    if created:
        for future in kafka_admin.delete_topics(created, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # already gone is fine at teardown
                future.result()


@dataclass(frozen=True, slots=True)
class ContractTopics:
    """uuid-named stand-ins for every topic of the plan (`plan_topics`), created with its settings."""

    raw: str
    normalized: str
    enriched: str
    bars: str
    deadletter: str
    audit: str
    normalization_dedup_changelog: str
    aggregation_windows_changelog: str
    partitions: int

    def topic_options(self) -> dict[str, Any]:
        """The `topics` settings group naming these topics (`load_settings(topics=...)`)."""
        return {"raw": self.raw, "normalized": self.normalized, "enriched": self.enriched,
                "bars": self.bars, "deadletter": self.deadletter, "partitions": self.partitions,
                "side_partitions": 1,
                "normalization_dedup_changelog": self.normalization_dedup_changelog,
                "aggregation_windows_changelog": self.aggregation_windows_changelog}

    def env(self) -> dict[str, str]:
        """The same as `DATA_PROC_...` variables, for a service started as a process."""
        env = {f"DATA_PROC_TOPICS__{k.upper()}": str(v) for k, v in self.topic_options().items()}
        env["DATA_PROC_AUDIT_KAFKA_TOPIC"] = self.audit
        return env


@pytest.fixture
def contract_topics(kafka_admin: AdminClient) -> Iterator[Callable[..., ContractTopics]]:
    """`contract_topics(partitions=1) -> ContractTopics`: the whole topic plan under uuid names.

    Each topic gets the partition count and the settings (retention, message size limits, cleanup
    policy) the topic tooling would give it; all are deleted when the test ends.
    """
    from dataproc_shared.config import Settings, load_settings
    from dataproc_shared.topics import ensure_topics, plan_topics

    created: list[str] = []

    def create(partitions: int = 1) -> ContractTopics:
        tag = uuid.uuid4().hex[:12]
        topics = ContractTopics(
            raw=f"raw-{tag}", normalized=f"norm-{tag}", enriched=f"enr-{tag}", bars=f"bars-{tag}",
            deadletter=f"dlq-{tag}", audit=f"audit-{tag}", normalization_dedup_changelog=f"dedup-cl-{tag}",
            aggregation_windows_changelog=f"windows-cl-{tag}", partitions=partitions,
        )
        settings = load_settings(Settings, topics=topics.topic_options(), audit_kafka_topic=topics.audit)
        specs = plan_topics(settings)
        created.extend(spec.name for spec in specs)
        ensure_topics(kafka_admin, specs)
        return topics

    yield create
    if created:
        for future in kafka_admin.delete_topics(created, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # already gone is fine at teardown
                future.result()


def consume_all(
    bootstrap: str,
    topics: Sequence[str],
    *,
    read_committed: bool = True,
    timeout: float = 30.0,
    expected: int | None = None,
) -> list[InRecord]:
    """Every message of `topics` from the beginning, in partition order per partition.

    Without `expected`: reads until each partition's position reaches its end offset as of the call
    (read_committed: aborted records are skipped, and an open transaction is waited for).
    With `expected`: reads until that many messages arrived (ends re-checked as messages come).
    Raises TimeoutError when neither happens within `timeout` seconds.
    """
    conf: dict[str, str | int | float | bool] = {
        "bootstrap.servers": bootstrap,
        "group.id": unique_name("consume-all"),
        "enable.auto.commit": False,
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        "auto.offset.reset": "earliest",
    }
    consumer = Consumer(conf)
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [TopicPartition(t, p, -2) for t in topics for p in sorted(metadata.topics[t].partitions)]
        consumer.assign(partitions)
        ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
                for tp in partitions}
        records: list[InRecord] = []
        deadline = time.monotonic() + timeout
        while True:
            if expected is not None and len(records) >= expected:
                return records
            if expected is None:
                positions = consumer.position([TopicPartition(t, p) for t, p in ends])
                if all(end == 0 or tp.offset >= end
                       for tp, end in zip(positions, ends.values(), strict=True)):
                    return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"consume_all({list(topics)}): {len(records)} messages after {timeout}s"
                                   + (f", expected {expected}" if expected is not None else ""))
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(f"consume_all: {error}")
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if topic is None or partition is None or offset is None:
                continue
            headers = tuple(_header(item) for item in (msg.headers() or []))
            records.append(InRecord(
                topic=topic, partition=partition, offset=offset, key=msg.key(), value=msg.value(),
                timestamp_ms=msg.timestamp()[1], headers=headers,
            ))
    finally:
        consumer.close()


def _header(item: Any) -> tuple[str, bytes]:
    name, value = item[0], item[1]
    return str(name), value if isinstance(value, bytes) else str(value or "").encode()


@pytest.fixture(name="consume_all")
def consume_all_fixture(kafka_bootstrap: str) -> Callable[..., list[InRecord]]:
    """`consume_all` bound to the local broker: `consume_all(topics, read_committed=..., timeout=...)`."""

    def bound(topics: Sequence[str], **kwargs: Any) -> list[InRecord]:
        return consume_all(kafka_bootstrap, topics, **kwargs)

    return bound


# ---- PostgreSQL -----------------------------------------------------------------------------------


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture
def pg_dsn_factory() -> Iterator[Callable[..., str]]:
    """Create uuid-named databases, returning each one's DSN; all are dropped when the test ends.

    The databases belong to the stack's role; migrations are applied unless `migrate=False`.
    """
    import asyncpg

    base = _stack_setting("DATA_PROC_POSTGRES_DSN")
    created: list[str] = []

    def create(migrate: bool = True) -> str:
        name = "t_" + uuid.uuid4().hex[:16]

        async def make() -> None:
            conn = await asyncpg.connect(base)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        _run_sync(make())
        created.append(name)
        dsn = _with_database(base, name)
        if migrate:
            _run_sync(migrate_postgres(dsn))
        return dsn

    yield create

    async def drop_all() -> None:
        conn = await asyncpg.connect(base)
        try:
            for name in created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    if created:
        _run_sync(drop_all())


@pytest.fixture
def pg_database(pg_dsn_factory: Callable[..., str]) -> str:
    """DSN of a fresh database with the PostgreSQL migrations applied (dropped after the test)."""
    return pg_dsn_factory()


# ---- Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the local Redis, password included (`DATA_PROC_REDIS_URL`)."""
    return _stack_setting("DATA_PROC_REDIS_URL")


def delete_key_prefix(url: str, prefix: str) -> int:
    """Delete every key starting with `prefix`; return how many were deleted."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix.replace("*", r"\*") + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()


@pytest.fixture
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A uuid key prefix (`test:<hex>:`) for this test; every key under it is deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_key_prefix(redis_url, prefix)


# ---- ClickHouse (embedded engine) -----------------------------------------------------------------


@pytest.fixture
def chdb_path(tmp_path: Path) -> str:
    """An empty folder for this test's embedded ClickHouse engine."""
    path = tmp_path / "chdb"
    path.mkdir()
    return str(path)


@pytest.fixture
def chdb_client(chdb_path: str) -> Iterator[ChdbClickHouse]:
    """A chDB client on `chdb_path` with the ClickHouse migrations applied; closed after the test.

    One process can hold one chDB folder at a time: do not open `chdb_path` a second time meanwhile.
    """
    client = ChdbClickHouse(chdb_path)
    try:
        migrate_clickhouse(client)
        yield client
    finally:
        client.close()
