"""Unit tests of the pure normalization transform: parsing rules, dead-letter reasons, the batch step."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import fastavro
import orjson
import pytest
from dataproc_shared.logging import ensure_correlation_id as correlation_id
from dataproc_shared.records import (
    CORRELATION_HEADER,
    INGEST_TIME_HEADER,
    DeadLetterReason,
    InRecord,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from normalization.dedup import DedupEntry
from normalization.transform import (
    EVENT_TIME_HEADER,
    Lineage,
    NormalizedTick,
    Normalizer,
    NormalizerConfig,
    Rejection,
    TickKind,
    parse_tick,
)

R = DeadLetterReason
NOW_NS = 1_763_908_200_000_000_000  # 2025-11-23T14:30:00Z
SKEW_NS = 300 * 1_000_000_000
LINEAGE = Lineage(ingest_ns=NOW_NS - 5_000_000, source_partition=2, source_offset=41)
SCHEMA = fastavro.parse_schema(
    json.loads(
        resources.files("dataproc_shared").joinpath("schemas/normalized_tick.v1.avsc").read_text("utf-8")
    )
)


def parse(obj: Any, *, now_ns: int = NOW_NS) -> NormalizedTick | Rejection:
    value = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_tick(value, lineage=LINEAGE, now_ns=now_ns, max_future_skew_ns=SKEW_NS)


def ok(obj: Any, **kw: Any) -> NormalizedTick:
    out = parse(obj, **kw)
    assert isinstance(out, NormalizedTick), out
    return out


def rejected(obj: Any, **kw: Any) -> Rejection:
    out = parse(obj, **kw)
    assert isinstance(out, Rejection), out
    return out


def trade(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "venue": "XNYM",
        "symbol": "CLZ6",
        "type": "trade",
        "ts": NOW_NS,
        "price": 1,
        "size": 1,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def quote(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "venue": "XNYM",
        "symbol": "CLZ6",
        "type": "quote",
        "ts": NOW_NS,
        "bid": 1,
        "ask": 2,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def avro_roundtrip(tick: NormalizedTick) -> NormalizedTick:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, SCHEMA, tick.to_avro())
    buf.seek(0)
    return NormalizedTick.from_avro(fastavro.schemaless_reader(buf, SCHEMA, SCHEMA))  # type: ignore[arg-type]


# --- the contract's examples -------------------------------------------------------------------


def test_contract_trade_example() -> None:
    raw = (
        b'{"venue": "XNYM", "symbol": "CLZ6", "type": "trade", "ts": "2025-11-23T14:30:00.123456Z",'
        b' "price": "71.25", "size": 3, "trade_id": "T-88121", "seq": 1234}'
    )
    tick = ok(raw)
    assert tick == NormalizedTick(
        venue="XNYM",
        symbol="CLZ6",
        kind=TickKind.TRADE,
        ts_ns=1_763_908_200_123_456_000,
        ingest_ns=LINEAGE.ingest_ns,
        source_partition=2,
        source_offset=41,
        seq=1234,
        trade_id="T-88121",
        price=71.25,
        size=3.0,
    )
    assert tick.key == "XNYM:CLZ6"


def test_contract_quote_example() -> None:
    raw = (
        b'{"venue": "XNYM", "symbol": "CLZ6", "type": "quote", "ts": 1763908200123,'
        b' "bid": 71.24, "ask": 71.26, "bid_size": 10, "ask_size": 12}'
    )
    tick = ok(raw)
    assert tick.kind is TickKind.QUOTE
    assert tick.ts_ns == 1_763_908_200_123_000_000
    assert (tick.bid, tick.ask, tick.bid_size, tick.ask_size) == (71.24, 71.26, 10.0, 12.0)
    assert tick.price is None
    assert tick.size is None
    assert tick.trade_id is None


# --- venue, symbol, type -------------------------------------------------------------------------


def test_venue_and_symbol_trimmed_and_upper_cased() -> None:
    tick = ok(trade(venue="  xnym ", symbol="\tclz6 "))
    assert (tick.venue, tick.symbol) == ("XNYM", "CLZ6")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("venue", ..., R.MISSING_FIELD),
        ("venue", None, R.MISSING_FIELD),
        ("venue", "   ", R.MISSING_FIELD),
        ("venue", 7, R.BAD_FIELD),
        ("venue", "X:Y", R.BAD_FIELD),
        ("venue", "A" * 33, R.BAD_FIELD),
        ("symbol", ..., R.MISSING_FIELD),
        ("symbol", ["CL"], R.BAD_FIELD),
        ("symbol", "CL\nZ6", R.BAD_FIELD),
    ],
)
def test_identifier_rules(field: str, value: Any, reason: DeadLetterReason) -> None:
    assert rejected(trade(**{field: value})).reason is reason


@pytest.mark.parametrize(
    ("trade_type", "quote_type"), [("trade", "quote"), ("TRADE", "QUOTE"), (" Trade ", "qUoTe")]
)
def test_type_any_case(trade_type: str, quote_type: str) -> None:
    assert ok(trade(type=trade_type)).kind is TickKind.TRADE
    assert ok(quote(type=quote_type)).kind is TickKind.QUOTE


def test_missing_type_with_price_is_trade() -> None:
    assert ok(trade(type=...)).kind is TickKind.TRADE


def test_missing_type_without_price_is_rejected() -> None:
    assert rejected(quote(type=...)).reason is R.MISSING_FIELD


@pytest.mark.parametrize("value", ["bar", 1, True, ["trade"]])
def test_unknown_type(value: Any) -> None:
    assert rejected(trade(type=value)).reason is R.BAD_TYPE


def test_unknown_fields_ignored() -> None:
    assert ok(trade(extra={"nested": [1, 2]}, condition="@F")).price == 1.0


# --- timestamps -------------------------------------------------------------------------------------


BASE_S = 1_763_908_200  # 2025-11-23T14:30:00Z


@pytest.mark.parametrize(
    ("ts", "expected_ns"),
    [
        ("2025-11-23T14:30:00Z", BASE_S * 10**9),
        ("2025-11-23T14:30:00.5z", BASE_S * 10**9 + 500_000_000),
        ("2025-11-23T14:30:00.123456789Z", BASE_S * 10**9 + 123_456_789),
        ("2025-11-23T14:30:00", BASE_S * 10**9),
        ("2025-11-23 14:30", BASE_S * 10**9),
        ("2025-11-23T15:30:00+01:00", BASE_S * 10**9),
        ("2025-11-23T09:30:00.25-0500", BASE_S * 10**9 + 250_000_000),
        ("2025-11-23T16:30:00+02", BASE_S * 10**9),
        ("2025-11-23T14:30:00,5Z", BASE_S * 10**9 + 500_000_000),
        (BASE_S, BASE_S * 10**9),
        (BASE_S * 1000 + 123, BASE_S * 10**9 + 123_000_000),
        (BASE_S * 10**6 + 123_456, BASE_S * 10**9 + 123_456_000),
        (BASE_S * 10**9 + 123_456_789, BASE_S * 10**9 + 123_456_789),
        (1_763_908_200.123456, BASE_S * 10**9 + 123_456_000),
        (1_763_908_200_123.5, BASE_S * 10**9 + 123_500_000),
        (1_763_908_200_123_456.0, BASE_S * 10**9 + 123_456_000),
        (str(BASE_S * 1000 + 7), BASE_S * 10**9 + 7_000_000),
        (" 1763908200.25 ", BASE_S * 10**9 + 250_000_000),
        # Lean equities' epoch milliseconds from 2013.
        (1_381_152_600_000, 1_381_152_600_000_000_000),
    ],
)
def test_timestamp_forms(ts: Any, expected_ns: int) -> None:
    assert ok(trade(ts=ts)).ts_ns == expected_ns


@pytest.mark.parametrize(
    "ts",
    [
        "yesterday",
        "2025-13-01T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-11-23T24:00:00Z",
        "2025-11-23T14:30:00+25:00",
        "2025-11-23",
        "2025-11-23T14:30:00.1234567890Z",
        "",
        0,
        -5,
        True,
        [1],
        {"s": 1},
        10**30,
        10**10 - 1,  # seconds beyond int64 nanoseconds
        "1e400",
    ],
)
def test_bad_timestamps(ts: Any) -> None:
    assert rejected(trade(ts=ts)).reason is R.BAD_TIMESTAMP


def test_missing_timestamp() -> None:
    assert rejected(trade(ts=...)).reason is R.MISSING_FIELD
    assert rejected(trade(ts=None)).reason is R.MISSING_FIELD


def test_skew_guard_uses_the_given_clock() -> None:
    assert ok(trade(ts=NOW_NS + SKEW_NS)).ts_ns == NOW_NS + SKEW_NS
    assert rejected(trade(ts=NOW_NS + SKEW_NS + 1)).reason is R.FUTURE_TIMESTAMP
    # The same tick is fine once the clock has moved on.
    assert ok(trade(ts=NOW_NS + SKEW_NS + 1), now_ns=NOW_NS + 1).ts_ns == NOW_NS + SKEW_NS + 1
    # Old ticks are not the guard's business.
    assert ok(trade(ts="2001-01-01T00:00:00Z")).ts_ns == 978_307_200 * 10**9


# --- numbers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.1", 0.1),
        (0.1, 0.1),
        ("71.25", 71.25),
        (" 71.25 ", 71.25),
        ("+3", 3.0),
        ("-12.5", -12.5),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("5.", 5.0),
        ("61837.63000000", 61837.63),
        (12, 12.0),
        (10**25, 1e25),
    ],
)
def test_number_forms(raw: Any, expected: float) -> None:
    assert ok(trade(price=raw)).price == expected


def test_negative_price_allowed() -> None:
    assert ok(trade(price="-37.63")).price == -37.63
    assert ok(quote(bid=-5, ask=-4)).bid == -5.0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("abc", R.BAD_NUMBER),
        ("1,5", R.BAD_NUMBER),
        ("1_000", R.BAD_NUMBER),
        ("0x10", R.BAD_NUMBER),
        ("", R.BAD_NUMBER),
        (True, R.BAD_NUMBER),
        ([1], R.BAD_NUMBER),
        ({"v": 1}, R.BAD_NUMBER),
        ("NaN", R.NON_FINITE),
        ("-Infinity", R.NON_FINITE),
        ("inf", R.NON_FINITE),
        ("1e400", R.NON_FINITE),
    ],
)
def test_bad_numbers(raw: Any, reason: DeadLetterReason) -> None:
    assert rejected(trade(price=raw)).reason is reason


def test_json_number_too_large_for_float64_is_non_finite() -> None:
    raw = b'{"venue":"X","symbol":"Y","ts":1763908200,"price":1e999,"size":1}'
    assert rejected(raw).reason is R.NON_FINITE


def test_json_nan_literal_is_not_json() -> None:
    raw = b'{"venue":"X","symbol":"Y","ts":1763908200,"price":NaN,"size":1}'
    assert rejected(raw).reason is R.NOT_JSON


# --- trades and quotes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "reason"), [("price", R.MISSING_FIELD), ("size", R.MISSING_FIELD)])
def test_trade_needs_price_and_size(field: str, reason: DeadLetterReason) -> None:
    assert rejected(trade(**{field: ...})).reason is reason


@pytest.mark.parametrize("size", [0, -1, "0", "-0.5", 0.0])
def test_trade_size_positive(size: Any) -> None:
    assert rejected(trade(size=size)).reason is R.BAD_SIZE


def test_trade_id_and_seq() -> None:
    tick = ok(trade(trade_id=3735683259, seq="42"))
    assert (tick.trade_id, tick.seq) == ("3735683259", 42)
    assert ok(trade(trade_id="  ")).trade_id is None
    assert rejected(trade(trade_id=["x"])).reason is R.BAD_FIELD
    assert rejected(trade(trade_id="x" * 129)).reason is R.BAD_FIELD
    assert rejected(trade(seq=1.5)).reason is R.BAD_FIELD
    assert rejected(trade(seq=2**63)).reason is R.BAD_FIELD
    assert rejected(trade(seq=False)).reason is R.BAD_FIELD


def test_quote_one_side_is_enough() -> None:
    assert ok(quote(ask=...)).ask is None
    assert ok(quote(bid=None)).bid is None
    assert rejected(quote(bid=..., ask=...)).reason is R.EMPTY_QUOTE
    assert rejected(quote(bid=None, ask=None)).reason is R.EMPTY_QUOTE


def test_crossed_quote() -> None:
    assert rejected(quote(bid="2.01", ask="2")).reason is R.CROSSED_QUOTE
    assert ok(quote(bid=2, ask=2)).bid == 2.0  # locked is not crossed


def test_quote_sizes() -> None:
    assert ok(quote(bid_size=0, ask_size="0.00000000")).bid_size == 0.0
    assert rejected(quote(bid_size=-1)).reason is R.BAD_SIZE
    assert rejected(quote(ask_size="x")).reason is R.BAD_NUMBER


def test_quote_ignores_trade_fields() -> None:
    tick = ok(quote(price=5, size=1, trade_id="t"))
    assert tick.price is None
    assert tick.size is None
    assert tick.trade_id is None


# --- bytes-level rejections ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", R.NOT_JSON),
        (None, R.NOT_JSON),
        (b"{not json", R.NOT_JSON),
        (b'{"venue": "X"} trailing', R.NOT_JSON),
        (b"\xff\xfe{}", R.NOT_UTF8),
        (b'{"venue": "\xc3\x28"}', R.NOT_UTF8),
        (b"[1, 2]", R.NOT_OBJECT),
        (b'"text"', R.NOT_OBJECT),
        (b"42", R.NOT_OBJECT),
        (b"null", R.NOT_OBJECT),
    ],
)
def test_bytes_rejections(raw: bytes | None, reason: DeadLetterReason) -> None:
    out = parse_tick(raw, lineage=LINEAGE, now_ns=NOW_NS, max_future_skew_ns=SKEW_NS)
    assert isinstance(out, Rejection)
    assert out.reason is reason


def test_lone_surrogate_in_venue() -> None:
    raw = b'{"venue":"X\\ud800","symbol":"Y","ts":1763908200,"price":1,"size":1}'
    assert rejected(raw).reason in (R.NOT_JSON, R.BAD_FIELD)


# --- properties ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
tick_like = st.fixed_dictionaries(
    {},
    optional={
        "venue": st.text(max_size=6) | json_values,
        "symbol": st.text(max_size=6) | json_values,
        "type": st.sampled_from(["trade", "quote", "Trade", "QUOTE", "x"]) | json_values,
        "ts": st.integers(min_value=-(10**20), max_value=10**20)
        | st.floats(allow_nan=False)
        | st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
        | json_values,
        "price": st.floats(allow_nan=False) | st.decimals(allow_nan=False).map(str) | json_values,
        "size": st.floats(allow_nan=False) | st.integers() | json_values,
        "bid": st.floats(allow_nan=False) | st.integers(),
        "ask": st.floats(allow_nan=False) | st.integers(),
        "bid_size": st.floats(allow_nan=False) | st.text(max_size=4),
        "ask_size": st.integers(),
        "trade_id": st.text(max_size=8) | st.integers() | json_values,
        "seq": st.integers() | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    out = parse_tick(raw, lineage=LINEAGE, now_ns=NOW_NS, max_future_skew_ns=SKEW_NS)
    assert isinstance(out, NormalizedTick | Rejection)


@settings(max_examples=600, deadline=None)
@given(tick_like)
def test_arbitrary_objects_never_raise_and_valid_ticks_roundtrip_avro(obj: dict[str, Any]) -> None:
    out = parse_tick(json.dumps(obj).encode(), lineage=LINEAGE, now_ns=NOW_NS, max_future_skew_ns=SKEW_NS)
    assert isinstance(out, NormalizedTick | Rejection)
    if isinstance(out, NormalizedTick):
        assert avro_roundtrip(out) == out
        assert out.ts_ns - NOW_NS <= SKEW_NS
        assert out.venue == out.venue.strip().upper()
        if out.kind is TickKind.TRADE:
            assert out.size is not None
            assert out.size > 0
        elif out.bid is not None and out.ask is not None:
            assert out.bid <= out.ask


valid_ticks = st.builds(
    lambda venue, symbol, is_trade, ts_ns, price, size, ask_gap, trade_id, seq: (
        trade(venue=venue, symbol=symbol, ts=ts_ns, price=price, size=size, trade_id=trade_id, seq=seq)
        if is_trade
        else quote(venue=venue, symbol=symbol, ts=ts_ns, bid=price, ask=price + ask_gap, bid_size=size)
    ),
    st.text(alphabet="ABCXYZ-_.", min_size=1, max_size=8),
    st.text(alphabet="ABCDEFGH0123456789/.", min_size=1, max_size=12),
    st.booleans(),
    st.integers(min_value=10**17, max_value=NOW_NS),
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False).map(lambda f: round(f, 6)),
    st.floats(min_value=1e-9, max_value=1e9),
    st.floats(min_value=0, max_value=100),
    st.none() | st.text(alphabet="abc0123456789-", min_size=1, max_size=20),
    st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@settings(max_examples=300, deadline=None)
@given(valid_ticks)
def test_valid_ticks_accepted_unchanged_and_roundtrip(obj: dict[str, Any]) -> None:
    tick = ok(obj)
    assert avro_roundtrip(tick) == tick
    assert tick.ts_ns == obj["ts"]
    if tick.kind is TickKind.TRADE:
        assert (tick.price, tick.size, tick.trade_id, tick.seq) == (
            float(obj["price"]),
            float(obj["size"]),
            obj["trade_id"],
            obj["seq"],
        )


@given(st.decimals(allow_nan=False, allow_infinity=False, places=8, min_value=-(10**12), max_value=10**12))
def test_numeric_strings_equal_json_numbers(value: Any) -> None:
    text = str(value)
    assert (
        ok(trade(price=text)).price
        == float(text)
        == ok(orjson.loads(orjson.dumps(trade(price=float(text))))).price
    )


NAIVE_MIN = datetime(1990, 1, 1)  # noqa: DTZ001 - hypothesis takes naive bounds and adds the zone
NAIVE_MAX = datetime(2025, 11, 1)  # noqa: DTZ001


@given(st.datetimes(min_value=NAIVE_MIN, max_value=NAIVE_MAX, timezones=st.just(UTC)))
def test_iso_and_epoch_forms_agree(moment: datetime) -> None:
    ns = int(moment.timestamp()) * 10**9 + moment.microsecond * 1000
    assert ok(trade(ts=moment.isoformat())).ts_ns == ns
    assert ok(trade(ts=moment.isoformat().replace("+00:00", "Z"))).ts_ns == ns
    assert ok(trade(ts=ns)).ts_ns == ns
    assert ok(trade(ts=ns // 1000)).ts_ns == ns
    assert ok(trade(ts=ns // 1_000_000)).ts_ns == ns // 1_000_000 * 1_000_000


# --- the batch step ------------------------------------------------------------------------------


def record(
    value: Any, offset: int, *, partition: int = 0, headers: tuple[tuple[str, bytes], ...] = ()
) -> InRecord:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return InRecord(
        topic="raw",
        partition=partition,
        offset=offset,
        key=b"k",
        value=raw,
        timestamp_ms=NOW_NS // 1_000_000 - 10,
        headers=headers,
    )


def make_normalizer(**kw: Any) -> Normalizer:
    config = NormalizerConfig(output_topic="norm", output_partitions=6, **kw)
    return Normalizer(
        config,
        encode=lambda tick: orjson.dumps(tick.to_avro()),
        partitioner=lambda key, n: len(key) % n,
        clock=lambda: NOW_NS,
    )


def test_batch_outputs_dead_letters_and_duplicates() -> None:
    normalizer = make_normalizer()
    batch = [
        record(trade(trade_id="a"), 0, headers=((CORRELATION_HEADER, b"corr-1"),)),
        record(b"junk", 1),
        record(trade(trade_id="a", venue="xnym "), 2),  # same venue + trade_id -> duplicate
        record(quote(), 3),
        record(trade(trade_id="a", venue="OTHER"), 4),  # other venue: not a duplicate
        record(trade(), 5),
        record(trade(), 6),  # no trade_id: never a duplicate
    ]
    result = normalizer.process(batch)
    assert [o.key for o in result.outputs] == [
        b"XNYM:CLZ6",
        b"XNYM:CLZ6",
        b"OTHER:CLZ6",
        b"XNYM:CLZ6",
        b"XNYM:CLZ6",
    ]
    assert [json.loads(o.value or b"")["source_offset"] for o in result.outputs] == [0, 3, 4, 5, 6]
    first = result.outputs[0]
    assert first.topic == "norm"
    assert first.partition == len(b"XNYM:CLZ6") % 6
    assert dict(first.headers) == {
        CORRELATION_HEADER: b"corr-1",
        INGEST_TIME_HEADER: str((NOW_NS // 1_000_000 - 10) * 1_000_000).encode(),
        EVENT_TIME_HEADER: str(NOW_NS).encode(),
    }
    assert json.loads(first.value or b"")["ingest_ns"] == (NOW_NS // 1_000_000 - 10) * 1_000_000
    assert [(d.source.offset, d.reason) for d in result.dead_letters] == [(1, R.NOT_JSON)]
    assert result.deduplicated == 1
    (audit,) = result.audit
    assert (audit.event_type, audit.instrument, audit.offset_from) == ("duplicate_dropped", "XNYM:CLZ6", 2)
    assert audit.details["first_offset"] == 0


def test_batch_reports_the_event_time_each_input_partition_reached() -> None:
    normalizer = make_normalizer()
    batch = [
        record(trade(ts=NOW_NS - 3_000), 0, partition=0),
        record(trade(ts=NOW_NS - 2_000), 1, partition=0),
        record(b"junk", 2, partition=0),  # no event time: the last valid tick's counts
        record(quote(ts=NOW_NS - 9_000), 0, partition=1),
        record(b"junk", 0, partition=2),
    ]
    result = normalizer.process(batch)
    assert result.event_time_ns == {("raw", 0): NOW_NS - 2_000, ("raw", 1): NOW_NS - 9_000}


def test_replay_of_the_same_offset_is_not_its_own_duplicate() -> None:
    normalizer = make_normalizer()
    first = normalizer.process([record(trade(trade_id="a"), 10)])
    again = normalizer.process([record(trade(trade_id="a"), 10)])
    assert len(first.outputs) == len(again.outputs) == 1
    assert again.deduplicated == 0
    assert normalizer.process([record(trade(trade_id="a"), 11)]).deduplicated == 1


def test_dedup_is_per_input_partition_and_window() -> None:
    normalizer = make_normalizer(dedup_window_ns=1_000)
    assert normalizer.process([record(trade(trade_id="a"), 0, partition=0)]).deduplicated == 0
    assert normalizer.process([record(trade(trade_id="a"), 0, partition=1)]).deduplicated == 0
    assert normalizer.process([record(trade(trade_id="a", ts=NOW_NS + 1_000), 1)]).deduplicated == 1
    assert normalizer.process([record(trade(trade_id="a", ts=NOW_NS + 1_001), 2)]).deduplicated == 0


def test_restore_partition_from_changelog_entries() -> None:
    normalizer = make_normalizer()
    normalizer.restore_partition(3, [("XNYM:a", DedupEntry(NOW_NS, 7))])
    result = normalizer.process([record(trade(trade_id="a"), 8, partition=3)])
    assert result.deduplicated == 1
    normalizer.drop_partition(3)
    assert normalizer.process([record(trade(trade_id="a"), 9, partition=3)]).deduplicated == 0


def test_correlation_id_is_stable_without_header() -> None:
    rec = record(trade(), 5)
    assert correlation_id(rec) == correlation_id(record(trade(price=3), 5))
    assert correlation_id(rec) != correlation_id(record(trade(), 6))
    assert correlation_id(record(trade(), 5, headers=((CORRELATION_HEADER, b"\xff"),))) == correlation_id(rec)
