"""The parser against its previous, straightforward implementation, on generated inputs.

`parse_tick` has fast paths for the common shapes of a raw tick (exact JSON types, cached calendar
days, positional construction). The reference below is the implementation before those fast paths
(commit 5053719), kept verbatim apart from names: both must give the same tick field for field, or
the same rejection reason and detail, for every input. The one intended difference: the old code
raised `OverflowError` for an ISO time whose UTC offset moves it outside datetime's range
(`0001-01-01T00:00+01:00`); the parser now rejects it as `bad_timestamp`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import orjson
import pytest
from dataproc_shared.records import DeadLetterReason
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from normalization.transform import Lineage, NormalizedTick, Rejection, TickKind, parse_tick

_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)

#: Longest accepted `venue`, `symbol` and `trade_id` (bounds the dedup memory and the key size).
MAX_VENUE_LEN = 32
MAX_SYMBOL_LEN = 64
MAX_TRADE_ID_LEN = 128

#: Magnitude bounds (exclusive) telling epoch units apart: below 1e11 seconds (up to year 5138),
#: below 1e14 milliseconds, below 1e17 microseconds, nanoseconds above.
_EPOCH_UNITS: tuple[tuple[Decimal, int], ...] = (
    (Decimal("1e11"), 1_000_000_000),
    (Decimal("1e14"), 1_000_000),
    (Decimal("1e17"), 1_000),
)

_INT_EPOCH_UNITS: tuple[tuple[int, int], ...] = ((10**11, 1_000_000_000), (10**14, 1_000_000))
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE_WORDS = frozenset({"nan", "inf", "infinity"})
_INTEGER_RE = re.compile(r"[+-]?\d+")
_ISO_RE = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[Tt ]"
    r"(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<frac>\d{1,9}))?)?"
    r"(?P<tz>[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Reject(Exception):
    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


def reference_parse_tick(
    value: bytes | None, *, lineage: Lineage, now_ns: int, max_future_skew_ns: int
) -> NormalizedTick | Rejection:
    """Turn the bytes of one raw-tick message into a `NormalizedTick`, or say why not.

    `now_ns` is the moment the message is read (UTC epoch ns); a tick whose event time is more than
    `max_future_skew_ns` after it is rejected as `future_timestamp`. Never raises on any input.
    """
    try:
        obj = _decode(value)
        return _build(obj, lineage, now_ns, max_future_skew_ns)
    except _Reject as reject:
        return reject.rejection


# --- decoding -----------------------------------------------------------------------------------


def _decode(value: bytes | None) -> dict[str, Any]:
    if not value:
        raise _Reject(DeadLetterReason.NOT_JSON, "empty message")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        obj = _decode_slow(value)
    if not isinstance(obj, dict):
        raise _Reject(DeadLetterReason.NOT_OBJECT, f"JSON {type(obj).__name__}, not an object")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_slow(value: bytes) -> Any:
    """Second opinion after the fast parser failed.

    Tells bad UTF-8 from bad JSON, and accepts the valid JSON the fast parser refuses (numbers too
    large for a double, which then fail the finite check).
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(DeadLetterReason.NOT_UTF8, f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _Reject(DeadLetterReason.NOT_JSON, _short(str(exc))) from None


# --- building -----------------------------------------------------------------------------------


def _build(obj: dict[str, Any], lineage: Lineage, now_ns: int, max_future_skew_ns: int) -> NormalizedTick:
    venue = _identifier(obj, "venue", MAX_VENUE_LEN)
    if ":" in venue:
        raise _Reject(DeadLetterReason.BAD_FIELD, "venue must not contain ':'")
    symbol = _identifier(obj, "symbol", MAX_SYMBOL_LEN)
    kind = _kind(obj)
    if "ts" not in obj or obj["ts"] is None:
        raise _Reject(DeadLetterReason.MISSING_FIELD, "ts is missing")
    ts_ns = _parse_timestamp(obj["ts"])
    if ts_ns - now_ns > max_future_skew_ns:
        ahead_ms = (ts_ns - now_ns) // 1_000_000
        raise _Reject(DeadLetterReason.FUTURE_TIMESTAMP, f"ts is {ahead_ms} ms ahead of the clock")
    seq = _seq(obj.get("seq"))
    price = size = bid = ask = bid_size = ask_size = None
    trade_id = None
    if kind is TickKind.TRADE:
        price = _required_number(obj, "price")
        size = _required_number(obj, "size")
        if size <= 0:
            raise _Reject(DeadLetterReason.BAD_SIZE, f"trade size must be > 0, got {size!r}")
        trade_id = _trade_id(obj.get("trade_id"))
    else:
        bid = _number(obj, "bid")
        ask = _number(obj, "ask")
        if bid is None and ask is None:
            raise _Reject(DeadLetterReason.EMPTY_QUOTE, "quote has neither bid nor ask")
        if bid is not None and ask is not None and bid > ask:
            raise _Reject(DeadLetterReason.CROSSED_QUOTE, f"bid {bid!r} > ask {ask!r}")
        bid_size = _number(obj, "bid_size")
        ask_size = _number(obj, "ask_size")
        for name, quote_size in (("bid_size", bid_size), ("ask_size", ask_size)):
            if quote_size is not None and quote_size < 0:
                raise _Reject(DeadLetterReason.BAD_SIZE, f"{name} must be >= 0, got {quote_size!r}")
    return NormalizedTick(
        venue=venue,
        symbol=symbol,
        kind=kind,
        ts_ns=ts_ns,
        ingest_ns=lineage.ingest_ns,
        source_partition=lineage.source_partition,
        source_offset=lineage.source_offset,
        seq=seq,
        trade_id=trade_id,
        price=price,
        size=size,
        bid=bid,
        ask=ask,
        bid_size=bid_size,
        ask_size=ask_size,
    )


def _identifier(obj: dict[str, Any], name: str, max_len: int) -> str:
    raw = obj.get(name)
    if raw is None:
        raise _Reject(DeadLetterReason.MISSING_FIELD, f"{name} is missing")
    if not isinstance(raw, str):
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} must be a string, got {type(raw).__name__}")
    text = raw.strip().upper()
    if not text:
        raise _Reject(DeadLetterReason.MISSING_FIELD, f"{name} is empty")
    if len(text) > max_len:
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} longer than {max_len} characters")
    if not text.isprintable():
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} contains control characters")
    _require_utf8(text, name)
    return text


