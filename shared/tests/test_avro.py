from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from dataproc_shared import avro
from dataproc_shared.avro import (
    MARKER,
    SCHEMAS_DIR,
    BadMarkerError,
    DecodeError,
    EncodeError,
    SchemaRegistry,
    UnknownFingerprintError,
    UnknownSchemaError,
    check_compatibility,
    check_schema_evolution,
    default_registry,
    fingerprint_of,
)
from dataproc_shared.errors import AvroError
from fastavro.utils import generate_many

EMPTY = 0xC15D213AA4D7A795


def crc64_avro(data: bytes) -> int:
    """The reference algorithm of the Avro specification ("Schema Fingerprints")."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


NORMALIZED = {
    "venue": "XNYM", "symbol": "CLZ6", "kind": "TRADE", "ts_ns": 1_763_908_200_123_456_000, "seq": 1234,
    "trade_id": "T-88121", "price": 71.25, "size": 3.0, "bid": None, "ask": None, "bid_size": None,
    "ask_size": None, "ingest_ns": 1_763_908_200_200_000_000, "source_partition": 2, "source_offset": 99,
}


def test_fingerprint_of_null_matches_the_specification() -> None:
    # Avro's own test vector: CRC-64-AVRO of "null" is 7195948357588979594 (as a Java long).
    assert int.from_bytes(fingerprint_of("null"), "little", signed=True) == 7195948357588979594


def test_fingerprints_match_reference_crc() -> None:
    for name in default_registry().names:
        for v in default_registry().versions(name):
            assert v.fingerprint == crc64_avro(v.canonical.encode()).to_bytes(8, "little")


def test_every_schema_file_is_loaded() -> None:
    files = {p.name.split(".")[0] for p in SCHEMAS_DIR.glob("*.avsc")}
    assert set(default_registry().names) == files
    assert {"normalized_tick", "enriched_tick", "bar"} <= files


def test_single_object_framing() -> None:
    data = avro.encode("normalized_tick", NORMALIZED)
    schema = default_registry().get("normalized_tick")
    assert data[:2] == b"\xc3\x01" == MARKER
    assert data[2:10] == schema.fingerprint
    assert data[2:10] == crc64_avro(schema.canonical.encode()).to_bytes(8, "little")
    assert avro.decode(data, "normalized_tick") == NORMALIZED


@pytest.mark.parametrize("name", ["normalized_tick", "enriched_tick", "bar"])
def test_round_trip_generated_records(name: str) -> None:
    version = default_registry().get(name)
    for record in generate_many(version.parsed, 50):
        data = avro.encode(name, record)
        assert avro.decode(data, name) == record


def test_bar_times_are_plain_milliseconds() -> None:
    bar: dict[str, Any] = {
        "instrument_id": "CL.Z26", "venue": "XNYM", "symbol": "CLZ6", "currency": "USD", "interval": "1m",
        "window_start_ms": 1_763_908_200_000, "window_end_ms": 1_763_908_260_000, "open": 1.0, "high": 2.0,
        "low": 0.5, "close": 1.5, "volume": 10.0, "vwap": 1.2, "trade_count": 4, "is_final": True,
        "version": 7, "first_ts_ns": 1, "last_ts_ns": 2, "max_ingest_ns": 3, "source_partition": 0,
        "offset_from": 10, "offset_to": 13,
    }
    assert avro.decode(avro.encode("bar", bar), "bar") == bar


def test_bad_marker_and_short_messages() -> None:
    data = avro.encode("normalized_tick", NORMALIZED)
    with pytest.raises(BadMarkerError):
        avro.decode(b"\x00\x01" + data[2:], "normalized_tick")
    with pytest.raises(BadMarkerError):
        avro.decode(data[:9], "normalized_tick")
    with pytest.raises(BadMarkerError):
        avro.decode(b'{"venue": "XNYM"}', "normalized_tick")


def test_unknown_fingerprint() -> None:
    data = avro.encode("normalized_tick", NORMALIZED)
    with pytest.raises(UnknownFingerprintError, match="fingerprint"):
        avro.decode(data[:2] + b"\x00" * 8 + data[10:], "normalized_tick")


def test_truncated_body_is_a_decode_error() -> None:
    data = avro.encode("normalized_tick", NORMALIZED)
    with pytest.raises(DecodeError):
        avro.decode(data[:20], "normalized_tick")
    assert issubclass(DecodeError, AvroError)


def test_unknown_schema_and_bad_record() -> None:
    with pytest.raises(UnknownSchemaError):
        avro.encode("nope", {})
    with pytest.raises(EncodeError):
        avro.encode("normalized_tick", {**NORMALIZED, "kind": "AUCTION"})
    with pytest.raises(EncodeError):
        avro.encode("normalized_tick", {**NORMALIZED, "ts_ns": "soon"})


def test_shipped_schemas_are_backward_compatible() -> None:
    assert check_schema_evolution() == []


# ---- evolution with a second version next to v1 -----------------------------------------------------------

def _v1() -> dict[str, Any]:
    return json.loads((SCHEMAS_DIR / "normalized_tick.v1.avsc").read_text())


def _registry_with(tmp_path: Path, v2: dict[str, Any]) -> SchemaRegistry:
    shutil.copy(SCHEMAS_DIR / "normalized_tick.v1.avsc", tmp_path / "normalized_tick.v1.avsc")
    (tmp_path / "normalized_tick.v2.avsc").write_text(json.dumps(v2))
    return SchemaRegistry.from_directory(tmp_path)


def test_new_reader_reads_old_writer(tmp_path: Path) -> None:
    v2 = _v1()
    v2["fields"].append({"name": "condition", "type": "string", "default": "regular"})
    v2["fields"][2]["type"]["symbols"] = ["TRADE", "QUOTE", "AUCTION"]
    for f in v2["fields"]:
        if f["name"] == "source_partition":
            f["type"] = "long"  # int -> long is a legal promotion
    registry = _registry_with(tmp_path, v2)
    assert check_schema_evolution(registry) == []
    old = registry.encode("normalized_tick.v1", NORMALIZED)
    assert registry.writer_of(old).version == 1
    decoded = registry.decode(old, "normalized_tick")  # newest = v2
    assert decoded == {**NORMALIZED, "condition": "regular"}
    new = registry.encode("normalized_tick", {**NORMALIZED, "condition": "odd-lot"})
    assert registry.writer_of(new).version == 2
    assert registry.decode(new, "normalized_tick")["condition"] == "odd-lot"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("new_field_without_default", "new field without a default"),
        ("type_change", "cannot be read as"),
        ("enum_symbol_removed", "removed without a reader default"),
        ("renamed_record", "is not reader"),
    ],
)
def test_incompatible_versions_are_reported(tmp_path: Path, change: str, expected: str) -> None:
    v2 = _v1()
    if change == "new_field_without_default":
        v2["fields"].append({"name": "condition", "type": "string"})
    elif change == "type_change":
        v2["fields"][0]["type"] = "int"
    elif change == "enum_symbol_removed":
        v2["fields"][2]["type"]["symbols"] = ["TRADE"]
    else:
        v2["name"] = "Tick"
    problems = check_schema_evolution(_registry_with(tmp_path, v2))
    assert problems
    assert expected in problems[0]
    assert problems[0].startswith("normalized_tick.v2 cannot read v1")


def test_check_compatibility_direct() -> None:
    v1 = _v1()
    assert check_compatibility(v1, v1) == []
    narrower = _v1()
    narrower["fields"][3]["type"] = "int"  # ts_ns long -> int is not a promotion
    assert check_compatibility(narrower, v1) == ["NormalizedTick.ts_ns: writer long cannot be read as int"]
    assert check_compatibility(v1, narrower) == []  # int data reads as long


def test_schema_files_need_a_version(tmp_path: Path) -> None:
    (tmp_path / "tick.avsc").write_text(json.dumps(_v1()))
    with pytest.raises(AvroError, match=r"<name>\.v<N>\.avsc"):
        SchemaRegistry.from_directory(tmp_path)
