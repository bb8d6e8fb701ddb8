"""Hanging transactions are found and resolved without an operator (`dataproc_shared.kafka.hanging`).

A hanging transaction (records beyond the last stable offset that no marker will ever close) cannot
be created on a broker that verifies transactional writes (KIP-890 part 1, on by default): that is
what the verification prevents, and a broker restart is needed to lose a marker (finding 6 of
docs/reliability.md). So this test runs a private broker (`PrivateStack`, the shared one keeps its
configuration) where `transaction.partition.verification.enable` is switched off while the
transactions are made by hand with the wire client - a transactional batch that its coordinator
never heard of, and a write after its producer's transaction was committed - and switched on again
before they are resolved. It costs one private stack start (~20 s); there is no cheaper way to
reach the condition deterministically.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)
from dataproc_shared.kafka import wire
from dataproc_shared.kafka.hanging import HangingTransaction, HangingTransactionResolver
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.state import ChangelogStore
from dptools.privstack import PrivateStack

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    s = PrivateStack(Path(tmp_path_factory.mktemp("hanging")) / "stack")
    try:
        s.up()
        # a first transactional producer makes the broker create its transaction state topic
        Producer({"bootstrap.servers": s.bootstrap, "transactional.id": "warm-up"}).init_transactions(60)
        yield s
    finally:
        s.destroy()


def _verification(bootstrap: str, on: bool) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ConfigResource.Type.BROKER, "1", incremental_configs=[ConfigEntry(
        "transaction.partition.verification.enable", "true" if on else "false",
        incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        check = ConfigResource(ConfigResource.Type.BROKER, "1")
        value = admin.describe_configs([check])[check].result(timeout=10)[
            "transaction.partition.verification.enable"].value
        if value == ("true" if on else "false"):
            return
        time.sleep(0.2)
    raise AssertionError("broker config did not change")


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"hang-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)
    return name


def _connect(bootstrap: str) -> wire.Connection:
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    return wire.Connection(host, int(port))


def _watermarks(bootstrap: str, topic: str, partition: int) -> tuple[int, int]:
    """(last stable offset, high watermark) of a partition."""
    ends = []
    for isolation in ("read_committed", "read_uncommitted"):
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid.uuid4()}",
                             "isolation.level": isolation})
        try:
            ends.append(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
        finally:
            consumer.close()
    return ends[0], ends[1]


def _committed_values(bootstrap: str, topic: str, partition: int) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4()}",
                         "isolation.level": "read_committed", "enable.partition.eof": True,
                         "auto.offset.reset": "earliest"})
    values: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, partition, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                break
            values.append(msg.value() or b"")
    finally:
        consumer.close()
    return values


def test_unknown_transaction_is_aborted_and_the_restore_reads_on(stack: PrivateStack) -> None:
    bootstrap = stack.bootstrap
    topic = _topic(bootstrap, 2)
    committed = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    committed.produce(topic, key=b"kept", value=b'"before"', partition=0)
    assert committed.flush(30) == 0

    _verification(bootstrap, on=False)
    try:
        with _connect(bootstrap) as conn:
            # a transactional id that its coordinator knows only as initialised (state Empty): the
            # batch below was never added to a transaction, so no marker will ever close it
            txn_id = f"hang-{uuid.uuid4().hex[:6]}"
            pid, epoch = wire.init_producer_id(conn, txn_id, 10_000)
            batch = wire.record_batch([(b"lost", b'"hanging"')], producer_id=pid, producer_epoch=epoch,
                                      base_sequence=0, transactional=True,
                                      timestamp_ms=int(time.time() * 1000) - HOUR_MS)
            wire.produce(conn, topic, 0, batch, transactional_id=txn_id)
    finally:
        _verification(bootstrap, on=True)
    lso, hw = _watermarks(bootstrap, topic, 0)
    assert (lso, hw) == (1, 2)  # the hanging record holds the stable end back

    metrics = ServiceMetrics("test")
    resolver = HangingTransactionResolver({"bootstrap.servers": bootstrap}, hanging_after_s=60.0,
                                          metrics=metrics)
    # younger than the threshold: not touched
    assert HangingTransactionResolver({"bootstrap.servers": bootstrap},
                                      hanging_after_s=2 * 3600.0).resolve(topic, [0, 1]) == []
    store = ChangelogStore(topic=topic, kafka_config={"bootstrap.servers": bootstrap}, codec="json",
                           restore_timeout_s=60, hanging=resolver, hanging_check_after_s=1.0)
    started = time.monotonic()
    asyncio.run(store.restore([0, 1]))
    assert time.monotonic() - started < 30
    assert store.get(0, "kept") == "before"
    assert store.get(0, "lost") is None  # aborted, never restored
    [found] = resolver.last
    assert (found.topic, found.partition, found.producer_id, found.action) == (topic, 0, pid, "abort")
    assert found.coordinator_state == "Empty"
    assert found.open_s > 3000
    lso, hw = _watermarks(bootstrap, topic, 0)
    assert lso == hw == 3  # record, hanging record, abort marker
    assert _committed_values(bootstrap, topic, 0) == [b'"before"']
    assert 'dp_hanging_transactions_total{action="abort",service="test"} 1.0' in metrics.render().decode()


def test_committed_transaction_missing_its_marker_is_committed(stack: PrivateStack) -> None:
    """The coordinator completed the producer's transaction, one partition has no marker: commit it."""
    bootstrap = stack.bootstrap
    topic = _topic(bootstrap, 1)
    txn_id = f"done-{uuid.uuid4().hex[:6]}"
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                         "transaction.timeout.ms": 10_000})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"a", value=b'"committed"', partition=0)
    producer.commit_transaction(30)
    with _connect(bootstrap) as conn:
        pid = _pid_of(conn, topic)
        deadline = time.monotonic() + 30
        # commit_transaction returns once PrepareCommit is durable; the markers follow
        while (state := wire.list_transactions(conn, [pid])[0].state) != "CompleteCommit":
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        [active] = wire.describe_producers(conn, topic, [0])[0]
        _verification(bootstrap, on=False)
        try:
            # what a lost marker leaves: records of the committed producer epoch, no marker after them
            batch = wire.record_batch([(b"b", b'"lost marker"')], producer_id=pid,
                                      producer_epoch=active.producer_epoch,
                                      base_sequence=active.last_sequence + 1, transactional=True,
                                      timestamp_ms=int(time.time() * 1000) - HOUR_MS)
            wire.produce(conn, topic, 0, batch, transactional_id=txn_id)
        finally:
            _verification(bootstrap, on=True)
    lso, hw = _watermarks(bootstrap, topic, 0)
    assert lso < hw

    resolver = HangingTransactionResolver({"bootstrap.servers": bootstrap}, hanging_after_s=60.0)
    [found] = resolver.resolve(topic, [0])
    assert (found.action, found.coordinator_state) == ("commit", "CompleteCommit")
    lso, hw = _watermarks(bootstrap, topic, 0)
    assert lso == hw
    assert _committed_values(bootstrap, topic, 0) == [b'"committed"', b'"lost marker"']


