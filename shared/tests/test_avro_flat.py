"""The generated flat-record codecs against fastavro: same bytes, same records, same error classes."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import pytest
from dataproc_shared import avro
from dataproc_shared.avro import HEADER_SIZE, DecodeError, EncodeError, default_registry
from dataproc_shared.avro_flat import compile_flat, read_long, write_long
from fastavro import schemaless_reader, schemaless_writer
from fastavro.utils import generate_many
from hypothesis import given, settings
from hypothesis import strategies as st

SCHEMAS = ["normalized_tick", "enriched_tick", "bar"]
LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _fastavro_bytes(name: str, record: dict[str, Any]) -> bytes:
    version = default_registry().get(name)
    buf = io.BytesIO()
    schemaless_writer(buf, version.parsed, record)
    return version.header + buf.getvalue()


def _record_strategy(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Records of a flat schema with edge values: extreme longs, non-ASCII strings, nulls, inf/nan."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in default_registry().get(name).source["fields"]:
        t = field["type"]
        nullable = isinstance(t, list)
        base = t[1] if nullable else t
        if isinstance(base, dict) and base.get("type") == "enum":
            s: st.SearchStrategy[Any] = st.sampled_from(base["symbols"])
        elif isinstance(base, dict):  # logical type on a long
            s = LONGS
        elif base == "string":
            s = st.text(max_size=40)
        elif base == "long":
            s = LONGS
        elif base == "int":
            s = st.integers(min_value=-(2**31), max_value=2**31 - 1)
        elif base == "double":
            s = st.floats(allow_nan=False) | st.sampled_from([math.inf, -math.inf, 0.0, -0.0])
        elif base == "boolean":
            s = st.booleans()
        else:  # pragma: no cover - a new field type needs a strategy here
            raise AssertionError(f"no strategy for {t!r}")
        parts[field["name"]] = st.none() | s if nullable else s
    return st.fixed_dictionaries(parts)


def test_every_message_schema_has_a_flat_codec() -> None:
    for name in SCHEMAS:
        version = default_registry().get(name)
        assert compile_flat(avro._strip_logical(version.source)) is not None, name


def test_non_flat_schemas_are_left_to_fastavro() -> None:
    nested = {"type": "record", "name": "N", "fields": [
        {"name": "inner", "type": {"type": "record", "name": "I", "fields": [{"name": "x", "type": "int"}]}}]}
    assert compile_flat(nested) is None
    union = {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["int", "string"]}]}
    assert compile_flat(union) is None
    array = {"type": "record", "name": "A",
             "fields": [{"name": "a", "type": {"type": "array", "items": "int"}}]}
    assert compile_flat(array) is None
    assert compile_flat("string") is None


@pytest.mark.parametrize("name", SCHEMAS)
def test_generated_records_give_fastavros_bytes(name: str) -> None:
    version = default_registry().get(name)
    for record in generate_many(version.parsed, 200):
        data = avro.encode(name, record)
        assert data == _fastavro_bytes(name, record)
        assert avro.decode(data, name) == record


@pytest.mark.parametrize("name", SCHEMAS)
def test_edge_values_match_fastavro(name: str) -> None:
    @settings(max_examples=150, deadline=None)
    @given(_record_strategy(name))
    def check(record: dict[str, Any]) -> None:
        data = avro.encode(name, record)
        assert data == _fastavro_bytes(name, record)
        version = default_registry().get(name)
        expected = schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), version.parsed, None)
        assert avro.decode(data, name) == expected

    check()


@given(LONGS)
def test_varint_round_trip(n: int) -> None:
    raw = write_long(n)
    assert read_long(raw + b"\xff", 0) == (n, len(raw))
    assert len(raw) <= 10


def test_missing_optional_fields_take_the_default() -> None:
    record = {"venue": "XNYM", "symbol": "CLZ6", "kind": "QUOTE", "ts_ns": 1, "ingest_ns": 2,
              "source_partition": 0, "source_offset": 3}
    data = avro.encode("normalized_tick", record)
    assert data == _fastavro_bytes("normalized_tick", record)
    assert avro.decode(data, "normalized_tick")["bid"] is None


@pytest.mark.parametrize("bad", [
    {"venue": None}, {"ts_ns": "soon"}, {"ts_ns": 2**63}, {"kind": "AUCTION"}, {"price": "1.5"},
    {"source_partition": None},
])
def test_records_that_do_not_fit_are_encode_errors(bad: dict[str, Any]) -> None:
    record = {"venue": "XNYM", "symbol": "CLZ6", "kind": "TRADE", "ts_ns": 1, "ingest_ns": 2,
              "source_partition": 0, "source_offset": 3, "price": 1.0, "size": 1.0, **bad}
    with pytest.raises(EncodeError):
        avro.encode("normalized_tick", record)
    missing = {k: v for k, v in record.items() if k != "ts_ns"} if "ts_ns" not in bad else None
    if missing is not None:
        with pytest.raises(EncodeError):
            avro.encode("normalized_tick", missing)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_truncation_is_a_decode_error(name: str) -> None:
    record = next(iter(generate_many(default_registry().get(name).parsed, 1)))
    data = avro.encode(name, record)
    for cut in range(HEADER_SIZE, len(data)):
        with pytest.raises(DecodeError):
            avro.decode(data[:cut], name)


def test_corrupt_union_index_and_enum_are_decode_errors() -> None:
    base = {"venue": "V", "symbol": "S", "kind": "TRADE", "ts_ns": 1, "seq": None, "ingest_ns": 2,
            "source_partition": 0, "source_offset": 3}
    data = bytearray(avro.encode("normalized_tick", base))
    # venue "V", symbol "S": 2 + 2 bytes, kind (1 byte), ts_ns (1 byte), then the seq union index
    union_at = HEADER_SIZE + 6
    assert data[union_at] == 0
    data[union_at] = 4
    with pytest.raises(DecodeError):
        avro.decode(bytes(data), "normalized_tick")
    data = bytearray(avro.encode("normalized_tick", base))
    data[HEADER_SIZE + 4] = 0x06  # enum index 3 of 2 symbols
    with pytest.raises(DecodeError):
        avro.decode(bytes(data), "normalized_tick")
    data[HEADER_SIZE + 4] = 0x01  # enum index -1
    with pytest.raises(DecodeError):
        avro.decode(bytes(data), "normalized_tick")


def test_doubles_are_little_endian_ieee() -> None:
    record = {"venue": "V", "symbol": "S", "kind": "TRADE", "ts_ns": 0, "price": 1.5, "ingest_ns": 0,
              "source_partition": 0, "source_offset": 0}
    data = avro.encode("normalized_tick", record)
    assert struct.pack("<d", 1.5) in data


def _varint_per_byte(n: int) -> bytes:
    """The zig-zag varint written one 7-bit group at a time (the specification's loop)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


@given(LONGS)
def test_varint_matches_the_per_byte_encoding(n: int) -> None:
    assert write_long(n) == _varint_per_byte(n)


def test_varint_at_every_length_boundary() -> None:
    for bits in range(64):
        for n in (2**bits - 1, 2**bits, -(2**bits), -(2**bits) - 1):
            if -(2**63) <= n <= 2**63 - 1:
                assert write_long(n) == _varint_per_byte(n), n
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="64-bit"):
            write_long(bad)