def _require_utf8(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} is not valid Unicode") from None


def _kind(obj: dict[str, Any]) -> TickKind:
    raw = obj.get("type")
    if raw is None:
        if obj.get("price") is not None:
            return TickKind.TRADE
        raise _Reject(DeadLetterReason.MISSING_FIELD, "type is missing and there is no price")
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered == "trade":
            return TickKind.TRADE
        if lowered == "quote":
            return TickKind.QUOTE
    raise _Reject(DeadLetterReason.BAD_TYPE, f"type must be 'trade' or 'quote', got {_short(repr(raw))}")


def _number(obj: dict[str, Any], name: str) -> float | None:
    raw = obj.get(name)
    return None if raw is None else _parse_number(raw, name)


def _required_number(obj: dict[str, Any], name: str) -> float:
    raw = obj.get(name)
    if raw is None:
        raise _Reject(DeadLetterReason.MISSING_FIELD, f"{name} is missing")
    return _parse_number(raw, name)


def _parse_number(raw: object, name: str = "value") -> float:
    """A finite Float64 from a JSON number or a numeric string (the nearest double to its decimal).

    Raises the module's internal rejection for anything else.
    """
    if isinstance(raw, bool):
        raise _Reject(DeadLetterReason.BAD_NUMBER, f"{name} must be a number, got a boolean")
    if isinstance(raw, int):
        try:
            value = float(raw)
        except OverflowError:
            raise _Reject(DeadLetterReason.NON_FINITE, f"{name} is too large for Float64") from None
    elif isinstance(raw, float):
        value = raw
    elif isinstance(raw, str):
        text = raw.strip()
        if _DECIMAL_RE.fullmatch(text):
            value = float(text)
        elif text.lstrip("+-").lower() in _NON_FINITE_WORDS:
            raise _Reject(DeadLetterReason.NON_FINITE, f"{name} is {_short(text)}")
        else:
            raise _Reject(DeadLetterReason.BAD_NUMBER, f"{name} is not a number: {_short(repr(raw))}")
    else:
        raise _Reject(DeadLetterReason.BAD_NUMBER, f"{name} must be a number, got {type(raw).__name__}")
    if not math.isfinite(value):
        raise _Reject(DeadLetterReason.NON_FINITE, f"{name} is not finite")
    return value


