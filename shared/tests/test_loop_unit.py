"""Pure parts of the Kafka loop: error classes and header propagation (no broker)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError
from dataproc_shared.config import load_settings
from dataproc_shared.kafka.loop import KafkaLoop, classify
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import CORRELATION_HEADER, INGEST_TIME_HEADER, InRecord, OutRecord


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KafkaError(KafkaError._TIMED_OUT, retriable=True), "retriable"),
        (KafkaError(KafkaError.CONCURRENT_TRANSACTIONS, retriable=True, txn_requires_abort=True),
         "abortable"),
        (KafkaError(KafkaError._STATE, txn_requires_abort=True), "abortable"),
        (KafkaError(KafkaError._FENCED), "fatal"),
        (KafkaError(KafkaError.PRODUCER_FENCED), "fatal"),
        (KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, retriable=True), "fatal"),
        (KafkaError(KafkaError._FATAL, fatal=True), "fatal"),
        (KafkaError(KafkaError.UNKNOWN), "abortable"),
    ],
)
def test_error_classes(error: KafkaError, expected: str) -> None:
    assert classify(error) == expected


def rec(offset: int, key: bytes, headers: tuple[tuple[str, bytes], ...] = ()) -> InRecord:
    return InRecord(topic="in", partition=1, offset=offset, key=key, value=b"v", timestamp_ms=1_000,
                    headers=headers)


def loop() -> KafkaLoop:
    settings = load_settings(service="unit", kafka_bootstrap="127.0.0.1:1")
    return KafkaLoop(settings, PassthroughProcessor("out"), input_topics=["in"],
                     metrics=ServiceMetrics("unit"))


def test_headers_follow_the_source_record_or_the_nth_input_of_the_key() -> None:
    a0 = rec(10, b"A", ((CORRELATION_HEADER, b"c-a0"), (INGEST_TIME_HEADER, b"5")))
    a1 = rec(11, b"A")
    b0 = rec(12, b"B", ((CORRELATION_HEADER, b"c-b0"),))
    outputs = [
        OutRecord("out", b"A", b"1"),
        OutRecord("out", b"A", b"2"),
        OutRecord("out", b"A", b"3"),  # more outputs than inputs: the last input of the key
        OutRecord("out", b"X", b"4", source=b0),
        OutRecord("out", b"B", b"5", headers=((CORRELATION_HEADER, b"own"),)),
        OutRecord("out", b"none", b"6"),
    ]
    got = [dict(o.headers) for o in loop()._propagate_headers([a0, a1, b0], outputs)]
    assert got[0] == {CORRELATION_HEADER: b"c-a0", INGEST_TIME_HEADER: b"5"}
    assert got[1] == {CORRELATION_HEADER: b"in-1-11", INGEST_TIME_HEADER: b"1000000000"}
    assert got[2] == got[1]
    assert got[3][CORRELATION_HEADER] == b"c-b0"
    assert got[4][CORRELATION_HEADER] == b"own"
    assert got[5] == {}
