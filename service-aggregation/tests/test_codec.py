"""The direct tick decoder and bar encoder against the generic Avro codec (`dataproc_shared.avro`)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from aggregation import codec
from aggregation.codec import BadTickError, bar_document, decode_tick, encode_bar
from aggregation.transform import Bar
from dataproc_shared import avro
from dataproc_shared.avro_flat import read_long, write_long
from dataproc_shared.errors import AvroError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LONG = st.integers(-(2**63), 2**63 - 1)
INT = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)


def same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)


@st.composite
def enriched(draw: st.DrawFn) -> dict[str, Any]:
    """An `enriched_tick` record with extreme values; trades may lack price or size."""
    opt_double = st.none() | DOUBLE
    return {
        "instrument_id": draw(TEXT), "venue": draw(TEXT), "venue_symbol": draw(TEXT), "symbol": draw(TEXT),
        "asset_class": draw(TEXT), "currency": draw(TEXT), "tick_size": draw(opt_double),
        "multiplier": draw(opt_double), "venue_timezone": draw(TEXT),
        "kind": draw(st.sampled_from(["TRADE", "QUOTE"])), "ts_ns": draw(LONG), "seq": draw(st.none() | LONG),
        "trade_id": draw(st.none() | TEXT), "price": draw(opt_double), "size": draw(opt_double),
        "bid": draw(opt_double), "ask": draw(opt_double), "bid_size": draw(opt_double),
        "ask_size": draw(opt_double), "ingest_ns": draw(LONG), "source_partition": draw(INT),
        "source_offset": draw(LONG),
    }


def generic_tick(value: bytes, partition: int, offset: int) -> Any:
    """The tick through the generic decoder, or the exception class it raises."""
    try:
        return codec._tick_of(avro.decode(value, codec.ENRICHED_SCHEMA), partition, offset)
    except (AvroError, BadTickError) as exc:
        return type(exc)


def direct_tick(value: bytes, partition: int, offset: int) -> Any:
    assert value.startswith(codec._V1_HEADER or b"-")
    try:
        return decode_tick(value, partition, offset)
    except (AvroError, BadTickError) as exc:
        return type(exc)


def assert_same_tick(a: Any, b: Any) -> None:
    if isinstance(a, type) or isinstance(b, type):
        assert a == b
        return
    for name in a.__slots__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, float):
            assert same_float(x, y), name
        else:
            assert x == y, name


def test_direct_codecs_are_on_for_the_current_schemas() -> None:
    assert avro.default_registry().get(codec.ENRICHED_SCHEMA).header == codec._V1_HEADER
    assert avro.default_registry().get(codec.BAR_SCHEMA).header == codec._BAR_V1_HEADER


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(record=enriched(), partition=st.integers(0, 63), offset=st.integers(0, 2**62))
def test_decode_tick_equals_the_generic_decoder(record: dict[str, Any], partition: int, offset: int) -> None:
    value = avro.encode(codec.ENRICHED_SCHEMA, record)
    assert_same_tick(direct_tick(value, partition, offset), generic_tick(value, partition, offset))


def test_truncated_and_corrupt_messages_fail_alike() -> None:
    record = {
        "instrument_id": "CLZ6.XNYM", "venue": "XNYM", "venue_symbol": "CLZ6", "symbol": "CLZ6",
        "asset_class": "future", "currency": "USD", "tick_size": 0.01, "multiplier": 1000.0,
        "venue_timezone": "America/Chicago", "kind": "TRADE", "ts_ns": 1_763_900_000_000_000_000,
        "seq": 12, "trade_id": "T1", "price": 71.5, "size": 3.0, "bid": None, "ask": None,
        "bid_size": None, "ask_size": None, "ingest_ns": 1_763_900_000_000_005_000,
        "source_partition": 2, "source_offset": 99,
    }
    value = avro.encode(codec.ENRICHED_SCHEMA, record)
    assert_same_tick(direct_tick(value, 1, 5), generic_tick(value, 1, 5))
    header = len(codec._V1_HEADER or b"")
    for cut in range(header, len(value)):
        assert direct_tick(value[:cut], 1, 5) == generic_tick(value[:cut], 1, 5) == avro.DecodeError
    for i in range(header, len(value)):
        for byte in (0x00, 0x01, 0x03, 0x7F, 0x80, 0xFF):
            corrupt = value[:i] + bytes([byte]) + value[i + 1:]
            assert_same_tick(direct_tick(corrupt, 1, 5), generic_tick(corrupt, 1, 5))
    # invalid UTF-8 in a field the windowing does not use is still an undecodable message
    bad = value.replace(b"future", b"fut\xffre")
    assert direct_tick(bad, 1, 5) == generic_tick(bad, 1, 5) == avro.DecodeError
    no_price = avro.encode(codec.ENRICHED_SCHEMA, {**record, "price": None})
    assert direct_tick(no_price, 1, 5) == generic_tick(no_price, 1, 5) == BadTickError


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    base=enriched(),
    changes=st.lists(st.tuples(
        st.sampled_from(["I1", "I2", "\u00e9t\u00e9", "I1" * 40]),
        st.sampled_from(["venue", "venue_symbol", "symbol", "asset_class", "currency", "tick_size",
                         "multiplier", "venue_timezone", "kind", "price", "size", "bid", "seq", "ts_ns"]),
        st.one_of(TEXT, DOUBLE, st.none(), LONG, st.sampled_from(["TRADE", "QUOTE"])),
    ), min_size=1, max_size=30),
)
def test_a_stream_with_changing_reference_data_decodes_like_the_generic_decoder(
    base: dict[str, Any], changes: list[tuple[str, str, Any]],
) -> None:
    """Ticks of a few instruments in a row (the reference-data prefix cache warm), each with one field
    changed from the previous tick of its instrument: same ticks or errors as the generic decoder."""
    state: dict[str, dict[str, Any]] = {}
    for offset, (instrument, name, value) in enumerate(changes):
        record = {**state.get(instrument, base), "instrument_id": instrument}
        candidate = {**record, name: value}
        try:
            encoded = avro.encode(codec.ENRICHED_SCHEMA, candidate)
            record = candidate
        except (AvroError, TypeError, ValueError, OverflowError):
            encoded = avro.encode(codec.ENRICHED_SCHEMA, record)  # a value of the wrong type: unchanged
        state[instrument] = record
        for value in (encoded, encoded[:-1], encoded[: len(encoded) // 2]):
            assert_same_tick(direct_tick(value, 0, offset), generic_tick(value, 0, offset))


def test_the_prefix_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_PREFIXES", {})
    monkeypatch.setattr(codec, "_PREFIXES_MAX", 4)
    record = {
        "instrument_id": "X", "venue": "V", "venue_symbol": "S", "symbol": "S", "asset_class": "equity",
        "currency": "USD", "tick_size": None, "multiplier": None, "venue_timezone": "UTC", "kind": "TRADE",
        "ts_ns": 1, "seq": None, "trade_id": None, "price": 1.0, "size": 2.0, "bid": None, "ask": None,
        "bid_size": None, "ask_size": None, "ingest_ns": 2, "source_partition": 0, "source_offset": 0,
    }
    for i in range(10):
        value = avro.encode(codec.ENRICHED_SCHEMA, {**record, "instrument_id": f"I{i}"})
        assert decode_tick(value, 0, i).instrument_id == f"I{i}"
        assert decode_tick(value, 0, i).instrument_id == f"I{i}"
        assert len(codec._PREFIXES) <= 4


@settings(max_examples=500)
@given(n=LONG, tail=st.binary(max_size=3))
def test_read_long_ns_equals_read_long(n: int, tail: bytes) -> None:
    raw = b"\x01" + write_long(n) + tail
    assert codec.read_long_ns(raw, 1) == read_long(raw, 1) == (n, 1 + len(write_long(n)))
    for cut in range(1, len(raw)):
        try:
            want: Any = read_long(raw[:cut], 1)
        except IndexError as exc:
            want = type(exc)
        try:
            got: Any = codec.read_long_ns(raw[:cut], 1)
        except IndexError as exc:
            got = type(exc)
        assert got == want


@st.composite
def bars(draw: st.DrawFn) -> Bar:
    """A bar with extreme values."""
    return Bar(
        instrument_id=draw(TEXT), venue=draw(TEXT), symbol=draw(TEXT), currency=draw(TEXT),
        interval=draw(TEXT), window_start_ns=draw(LONG), window_end_ns=draw(LONG), open=draw(DOUBLE),
        high=draw(DOUBLE), low=draw(DOUBLE), close=draw(DOUBLE), volume=draw(DOUBLE), vwap=draw(DOUBLE),
        trade_count=draw(INT), is_final=draw(st.booleans()), version=draw(LONG), first_ts_ns=draw(LONG),
        last_ts_ns=draw(LONG), max_ingest_ns=draw(LONG), source_partition=draw(INT), offset_from=draw(LONG),
        offset_to=draw(LONG), source_key=draw(TEXT),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(bar=bars())
def test_encode_bar_equals_the_generic_encoder(bar: Bar) -> None:
    assert encode_bar(bar) == avro.encode(codec.BAR_SCHEMA, bar_document(bar))
    decoded = avro.decode(encode_bar(bar), codec.BAR_SCHEMA)
    assert decoded["version"] == bar.version
    assert math.isnan(decoded["vwap"]) if math.isnan(bar.vwap) else decoded["vwap"] == bar.vwap


def test_bars_that_do_not_fit_are_encode_errors() -> None:
    good = Bar("I", "V", "S", "USD", "1m", 0, 60_000_000_000, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1, True, 2, 0, 0,
               0, 0, 0, 0)
    assert encode_bar(good) == avro.encode(codec.BAR_SCHEMA, bar_document(good))
    for bad in (Bar(**{**_fields(good), "version": 2**63}), Bar(**{**_fields(good), "symbol": "\ud800"}),
                Bar(**{**_fields(good), "open": "x"})):  # type: ignore[arg-type]
        with pytest.raises(avro.EncodeError):
            encode_bar(bad)
        with pytest.raises(avro.EncodeError):
            avro.encode(codec.BAR_SCHEMA, bar_document(bad))


def test_the_bar_prefix_cache_is_bounded_and_keyed_by_every_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_BAR_PREFIXES", {})
    monkeypatch.setattr(codec, "_BAR_PREFIXES_MAX", 3)
    good = Bar("I", "V", "S", "USD", "1m", 0, 60_000_000_000, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1, True, 2, 0, 0,
               0, 0, 0, 0)
    for i in range(8):
        for name in ("instrument_id", "venue", "symbol", "currency", "interval"):
            bar = Bar(**{**_fields(good), name: f"x{i}"})
            assert encode_bar(bar) == avro.encode(codec.BAR_SCHEMA, bar_document(bar))
            assert len(codec._BAR_PREFIXES) <= 3


def _fields(bar: Bar) -> dict[str, Any]:
    return {name: getattr(bar, name) for name in bar.__slots__}