def _seq(raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise _Reject(DeadLetterReason.BAD_FIELD, "seq must be an integer, got a boolean")
    if isinstance(raw, str) and _INTEGER_RE.fullmatch(raw.strip()):
        raw = int(raw.strip())
    if not isinstance(raw, int):
        raise _Reject(DeadLetterReason.BAD_FIELD, f"seq must be an integer, got {_short(repr(raw))}")
    if not _INT64_MIN <= raw <= _INT64_MAX:
        raise _Reject(DeadLetterReason.BAD_FIELD, "seq does not fit in 64 bits")
    return raw


def _trade_id(raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        kind = type(raw).__name__
        raise _Reject(DeadLetterReason.BAD_FIELD, f"trade_id must be a string or integer, got {kind}")
    text = str(raw).strip()
    if not text:
        return None
    if len(text) > MAX_TRADE_ID_LEN:
        raise _Reject(DeadLetterReason.BAD_FIELD, f"trade_id longer than {MAX_TRADE_ID_LEN} characters")
    _require_utf8(text, "trade_id")
    return text


# --- timestamps ---------------------------------------------------------------------------------


def _parse_timestamp(raw: object) -> int:
    """UTC epoch nanoseconds from an ISO-8601 string or an epoch number (s, ms, us or ns by magnitude).

    Epoch numbers may be JSON integers or floats, or strings holding one. Raises the module's
    internal rejection (`bad_timestamp`) for anything else.
    """
    if isinstance(raw, bool):
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "ts must be a string or a number, got a boolean")
    if isinstance(raw, int):
        if 0 < raw < 10**17:  # the common case, in exact integer arithmetic
            ns = raw * next((unit for bound, unit in _INT_EPOCH_UNITS if raw < bound), 1_000)
            if ns <= _INT64_MAX:
                return ns
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "epoch ts out of range")
        number = Decimal(raw)
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "ts is not finite")
        number = Decimal(repr(raw))
    elif isinstance(raw, str):
        text = raw.strip()
        if _DECIMAL_RE.fullmatch(text):
            try:
                number = Decimal(text)
            except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
                raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "ts is not a number") from None
        else:
            return _parse_iso(text)
    else:
        kind = type(raw).__name__
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"ts must be a string or a number, got {kind}")
    return _epoch_to_ns(number)


def _epoch_to_ns(number: Decimal) -> int:
    if number <= 0:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "epoch ts must be positive")
    if number.adjusted() > 19:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "epoch ts out of range")
    scale = 1
    for bound, unit_scale in _EPOCH_UNITS:
        if number < bound:
            scale = unit_scale
            break
    ns = int((number * scale).to_integral_value(rounding=ROUND_HALF_EVEN))
    if not 0 < ns <= _INT64_MAX:  # a tiny positive number rounds to 0 ns
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "epoch ts out of range")
    return ns