def _outcome(read: Any, data: bytes) -> Any:
    try:
        return read(data)
    except DecodeError:
        return "DecodeError"


@pytest.mark.parametrize("name", SCHEMAS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_field_reader_accepts_and_refuses_what_decode_does(name: str, data: st.DataObject) -> None:
    """Generated records, then truncated and with bytes overwritten: the same outcome as `decode`."""
    registry = default_registry()
    names = [f["name"] for f in registry.get(name).source["fields"]]
    keep = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
    read = registry.field_reader(name, keep)
    message = bytearray(avro.encode(name, data.draw(_record_strategy(name))))
    variants = [bytes(message), bytes(message[:data.draw(st.integers(HEADER_SIZE, len(message)))])]
    for _ in range(3):
        at = data.draw(st.integers(HEADER_SIZE, len(message) - 1))
        message[at] = data.draw(st.sampled_from([0x00, 0x01, 0x02, 0x04, 0x7F, 0x80, 0xC3, 0xFF]))
        variants.append(bytes(message))
    for variant in variants:
        full = _outcome(lambda b: avro.decode(b, name), variant)
        expected = full if full == "DecodeError" else {k: full[k] for k in names if k in keep}
        assert repr(_outcome(read, variant)) == repr(expected)  # repr: an overwritten double may be NaN


def test_field_reader_checks_skipped_fields() -> None:
    registry = default_registry()
    read = registry.field_reader("normalized_tick", ["venue"])
    base = {"venue": "V", "symbol": "S", "kind": "TRADE", "ts_ns": 1, "seq": None, "trade_id": "\u00e9",
            "ingest_ns": 2, "source_partition": 0, "source_offset": 3}
    data = avro.encode("normalized_tick", base)
    assert read(data) == {"venue": "V"}
    bad_utf8 = data.replace("\u00e9".encode(), b"\xff\xfe")
    with pytest.raises(DecodeError):
        avro.decode(bad_utf8, "normalized_tick")
    with pytest.raises(DecodeError):
        read(bad_utf8)
    eleven_byte_varint = data[:HEADER_SIZE + 5] + b"\xff" * 10 + b"\x01" + data[HEADER_SIZE + 6:]
    with pytest.raises(DecodeError):
        avro.decode(eleven_byte_varint, "normalized_tick")
    with pytest.raises(DecodeError):
        read(eleven_byte_varint)
    with pytest.raises(avro.UnknownSchemaError):
        registry.field_reader("normalized_tick", ["no_such_field"])


def test_field_reader_decodes_other_writer_versions_in_full() -> None:
    registry = default_registry()
    record = {"venue": "V", "symbol": "S", "kind": "QUOTE", "ts_ns": 1, "seq": 5, "bid": 1.0, "ingest_ns": 2,
              "source_partition": 0, "source_offset": 3}
    data = avro.encode("normalized_tick", record)
    foreign = data[:2] + bytes(8) + data[HEADER_SIZE:]  # an unknown writer: decode's error
    with pytest.raises(avro.UnknownFingerprintError):
        registry.field_reader("normalized_tick", ["venue"])(foreign)
