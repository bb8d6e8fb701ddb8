"""What a transaction coordinator decided, read from its log (`__transaction_state`).

A hanging transaction's records need the marker its coordinator decided on; once the producer was
re-initialised (new epoch), the coordinator's current state no longer tells. Its log does: every
state change of a transactional id is a record keyed by the id (`TransactionLogKey`), valued with
the producer id and epoch, the status and the partitions of the transaction (`TransactionLogValue`
v0, or v1 with flexible encoding). `decision` finds the last state of the producer epoch that
listed the partition and the decision recorded from there on: `PrepareCommit`/`CompleteCommit` of
that producer epoch -> commit; `PrepareAbort`/`CompleteAbort`/`PrepareEpochFence` -> abort; a later
`Empty`/`Ongoing` state before any decision (the producer was re-initialised, or a new transaction
began: the coordinator had lost this one) -> abort; no state listing the partition -> abort (the
coordinator never knew these records).
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from dataproc_shared.kafka.wire import Reader

TOPIC = "__transaction_state"
_COMMIT = {2, 4}  # PrepareCommit, CompleteCommit
_ABORT = {3, 5, 7}  # PrepareAbort, CompleteAbort, PrepareEpochFence
_NEW_SESSION = {0, 1}  # Empty, Ongoing


@dataclass(frozen=True, slots=True)
class TxnState:
    """One record of the coordinator's log."""

    producer_id: int
    producer_epoch: int
    status: int
    partitions: frozenset[tuple[str, int]]


def java_hash(text: str) -> int:
    """`String.hashCode()` of the JVM (over UTF-16 code units), as a signed 32-bit integer."""
    h = 0
    for unit in struct.unpack(f"<{len(text.encode('utf-16-le')) // 2}H", text.encode("utf-16-le")):
        h = (31 * h + unit) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def partition_for(name: str, partitions: int) -> int:
    """The coordinator partition of a transactional id or group id: `Utils.abs(hashCode) % n`.

    As the broker computes it for `__transaction_state` and `__consumer_offsets`. Kafka's
    `Utils.abs` is `Math.abs` with `Integer.MIN_VALUE` mapped to 0, not the sign-bit mask of the
    record partitioner (`toPositive`): for a negative hash the two give different partitions
    (`docs/reliability.md`, finding 9).
    """
    h = java_hash(name)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


def decode_key(raw: bytes) -> str | None:
    """The transactional id of a `TransactionLogKey` (None for other key versions)."""
    r = Reader(raw)
    version = r.int16()
    if version != 0:
        return None
    n = r.int16()
    return raw[4:4 + n].decode()


def decode_value(raw: bytes) -> TxnState:
    """A `TransactionLogValue` (v0 or flexible v1)."""
    r = Reader(raw)
    version = r.int16()
    flexible = version >= 1
    pid, epoch, _timeout, status = r.int64(), r.int16(), r.int32(), r.int8()
    parts: set[tuple[str, int]] = set()
    count = r.compact_len() if flexible else r.int32()
    for _ in range(max(count, 0)):
        if flexible:
            topic = r.compact_str() or ""
            n = r.compact_len()
        else:
            topic = r.raw(r.int16()).decode()
            n = r.int32()
        for _ in range(max(n, 0)):
            parts.add((topic, r.int32()))
        if flexible:
            r.skip_tags()
    return TxnState(pid, epoch, status, frozenset(parts))


def history(admin: AdminClient, kafka_config: Mapping[str, Any], transactional_id: str,
            timeout_s: float = 10.0) -> list[TxnState]:
    """Every state of `transactional_id` still in the coordinator's log, oldest first."""
    meta = admin.list_topics(TOPIC, timeout=timeout_s).topics.get(TOPIC)
    if meta is None or not meta.partitions:
        return []
    partition = partition_for(transactional_id, len(meta.partitions))
    consumer = Consumer({**kafka_config, "group.id": f"dp-txnlog-{uuid.uuid4()}", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    states: list[TxnState] = []
    try:
        consumer.assign([TopicPartition(TOPIC, partition, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 3 * timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return states
                raise RuntimeError(f"reading {TOPIC}: {err}")
            key, value = msg.key(), msg.value()
            if key is None or decode_key(key) != transactional_id:
                continue
            if value is not None:
                states.append(decode_value(value))
        raise TimeoutError(f"{TOPIC}[{partition}] not read to its end")
    finally:
        consumer.close()


def decide(states: list[TxnState], producer_id: int, producer_epoch: int, topic: str,
           partition: int) -> Literal["commit", "abort"] | None:
    """The decision for the producer epoch's last transaction on `topic[partition]` (pure).

    None when the log shows the transaction still undecided (the coordinator will finish it).
    """
    last = None
    for i, st in enumerate(states):
        if (topic, partition) in st.partitions and st.producer_id == producer_id \
                and st.producer_epoch == producer_epoch:
            last = i
    if last is None:
        return "abort"
    for i, st in enumerate(states[last:]):
        if st.status in _COMMIT and st.producer_id == producer_id \
                and st.producer_epoch in (producer_epoch, producer_epoch + 1):
            return "commit"  # epoch + 1: a transaction.version 2 commit bumps the epoch
        if st.status in _ABORT:
            return "abort"
        if i > 0 and st.status in _NEW_SESSION:
            # a later transaction or a re-initialised producer began before any decision: the
            # coordinator had lost this one, it can never commit
            return "abort"
    return None


def decision(admin: AdminClient, kafka_config: Mapping[str, Any], transactional_id: str, producer_id: int,
             producer_epoch: int, topic: str, partition: int, timeout_s: float = 10.0
             ) -> Literal["commit", "abort"] | None:
    """`decide` over the coordinator's log of `transactional_id`; None when the log cannot tell."""
    states = history(admin, kafka_config, transactional_id, timeout_s)
    if not states:
        return None
    return decide(states, producer_id, producer_epoch, topic, partition)
