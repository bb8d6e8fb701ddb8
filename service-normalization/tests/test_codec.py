"""The direct `NormalizedTick` encoder against the generic Avro path and fastavro: same bytes."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
from dataproc_shared import avro
from dataproc_shared.avro import EncodeError, SchemaRegistry, default_registry
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st
from normalization.codec import FIELDS, SCHEMA, field_list, tick_encoder
from normalization.transform import NormalizedTick, TickKind

LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DOUBLES = st.floats(allow_nan=False) | st.sampled_from([math.inf, -math.inf, 0.0, -0.0, 5e-324])
OPTIONAL_DOUBLE = st.none() | DOUBLES

ticks = st.builds(
    NormalizedTick,
    venue=st.text(max_size=70),
    symbol=st.text(max_size=70),
    kind=st.sampled_from(TickKind),
    ts_ns=LONGS,
    ingest_ns=LONGS,
    source_partition=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    source_offset=LONGS,
    seq=st.none() | LONGS,
    trade_id=st.none() | st.text(max_size=140),
    price=OPTIONAL_DOUBLE,
    size=OPTIONAL_DOUBLE,
    bid=OPTIONAL_DOUBLE,
    ask=OPTIONAL_DOUBLE,
    bid_size=OPTIONAL_DOUBLE,
    ask_size=OPTIONAL_DOUBLE,
)


def _fastavro(tick: NormalizedTick) -> bytes:
    version = default_registry().get(SCHEMA)
    buf = io.BytesIO()
    schemaless_writer(buf, version.parsed, tick.to_avro())
    return version.header + buf.getvalue()


def test_the_direct_encoder_is_written_for_the_current_schema() -> None:
    assert field_list(default_registry().get(SCHEMA).source) == FIELDS


@settings(max_examples=400)
@given(ticks)
def test_direct_encoder_gives_the_generic_paths_bytes(tick: NormalizedTick) -> None:
    data = tick_encoder()(tick)
    assert data == avro.encode(SCHEMA, tick.to_avro())
    assert data == _fastavro(tick)
    assert NormalizedTick.from_avro(avro.decode(data, SCHEMA)) == tick


def test_typical_trade_and_quote() -> None:
    encode = tick_encoder()
    ts, ingest = 1_763_908_200_123_456_000, 1_763_908_200_200_000_000
    trade = NormalizedTick("XNYM", "CLZ6", TickKind.TRADE, ts, ingest, 3, 123_456, 1234, "T-8812", 71.25, 3.0)
    quote = NormalizedTick("OANDA", "EURUSD", TickKind.QUOTE, ts, ingest, 0, 7, None, None, None, None,
                           1.0841, 1.0843, None, 2.5)
    book = NormalizedTick("BINANCE", "ETHUSDT", TickKind.QUOTE, ts, ingest, 5, 8, 35_346_513_501, None,
                          None, None, 2683.8, 2683.81, 3.0292, 31.4395)
    odd = NormalizedTick("X", "Y", TickKind.TRADE, ts, ingest, 0, 9, None, None, 1.0, None,
                         2.0, 3.0, 4.0, 5.0)
    for tick in (trade, quote, book, odd):
        assert encode(tick) == _fastavro(tick)


@pytest.mark.parametrize("field", ["ts_ns", "ingest_ns", "source_offset", "seq"])
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_values_outside_a_long_are_encode_errors_on_both_paths(field: str, value: int) -> None:
    fields = {"venue": "X", "symbol": "Y", "kind": TickKind.TRADE, "ts_ns": 1, "ingest_ns": 1,
              "source_partition": 0, "source_offset": 0, field: value}
    tick = NormalizedTick(**fields)
    with pytest.raises(EncodeError):
        tick_encoder()(tick)
    with pytest.raises(EncodeError):
        avro.encode(SCHEMA, tick.to_avro())


def test_a_new_schema_version_falls_back_to_the_generic_path(tmp_path: Path) -> None:
    schemas = Path(avro.SCHEMAS_DIR)
    for path in schemas.glob("*.avsc"):
        shutil.copy(path, tmp_path / path.name)
    v1 = json.loads((schemas / "normalized_tick.v1.avsc").read_text("utf-8"))
    v1["fields"].append({"name": "venue_seq", "type": ["null", "long"], "default": None})
    (tmp_path / "normalized_tick.v2.avsc").write_text(json.dumps(v1), "utf-8")
    registry = SchemaRegistry.from_directory(tmp_path)
    tick = NormalizedTick("XNYM", "CLZ6", TickKind.TRADE, 1, 2, 0, 5, None, None, 1.5, 2.0)
    data = tick_encoder(registry)(tick)
    assert data == registry.encode(SCHEMA, tick.to_avro())
    assert data[2:10] == registry.get(SCHEMA).fingerprint != default_registry().get(SCHEMA).fingerprint


@settings(max_examples=100)
@given(st.lists(ticks, min_size=2, max_size=20), st.integers(min_value=0, max_value=3))
def test_one_encoder_over_many_ticks_gives_the_generic_bytes(
    batch: list[NormalizedTick], repeat: int
) -> None:
    # The encoder remembers the last event and ingest times; consecutive equal and unequal ones.
    batch = [tick for tick in batch for _ in range(1 + repeat)]
    encode = tick_encoder()
    assert [encode(tick) for tick in batch] == [avro.encode(SCHEMA, tick.to_avro()) for tick in batch]
