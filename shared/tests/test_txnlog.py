"""Decoding the transaction coordinator's log and deciding a hanging transaction's marker (pure)."""

from __future__ import annotations

import struct

from dataproc_shared.kafka import txnlog
from dataproc_shared.kafka.txnlog import TxnState
from dataproc_shared.kafka.wire import compact_array, compact_str


def test_partition_of_a_transactional_id_follows_the_jvm_hash() -> None:
    assert txnlog.java_hash("hello") == 99162322
    assert txnlog.java_hash("normalization-FLT-normalization-a") == _jvm("normalization-FLT-normalization-a")
    assert txnlog.partition_for("hello", 50) == 99162322 % 50



def test_partition_of_a_negative_hash_is_its_absolute_value_modulo() -> None:
    """`Utils.abs(hashCode) % n` as the broker computes it, not the partitioner's sign-bit mask.

    The transactional id of the failed broker fault run (seed 11): its states were in
    `__transaction_state` partition 6 of 8; the mask gave 2, whose log was empty.
    """
    name = "normalization-FLT668D84BB-normalization-a"
    assert txnlog.java_hash(name) == -1264821622
    assert txnlog.partition_for(name, 8) == 6
    assert txnlog.partition_for(name, 50) == 1264821622 % 50
    assert txnlog.partition_for("polygenelubricants", 50) == 0  # hashCode() == Integer.MIN_VALUE


def _jvm(text: str) -> int:
    h = 0
    for ch in text:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def test_key_and_values_v0_and_v1_decode() -> None:
    key = struct.pack(">hh", 0, 3) + b"tid"
    assert txnlog.decode_key(key) == "tid"
    v0 = (struct.pack(">hqhib", 0, 7, 2, 10_000, 1) + struct.pack(">i", 1) + struct.pack(">h", 1) + b"t"
          + struct.pack(">iii", 2, 0, 2) + struct.pack(">qq", 5, 4))
    assert txnlog.decode_value(v0) == TxnState(7, 2, 1, frozenset({("t", 0), ("t", 2)}))
    part = compact_str("t") + compact_array([struct.pack(">i", 1)]) + b"\x00"
    v1 = (struct.pack(">hqhib", 1, 7, 3, 10_000, 4) + compact_array([part]) + struct.pack(">qq", 5, 4)
          + b"\x00")
    assert txnlog.decode_value(v1) == TxnState(7, 3, 4, frozenset({("t", 1)}))


def test_decision_is_the_one_recorded_after_the_partition_was_listed() -> None:
    p = frozenset({("out", 0), ("offsets", 3)})
    committed = [TxnState(7, 1, 1, p), TxnState(7, 1, 2, p), TxnState(7, 1, 4, frozenset()),
                 TxnState(7, 2, 0, frozenset())]  # then the producer was re-initialised (Empty)
    assert txnlog.decide(committed, 7, 1, "out", 0) == "commit"
    aborted = [TxnState(7, 1, 1, p), TxnState(7, 2, 7, p), TxnState(7, 2, 3, p),
               TxnState(7, 2, 5, frozenset())]
    assert txnlog.decide(aborted, 7, 1, "out", 0) == "abort"
    assert txnlog.decide(committed, 7, 1, "other", 0) == "abort"  # never part of a transaction
    assert txnlog.decide([TxnState(7, 1, 1, p)], 7, 1, "out", 0) is None  # still undecided


def test_an_epoch_lost_by_its_coordinator_is_never_committed_by_a_later_epoch() -> None:
    p = frozenset({("dl", 0)})
    # epoch 0 listed the partition; the coordinator lost it (re-initialised: Empty, epoch 1), then
    # epoch 1 committed a transaction of its own: that decision is not epoch 0's
    lost = [TxnState(7, 0, 1, p), TxnState(7, 1, 0, frozenset()), TxnState(7, 1, 1, p),
            TxnState(7, 1, 2, p), TxnState(7, 1, 4, frozenset())]
    assert txnlog.decide(lost, 7, 0, "dl", 0) == "abort"
    # a later transaction of the same epoch began with no decision recorded for this one
    assert txnlog.decide([TxnState(7, 0, 1, p), TxnState(7, 0, 1, frozenset({("x", 1)}))],
                         7, 0, "dl", 0) == "abort"
    # a commit of the epoch (or of its bumped epoch under transaction.version 2) is this one's
    assert txnlog.decide([TxnState(7, 0, 1, p), TxnState(7, 1, 2, p)], 7, 0, "dl", 0) == "commit"