def _pid_of(conn: wire.Connection, topic: str) -> int:
    [active] = wire.describe_producers(conn, topic, [0])[0]
    return active.producer_id


def test_transaction_in_progress_at_its_coordinator_is_left_alone(stack: PrivateStack) -> None:
    bootstrap = stack.bootstrap
    topic = _topic(bootstrap, 1)
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"open-{uuid.uuid4().hex[:6]}",
                         "transaction.timeout.ms": 60_000})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"a", value=b"1", partition=0)
    assert producer.flush(30) == 0
    # any age counts as hanging here: the coordinator's `Ongoing` is what keeps it
    resolver = HangingTransactionResolver({"bootstrap.servers": bootstrap}, hanging_after_s=0.0)
    [found] = resolver.resolve(topic, [0])
    assert (found.action, found.coordinator_state) == ("left", "Ongoing")
    lso, hw = _watermarks(bootstrap, topic, 0)
    assert lso < hw  # no marker was written
    producer.commit_transaction(30)  # the producer still owns its transaction
    assert _committed_values(bootstrap, topic, 0) == [b"1"]
    # the group's offsets partition of __consumer_offsets is reachable the same way (nothing open)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "hang-group"})
    consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    consumer.close()
    assert resolver.resolve_group("hang-group") == []


