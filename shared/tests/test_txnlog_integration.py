"""The coordinator's log of a transactional id is found where the broker keeps it (real broker)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from dataproc_shared.kafka import txnlog

pytestmark = pytest.mark.integration


def _negative_hash_id(partitions: int) -> str:
    """A transactional id whose hash is negative and whose mask and absolute value differ mod n."""
    while True:
        name = f"txnlog-{uuid.uuid4().hex}"
        h = txnlog.java_hash(name)
        if h < 0 and (h & 0x7FFFFFFF) % partitions != abs(h) % partitions:
            return name


def test_the_log_of_a_negative_hash_transactional_id_is_read(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    """Before the fix, such ids read an empty (or another id's) partition: no decision, a wrong abort."""
    topic = topic_factory("txnlog", 1)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": "txnlog-warmup"})
    producer.init_transactions(30)  # makes sure __transaction_state exists
    meta = admin.list_topics(txnlog.TOPIC, timeout=10).topics[txnlog.TOPIC]
    name = _negative_hash_id(len(meta.partitions))
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": name})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"v", partition=0)
    producer.commit_transaction(30)
    states = txnlog.history(admin, {"bootstrap.servers": kafka_bootstrap}, name)
    assert states, f"no state of {name} in {txnlog.TOPIC}[{txnlog.partition_for(name, len(meta.partitions))}]"
    listed = [st for st in states if (topic, 0) in st.partitions]
    assert listed
    assert txnlog.decide(states, listed[0].producer_id, listed[0].producer_epoch, topic, 0) == "commit"