def _parse_iso(text: str) -> int:
    match = _ISO_RE.fullmatch(text)
    if match is None:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"ts is not ISO-8601 or epoch: {_short(repr(text))}")
    tz = match["tz"]
    offset = timedelta(0)
    if tz and tz not in ("Z", "z"):
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
        if hours > 23 or minutes > 59:
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"bad UTC offset {tz}")
        offset = sign * timedelta(hours=hours, minutes=minutes)
    try:
        local = datetime(
            int(match["y"]),
            int(match["mo"]),
            int(match["d"]),
            int(match["h"]),
            int(match["mi"]),
            int(match["s"] or 0),
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"ts: {exc}") from None
    delta = local - offset - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    frac = match["frac"] or ""
    ns = seconds * 1_000_000_000 + int(frac.ljust(9, "0") or 0)
    if not 0 < ns <= _INT64_MAX:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "ts out of range")
    return ns


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."



# --- the comparison -------------------------------------------------------------------------------

NOW_NS = 1_763_908_200_000_000_000
SKEW_NS = 300 * 1_000_000_000
LINEAGE = Lineage(ingest_ns=NOW_NS - 5_000_000, source_partition=2, source_offset=41)


def _expected(value: bytes | None) -> NormalizedTick | Rejection:
    try:
        return reference_parse_tick(value, lineage=LINEAGE, now_ns=NOW_NS, max_future_skew_ns=SKEW_NS)
    except OverflowError:  # the old code's crash on an ISO time shifted out of datetime's range
        return Rejection(DeadLetterReason.BAD_TIMESTAMP, "ts out of range")


def assert_same(value: bytes | None) -> None:
    got = parse_tick(value, lineage=LINEAGE, now_ns=NOW_NS, max_future_skew_ns=SKEW_NS)
    assert got == _expected(value), value


weird_text = st.sampled_from([
    "", " ", "trade", " TRADE ", "Quote", "tRaDe", "quote\n", "x", "\u00df", "stra\u00dfe", "\ud800",
    "a\x00b", "\u200b", "\u0131", "BINANCE", " xnys ", "A:B", "nan", "-Infinity", "inf", "+1e3", "1_000",
    "\u0661\u0662", " 12.5 ", ".5", "5.", "1e400", "-1e-400", "0x10", "\u0661", "12,5",
])
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12) | weird_text
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
iso_times = st.builds(
    lambda y, mo, d, h, mi, s, frac, sep, tz: f"{y:04d}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}{s}{frac}{tz}",
    st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61),
    st.sampled_from(["", ":00", ":59", ":60", ":07"]),
    st.sampled_from(["", ".1", ".123456", ".123456789", ",5"]),
    st.sampled_from(["T", "t", " "]),
    st.sampled_from(["", "Z", "z", "+00:00", "-04:00", "+0530", "+01", "-23:59", "+24:00", "-01:60", "+14"]),
)
epochs = (
    st.integers(min_value=-(10**21), max_value=10**21)
    | st.sampled_from([1, 10**11 - 1, 10**11, 10**14 - 1, 10**14, 10**17 - 1, 10**17, 2**63 - 1, 2**63,
                       9_223_372_036, 9_223_372_037, 9_223_372_036_854, 9_223_372_036_855])
    | st.floats(min_value=-1e22, max_value=1e22)
)
numbers = st.floats(allow_nan=False) | st.integers() | st.decimals(allow_nan=False).map(str) | json_values
tick_like = st.fixed_dictionaries(
    {},
    optional={
        "venue": st.sampled_from(["XNYS", " xnys ", "BINANCE-USDM"]) | json_values,
        "symbol": st.sampled_from(["BTCUSDT", "clz6", "GCZ13"]) | json_values,
        "type": weird_text | json_values,
        "ts": epochs | iso_times | epochs.map(str) | json_values,
        "price": numbers,
        "size": numbers,
        "bid": numbers,
        "ask": numbers,
        "bid_size": numbers,
        "ask_size": numbers,
        "trade_id": st.integers(min_value=-(10**140), max_value=10**140) | st.text(max_size=140)
        | json_values,
        "seq": st.integers(min_value=-(2**65), max_value=2**65) | st.integers().map(str) | json_values,
    },
)
EQ_SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@EQ_SETTINGS
@given(tick_like)
def test_same_outcome_as_the_reference_on_tick_like_objects(obj: dict[str, Any]) -> None:
    assert_same(json.dumps(obj).encode())
    if _orjson_ok(obj):  # orjson spells numbers differently (1e16, not 1e+16)
        assert_same(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS))


