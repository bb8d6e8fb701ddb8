from __future__ import annotations

import os
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from dataproc_shared.partitioning import instrument_key, murmur2, partition_for, to_positive

# Vectors of Kafka's own UtilsTest.testMurmur2 (Java) and librdkafka's rdmurmur2 unit test.
JAVA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]
LIBRDKAFKA_VECTORS = [(b"kafka", 0xD067CF64), (b"giberish123456789", 0x8F552B0C), (b"", 0x106E08D9)]


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS)
def test_murmur2_matches_java(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), LIBRDKAFKA_VECTORS)
def test_murmur2_matches_librdkafka(key: bytes, expected: int) -> None:
    assert murmur2(key) & 0xFFFFFFFF == expected


def test_partition_for_is_positive_modulo() -> None:
    for key, hashed in JAVA_VECTORS:
        for n in (1, 3, 6, 12, 64):
            assert partition_for(key, n) == to_positive(hashed) % n
            assert 0 <= partition_for(key, n) < n
    assert partition_for(b"21", 6) == (-973932308 & 0x7FFFFFFF) % 6


def test_partition_for_rejects_zero_partitions() -> None:
    with pytest.raises(ValueError, match="positive"):
        partition_for(b"x", 0)


def test_instrument_key() -> None:
    assert instrument_key("XNYM", "CLZ6") == b"XNYM:CLZ6"


@pytest.mark.integration
def test_same_partition_as_the_client_murmur2_partitioner() -> None:
    """librdkafka's Java-compatible partitioner, on the real broker, agrees with `partition_for`."""
    bootstrap = os.environ.get("DATA_PROC_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    topic = f"test.partitioning.{uuid.uuid4().hex}"
    partitions = 7
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
    try:
        producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2"})
        delivered: dict[bytes, int] = {}

        def on_delivery(err: object, msg: object) -> None:
            assert err is None
            delivered[msg.key()] = msg.partition()  # type: ignore[attr-defined]

        keys = [f"XV{i}:SYM{i * 7}".encode() for i in range(40)] + [b"XNYM:CLZ6", b"BINANCE:BTCUSDT"]
        for key in keys:
            producer.produce(topic, key=key, value=b"x", on_delivery=on_delivery)
        assert producer.flush(30) == 0
        assert len(delivered) == len(keys)
        assert {k: partition_for(k, partitions) for k in keys} == delivered
        assert len(set(delivered.values())) > 1
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)
