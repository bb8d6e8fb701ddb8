"""The wire-protocol encoding of `dataproc_shared.kafka.wire` (no broker; the requests themselves are
exercised against a real one in `scripts/tests/test_hanging_transactions.py`)."""

from __future__ import annotations

import struct

import pytest
from dataproc_shared.kafka import wire


@pytest.mark.parametrize(("value", "encoded"), [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"),
                                                 (128, b"\x80\x01"), (300, b"\xac\x02"),
                                                 (2**31, b"\x80\x80\x80\x80\x08")])
def test_unsigned_varints_round_trip(value: int, encoded: bytes) -> None:
    assert wire.uvarint(value) == encoded
    assert wire.Reader(encoded).uvarint() == value


def test_signed_varints_are_zigzag() -> None:
    assert [wire.varint(v) for v in (0, -1, 1, -2, 63, -64)] == [b"\x00", b"\x01", b"\x02", b"\x03",
                                                                 b"\x7e", b"\x7f"]


def test_compact_strings_and_arrays() -> None:
    assert wire.compact_str(None) == b"\x00"
    assert wire.compact_str("ab") == b"\x03ab"
    assert wire.compact_array([b"x", b"y"]) == b"\x03xy"
    r = wire.Reader(wire.compact_str("topic") + wire.compact_str(None) + b"\x02\x00\x00\x00\x07")
    assert r.compact_str() == "topic"
    assert r.compact_str() is None
    assert r.compact_len() == 1
    assert r.int32() == 7


def test_crc32c_check_value() -> None:
    # the standard check value of CRC-32C (Castagnoli)
    assert wire.crc32c(b"123456789") == 0xE3069283


def test_record_batch_header_and_checksum() -> None:
    batch = wire.record_batch([(b"k", b"v"), (None, b"w")], producer_id=7, producer_epoch=2,
                              base_sequence=5, transactional=True, timestamp_ms=1_000)
    base_offset, length, _leader_epoch, magic = struct.unpack(">qiib", batch[:17])
    assert (base_offset, length, magic) == (0, len(batch) - 12, 2)
    crc = struct.unpack(">I", batch[17:21])[0]
    assert crc == wire.crc32c(batch[21:])
    attributes, last_delta, first_ts, max_ts, pid, epoch, seq, count = struct.unpack(
        ">hiqqqhii", batch[21:61])
    assert attributes & 0x10  # transactional
    assert (last_delta, first_ts, max_ts, pid, epoch, seq, count) == (1, 1_000, 1_000, 7, 2, 5, 2)


def test_tagged_fields_are_skipped() -> None:
    # two tagged fields (tag 0 with 2 bytes, tag 5 with 1 byte), then an INT16
    r = wire.Reader(b"\x02\x00\x02ab\x05\x01c\x00\x2a")
    r.skip_tags()
    assert r.int16() == 42


def test_truncated_response_is_an_error() -> None:
    with pytest.raises(wire.WireError):
        wire.Reader(b"\x00").int32()


def test_sasl_is_not_spoken() -> None:
    assert not wire.WireSecurity(protocol="SASL_SSL").supported
    with pytest.raises(wire.WireError, match="not supported"):
        wire.Connection("127.0.0.1", 1, security=wire.WireSecurity(protocol="SASL_PLAINTEXT"))
