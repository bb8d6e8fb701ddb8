"""The splice fast path gives exactly the bytes of the plain encoding (property-based)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from dataproc_shared import avro
from enrichment.codec import TickCodec, splice_compatible
from enrichment.transform import Instrument, Venue
from hypothesis import given, settings
from hypothesis import strategies as st

_text = st.text(min_size=0, max_size=40)
#: venue and symbol: ASCII or not, shorter and longer than 64 bytes (the splice's two ways to skip them)
_listing_text = st.one_of(st.text(max_size=8), st.text(alphabet=st.characters(max_codepoint=127), min_size=60,
                                                      max_size=70), st.text(min_size=30, max_size=70))
_opt_float = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))
_opt_long = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
_long = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def _ticks(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "venue": draw(_listing_text),
        "symbol": draw(_listing_text),
        "kind": draw(st.sampled_from(["TRADE", "QUOTE"])),
        "ts_ns": draw(_long),
        "seq": draw(_opt_long),
        "trade_id": draw(st.one_of(st.none(), _text)),
        "price": draw(_opt_float),
        "size": draw(_opt_float),
        "bid": draw(_opt_float),
        "ask": draw(_opt_float),
        "bid_size": draw(_opt_float),
        "ask_size": draw(_opt_float),
        "ingest_ns": draw(_long),
        "source_partition": draw(st.integers(min_value=-(2**31), max_value=2**31 - 1)),
        "source_offset": draw(_long),
    }


@st.composite
def _instruments(draw: st.DrawFn) -> tuple[Instrument, Venue]:
    venue = Venue(draw(_text), draw(_text), draw(_text), draw(st.booleans()))
    instrument = Instrument(
        draw(_text),
        venue.mic,
        draw(_text),
        draw(_text),
        draw(_text),
        draw(_text),
        draw(_opt_float),
        draw(_opt_float),
        draw(st.booleans()),
    )
    return instrument, venue


def test_the_shipped_schemas_splice() -> None:
    assert TickCodec().splices


@settings(max_examples=300, deadline=None)
@given(tick=_ticks(), ref=_instruments())
def test_splice_equals_plain_encoding(tick: dict[str, Any], ref: tuple[Instrument, Venue]) -> None:
    codec = TickCodec()
    raw = avro.encode("normalized_tick", tick)
    decoded = codec.decode(raw)
    instrument, venue = ref
    spliced = codec.encode(raw, decoded, instrument, venue)
    assert spliced == codec.encode_plain(decoded, instrument, venue)
    # the service's path: `read` builds only the fields the enrichment uses
    read = codec.read(raw)
    assert read == {"venue": tick["venue"], "symbol": tick["symbol"], "ts_ns": tick["ts_ns"]}
    assert codec.encode(raw, read, instrument, venue) == spliced
    out = avro.decode(spliced, "enriched_tick")
    assert out["instrument_id"] == instrument.instrument_id
    assert out["source_offset"] == tick["source_offset"]
    assert out["venue_timezone"] == venue.timezone


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f.reverse(),  # different order
        lambda f: f[10].update(type="float"),  # a tick field with another type
        lambda f: f.pop(),  # a missing trailing field
    ],
)
def test_splice_refused_when_schemas_differ(change: Any) -> None:
    registry = avro.default_registry()
    source = registry.get("normalized_tick").source
    output = copy.deepcopy(registry.get("enriched_tick").source)
    assert splice_compatible(source, output) == 9
    change(output["fields"])
    assert splice_compatible(source, output) is None


def test_other_writer_versions_take_the_plain_path() -> None:
    codec = TickCodec()
    tick = {
        "venue": "XNYS",
        "symbol": "IBM",
        "kind": "TRADE",
        "ts_ns": 1,
        "seq": None,
        "trade_id": None,
        "price": 1.0,
        "size": 1.0,
        "bid": None,
        "ask": None,
        "bid_size": None,
        "ask_size": None,
        "ingest_ns": 2,
        "source_partition": 0,
        "source_offset": 3,
    }
    raw = avro.encode("normalized_tick", tick)
    foreign = raw[:2] + bytes(8) + raw[10:]  # a header the splice was not checked against
    with pytest.raises(avro.UnknownFingerprintError):  # and no known writer: `read` decodes in full
        codec.read(foreign)
    instrument = Instrument("XNYS.IBM", "XNYS", "IBM", "IBM", "equity", "USD", 0.01, 1.0, True)
    venue = Venue("XNYS", "NYSE", "America/New_York", True)
    assert codec.encode(foreign, tick, instrument, venue) == codec.encode_plain(tick, instrument, venue)


def test_a_changed_row_gets_its_own_prefix() -> None:
    codec = TickCodec()
    tick = {"venue": "XNYS", "symbol": "IBM", "kind": "TRADE", "ts_ns": 1, "seq": None, "trade_id": None,
            "price": 1.0, "size": 1.0, "bid": None, "ask": None, "bid_size": None, "ask_size": None,
            "ingest_ns": 2, "source_partition": 0, "source_offset": 3}
    raw = avro.encode("normalized_tick", tick)
    venue = Venue("XNYS", "NYSE", "America/New_York", True)
    usd = Instrument("XNYS.IBM", "XNYS", "IBM", "IBM", "equity", "USD", 0.01, 1.0, True)
    eur = Instrument("XNYS.IBM", "XNYS", "IBM", "IBM", "equity", "EUR", 0.01, 1.0, True)
    moved = Venue("XNYS", "NYSE", "Europe/London", True)
    for instrument, row in [(usd, venue), (eur, venue), (usd, venue), (usd, moved), (eur, moved)]:
        spliced = codec.encode(raw, tick, instrument, row)
        assert spliced == codec.encode_plain(tick, instrument, row)
        out = avro.decode(spliced, "enriched_tick")
        assert (out["currency"], out["venue_timezone"]) == (instrument.currency, row.timezone)


@pytest.mark.parametrize("venue", ["X" * 63, "X" * 64, "X" * 200, "XÉ", ""])
@pytest.mark.parametrize("symbol", ["IBM", "S" * 63, "S" * 64, "Ü" * 40])
def test_splice_at_the_one_byte_length_boundary(venue: str, symbol: str) -> None:
    codec = TickCodec()
    tick = {"venue": venue, "symbol": symbol, "kind": "QUOTE", "ts_ns": 5, "seq": 7, "trade_id": None,
            "price": None, "size": None, "bid": 1.0, "ask": 2.0, "bid_size": 3.0, "ask_size": None,
            "ingest_ns": 6, "source_partition": 1, "source_offset": 9}
    raw = avro.encode("normalized_tick", tick)
    instrument = Instrument("X.IBM", venue, symbol, "IBM", "equity", "USD", None, None, True)
    row = Venue(venue, "X", "UTC", True)
    assert codec.encode(raw, codec.read(raw), instrument, row) == codec.encode_plain(tick, instrument, row)