@EQ_SETTINGS
@given(st.fixed_dictionaries({"venue": st.just("XNYS"), "symbol": st.just("IBM"), "price": st.just(1.5),
                              "size": st.just(2), "ts": iso_times}))
def test_same_outcome_as_the_reference_on_iso_times(obj: dict[str, Any]) -> None:
    assert_same(json.dumps(obj).encode())


@EQ_SETTINGS
@given(st.binary(max_size=120) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_same_outcome_as_the_reference_on_arbitrary_bytes(value: bytes) -> None:
    assert_same(value)


@pytest.mark.parametrize("value", [
    None, b"", b"[]", b"null", b"1", b'"x"', b"{", b"\xff\xfe", b'{"a": NaN}', b'{"price": Infinity}',
    b'{"venue": "A", "venue": "B", "symbol": "S", "price": 1, "size": 1, "ts": 1}',
    b'{"venue": "A", "symbol": "S", "price": 1e999, "size": 1, "ts": 1}',
    b'{"venue": "A", "symbol": "S", "price": 1, "size": 1, "ts": 123456789012345678901234567890}',
    b'{"venue": "A", "symbol": "S", "price": "1", "size": "1", "ts": "\\ud800"}',
    b'{"venue": "\\ud800", "symbol": "S", "price": 1, "size": 1, "ts": 1}',
    b'{"venue": "A", "symbol": "S", "price": 1, "size": 1, "ts": 1, "trade_id": "\\udc00x"}',
    b'{"venue": "A", "symbol": "S", "type": "quote", "bid": 2, "ask": 1, "ts": 1}',
    b'{"venue": "A", "symbol": "S", "type": "quote", "ts": "0001-01-01T00:00+01:00", "bid": 1}',
    b'{"venue": "A", "symbol": "S", "type": "quote", "ts": "9999-12-31T23:59:59-01:00", "bid": 1}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a": ' * 3000 + b"1" + b"}" * 3000,
])
def test_same_outcome_as_the_reference_on_hostile_messages(value: bytes | None) -> None:
    assert_same(value)


def test_same_outcome_as_the_reference_on_the_fuzz_corpus() -> None:
    from dptools import fuzz

    for case in fuzz.cases(3000, seed=20261123):
        assert_same(case.value)


def test_same_outcome_as_the_reference_on_the_real_captures() -> None:
    from dptools.bench_normalization import raw_ticks

    for _key, value in raw_ticks(3000):
        assert_same(value)


def _orjson_ok(obj: Any) -> bool:
    try:
        orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return True


def test_an_iso_time_shifted_out_of_range_is_rejected_not_raised() -> None:
    for ts in ("0001-01-01T00:00+01:00", "9999-12-31T23:59:59-01:00"):
        value = json.dumps({"venue": "A", "symbol": "S", "price": 1, "size": 1, "ts": ts}).encode()
        out = parse_tick(value, lineage=LINEAGE, now_ns=NOW_NS, max_future_skew_ns=SKEW_NS)
        assert out == Rejection(DeadLetterReason.BAD_TIMESTAMP, "ts out of range")


def test_memoized_identifiers_and_numbers_keep_their_limits() -> None:
    symbol = "S" * 40  # a valid symbol (<= 64) but too long for a venue (<= 32)
    first = {"venue": "A", "symbol": symbol, "price": "1.5", "size": " 2 ", "ts": 1}
    for _ in range(2):  # the second pass reads the memoized spellings
        assert_same(json.dumps(first).encode())
        assert_same(json.dumps({**first, "venue": symbol}).encode())
        assert_same(json.dumps({**first, "venue": "a:b", "symbol": "a:b"}).encode())
        assert_same(json.dumps({**first, "price": " 1.5", "size": "-0.0"}).encode())
