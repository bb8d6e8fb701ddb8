from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from confluent_kafka import Producer
from dataproc_shared.records import InRecord
from dataproc_shared.state import ChangelogStore


def store(codec: str = "json", topic: str = "cl", bootstrap: str = "127.0.0.1:1") -> ChangelogStore:
    return ChangelogStore(topic=topic, kafka_config={"bootstrap.servers": bootstrap}, codec=codec,  # type: ignore[arg-type]
                          restore_timeout_s=30)


def test_put_get_delete_items_per_partition() -> None:
    s = store()
    s.put(0, "a", {"n": 1})
    s.put(1, "a", [2])
    s.put(0, "b", 3)
    assert s.get(0, "a") == {"n": 1}
    assert s.get(1, "a") == [2]
    assert s.get(2, "a", "none") == "none"
    s.delete(0, "b")
    s.delete(0, "missing")
    assert list(s.items(0)) == [("a", {"n": 1})]
    assert len(s) == 2
    assert s.partitions == {0, 1}


def test_pending_changes_last_write_wins_with_tombstones_on_the_input_partition() -> None:
    s = store()
    s.put(3, "k", 1)
    s.put(3, "k", 2)
    s.put(5, "gone", 1)
    s.delete(5, "gone")
    changes = {(r.partition, r.key): r.value for r in s.pending_changes()}
    assert changes == {(3, b"k"): b"2", (5, b"gone"): None}
    assert all(r.topic == "cl" for r in s.pending_changes())
    assert s.pending_changes() == []


def test_bytes_codec_refuses_other_values() -> None:
    s = store("bytes")
    s.put(0, "k", b"\x00\x01")
    assert s.pending_changes()[0].value == b"\x00\x01"
    with pytest.raises(TypeError):
        s.put(0, "k", "text")


def test_apply_and_drop() -> None:
    s = store()
    target: dict[int, dict[str, object]] = {}
    s.apply(target, 1, b"x", b'{"v":1}')
    s.apply(target, 1, b"y", b"2")
    s.apply(target, 1, b"x", None)
    assert target == {1: {"y": 2}}
    s.put(1, "z", 1)
    s.drop([1])
    assert s.partitions == frozenset()
    assert s.pending_changes() == []


@pytest.mark.integration
async def test_restore_reads_committed_state_and_reload_forgets_uncommitted(
    topic_factory: Callable[..., str], kafka_bootstrap: str, consume_all: Callable[..., list[InRecord]],
) -> None:
    topic = topic_factory("state-cl", 2, {"cleanup.policy": "compact"})
    writer = store(topic=topic, bootstrap=kafka_bootstrap)
    writer.put(0, "a", 1)
    writer.put(1, "b", {"x": [1, 2]})
    writer.put(1, "c", 3)
    writer.delete(1, "c")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for rec in writer.pending_changes():
        producer.produce(rec.topic, rec.value, rec.key, partition=rec.partition)
    producer.commit_transaction(30)
    # An aborted transaction must not show up in a restore.
    producer.begin_transaction()
    producer.produce(topic, b"99", b"a", partition=0)
    producer.abort_transaction(30)

    reader = store(topic=topic, bootstrap=kafka_bootstrap)
    await reader.restore([0, 1])
    assert dict(reader.items(0)) == {"a": 1}
    assert dict(reader.items(1)) == {"b": {"x": [1, 2]}}
    reader.put(0, "a", 42)
    await reader.reload()
    assert reader.get(0, "a") == 1
    assert reader.pending_changes() == []
    # An empty partition restores to an empty state.
    empty_topic = topic_factory("state-empty", 1, {"cleanup.policy": "compact"})
    empty = store(topic=empty_topic, bootstrap=kafka_bootstrap)
    await empty.restore([0])
    assert empty.partitions == {0}
    assert list(empty.items(0)) == []


@pytest.mark.integration
async def test_restore_waits_for_an_open_transaction_on_the_changelog(
    topic_factory: Callable[..., str], kafka_bootstrap: str,
) -> None:
    topic = topic_factory("state-open", 1, {"cleanup.policy": "compact"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"1", b"before", partition=0)
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"2", b"pending", partition=0)
    assert producer.flush(10) == 0

    reader = store(topic=topic, bootstrap=kafka_bootstrap)
    restoring = asyncio.create_task(reader.restore([0]))
    await asyncio.sleep(1.5)
    assert not restoring.done()  # the open transaction's outcome is not known yet
    await asyncio.to_thread(producer.commit_transaction, 30)
    await asyncio.wait_for(restoring, 30)
    assert dict(reader.items(0)) == {"before": 1, "pending": 2}