def _old_epoch_left_open(bootstrap: str, topic: str, txn_id: str) -> int:
    """An epoch-0 transactional record on `topic[0]` that its coordinator lost (state `Empty`).

    What an abandoned producer leaves after a broker stop (finding 8): its records reached the
    partition, the coordinator does not know the transaction any more. Returns the producer id.
    """
    _verification(bootstrap, on=False)
    try:
        with _connect(bootstrap) as conn:
            pid, epoch = wire.init_producer_id(conn, txn_id, 10_000)
            assert epoch == 0
            batch = wire.record_batch([(b"old", b'"old epoch"')], producer_id=pid, producer_epoch=epoch,
                                      base_sequence=0, transactional=True,
                                      timestamp_ms=int(time.time() * 1000))
            wire.produce(conn, topic, 0, batch, transactional_id=txn_id)
    finally:
        _verification(bootstrap, on=True)
    return pid


def _new_epoch_commits(bootstrap: str, topic: str, txn_id: str,
                       resolver: HangingTransactionResolver | None) -> list[HangingTransaction]:
    """A new producer with the same transactional id commits one record on `topic[0]`.

    With `resolver`, the loop's step after `init_transactions` runs first (older epochs closed).
    """
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                         "transaction.timeout.ms": 10_000})
    producer.init_transactions(30)
    resolved = [] if resolver is None else resolver.resolve_older_epochs(txn_id, [topic, "no-such-topic"])
    producer.begin_transaction()
    producer.produce(topic, key=b"new", value=b'"new epoch"', partition=0)
    producer.commit_transaction(30)
    return resolved


def test_a_new_epoch_commit_closes_an_older_epochs_lost_transaction(stack: PrivateStack) -> None:
    """Finding 8: the first COMMIT marker of the new epoch makes the old epoch's records visible."""
    bootstrap = stack.bootstrap
    topic = _topic(bootstrap, 1)
    txn_id = f"epoch-{uuid.uuid4().hex[:6]}"
    _old_epoch_left_open(bootstrap, topic, txn_id)
    assert _watermarks(bootstrap, topic, 0) == (0, 1)
    assert _new_epoch_commits(bootstrap, topic, txn_id, None) == []
    # the aborted-by-nobody record of epoch 0 is committed along with epoch 1's record
    assert _committed_values(bootstrap, topic, 0) == [b'"old epoch"', b'"new epoch"']


def test_older_epochs_transaction_is_aborted_before_the_new_epoch_writes(stack: PrivateStack) -> None:
    bootstrap = stack.bootstrap
    topic = _topic(bootstrap, 2)
    txn_id = f"epoch-{uuid.uuid4().hex[:6]}"
    pid = _old_epoch_left_open(bootstrap, topic, txn_id)
    metrics = ServiceMetrics("test")
    resolver = HangingTransactionResolver({"bootstrap.servers": bootstrap}, metrics=metrics)
    [found] = _new_epoch_commits(bootstrap, topic, txn_id, resolver)
    assert (found.topic, found.partition, found.producer_id, found.producer_epoch, found.action) == (
        topic, 0, pid, 0, "abort")
    assert _committed_values(bootstrap, topic, 0) == [b'"new epoch"']
    lso, hw = _watermarks(bootstrap, topic, 0)
    assert lso == hw == 4  # old record, abort marker, new record, commit marker
    assert 'dp_hanging_transactions_total{action="abort",service="test"} 1.0' in metrics.render().decode()
    # nothing of an older epoch open any more: a second check finds nothing
    assert resolver.resolve_older_epochs(txn_id, [topic]) == []
