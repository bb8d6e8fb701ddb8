"""Raw tick bytes -> a normalized tick or a rejection, with no I/O.

The rules are the external contract's "Raw tick" table; where the contract leaves room, the choices
made here are written down in `service-normalization/README.md` ("Parsing rules"). Everything in this
module is pure: the current time comes in as an argument, so every outcome is reproducible.

Per-record cost matters here (every raw tick passes through `parse_tick`), so the common shapes take
fast paths: exact JSON types are checked first, and accepted identifiers and numeric strings are
memoized by their raw spelling in bounded module-level dicts (a memo never changes an outcome, it
only skips recomputing it). `tests/test_transform_equivalence.py` holds these paths to the
straightforward implementation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from typing import Any

import msgspec
import orjson
from dataproc_shared.logging import ensure_correlation_id
from dataproc_shared.records import (
    CORRELATION_HEADER,
    INGEST_TIME_HEADER,
    AuditEvent,
    BatchResult,
    DeadLetter,
    DeadLetterReason,
    InRecord,
    OutRecord,
)

from normalization.dedup import DedupEntry, DedupWindow, dedup_key

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

_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE_WORDS = frozenset({"nan", "inf", "infinity"})
_INTEGER_RE = re.compile(r"[+-]?\d+")
_ISO_RE = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[Tt ]"
    r"(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<frac>\d{1,9}))?)?"
    r"(?P<tz>[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class TickKind(StrEnum):
    """Kind of a normalized tick; the values are the Avro enum symbols."""

    TRADE = "TRADE"
    QUOTE = "QUOTE"


class NormalizedTick(msgspec.Struct, frozen=True, gc=False):
    """One validated tick, field for field the `normalized_tick.v1` Avro record.

    Immutable. A msgspec struct rather than a frozen dataclass: it is built once per record, and a
    frozen dataclass's `__init__` (one `object.__setattr__` per field) cost about 3 µs of it.
    """

    venue: str
    symbol: str
    kind: TickKind
    ts_ns: int
    ingest_ns: int
    source_partition: int
    source_offset: int
    seq: int | None = None
    trade_id: str | None = None
    price: float | None = None
    size: float | None = None
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None

    @property
    def key(self) -> str:
        """The canonical instrument key `VENUE:SYMBOL`."""
        return f"{self.venue}:{self.symbol}"

    def to_avro(self) -> dict[str, Any]:
        """The record as the Avro writer takes it."""
        return {
            "venue": self.venue,
            "symbol": self.symbol,
            "kind": self.kind.value,
            "ts_ns": self.ts_ns,
            "seq": self.seq,
            "trade_id": self.trade_id,
            "price": self.price,
            "size": self.size,
            "bid": self.bid,
            "ask": self.ask,
            "bid_size": self.bid_size,
            "ask_size": self.ask_size,
            "ingest_ns": self.ingest_ns,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
        }

    @classmethod
    def from_avro(cls, record: Mapping[str, Any]) -> NormalizedTick:
        """Inverse of `to_avro`."""
        fields = dict(record)
        fields["kind"] = TickKind(fields["kind"])
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a raw record cannot become a tick: a dead-letter reason code and a human-readable detail."""

    reason: DeadLetterReason
    detail: str


class _Reject(Exception):
    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.rejection = Rejection(reason, detail)


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a raw record came from and when it reached Kafka."""

    ingest_ns: int
    source_partition: int
    source_offset: int


def parse_tick(
    value: bytes | None, *, lineage: Lineage, now_ns: int, max_future_skew_ns: int
) -> NormalizedTick | Rejection:
    """Turn the bytes of one raw-tick message into a `NormalizedTick`, or say why not.

    `now_ns` is the moment the message is read (UTC epoch ns); a tick whose event time is more than
    `max_future_skew_ns` after it is rejected as `future_timestamp`. Never raises on any input.
    """
    return _parse(
        value, lineage.ingest_ns, lineage.source_partition, lineage.source_offset, now_ns, max_future_skew_ns
    )


def _parse(
    value: bytes | None, ingest_ns: int, partition: int, offset: int, now_ns: int, max_future_skew_ns: int
) -> NormalizedTick | Rejection:
    try:
        obj = _decode(value)
        return _build(obj, ingest_ns, partition, offset, now_ns, max_future_skew_ns)
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
    if type(obj) is not dict:
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


def _build(
    obj: dict[str, Any], ingest_ns: int, partition: int, offset: int, now_ns: int, max_future_skew_ns: int
) -> NormalizedTick:
    get = obj.get
    venue = _identifier(get("venue"), "venue", MAX_VENUE_LEN)
    if ":" in venue:
        raise _Reject(DeadLetterReason.BAD_FIELD, "venue must not contain ':'")
    symbol = _identifier(get("symbol"), "symbol", MAX_SYMBOL_LEN)
    kind = _kind(obj)
    raw_ts = get("ts")
    if raw_ts is None:
        raise _Reject(DeadLetterReason.MISSING_FIELD, "ts is missing")
    ts_ns = _parse_timestamp(raw_ts)
    if ts_ns - now_ns > max_future_skew_ns:
        ahead_ms = (ts_ns - now_ns) // 1_000_000
        raise _Reject(DeadLetterReason.FUTURE_TIMESTAMP, f"ts is {ahead_ms} ms ahead of the clock")
    seq = _seq(get("seq"))
    if kind is _TRADE:
        price = _required_number(get("price"), "price")
        size = _required_number(get("size"), "size")
        if size <= 0:
            raise _Reject(DeadLetterReason.BAD_SIZE, f"trade size must be > 0, got {size!r}")
        # Positional: the field order of NormalizedTick (keywords cost a microsecond more).
        return NormalizedTick(
            venue, symbol, kind, ts_ns, ingest_ns, partition, offset, seq, _trade_id(get("trade_id")),
            price, size,
        )
    bid = _number(get("bid"), "bid")
    ask = _number(get("ask"), "ask")
    if bid is None and ask is None:
        raise _Reject(DeadLetterReason.EMPTY_QUOTE, "quote has neither bid nor ask")
    if bid is not None and ask is not None and bid > ask:
        raise _Reject(DeadLetterReason.CROSSED_QUOTE, f"bid {bid!r} > ask {ask!r}")
    bid_size = _number(get("bid_size"), "bid_size")
    ask_size = _number(get("ask_size"), "ask_size")
    if bid_size is not None and bid_size < 0:
        raise _Reject(DeadLetterReason.BAD_SIZE, f"bid_size must be >= 0, got {bid_size!r}")
    if ask_size is not None and ask_size < 0:
        raise _Reject(DeadLetterReason.BAD_SIZE, f"ask_size must be >= 0, got {ask_size!r}")
    return NormalizedTick(
        venue, symbol, kind, ts_ns, ingest_ns, partition, offset, seq, None, None, None,
        bid, ask, bid_size, ask_size,
    )


#: Accepted identifiers by raw spelling (a few hundred instruments repeat in every batch).
_IDENTIFIERS: dict[str, str] = {}
_CACHE_LIMIT = 32768
_CACHED_TEXT_LEN = 64


def _identifier(raw: object, name: str, max_len: int) -> str:
    if type(raw) is str:  # the common case: every check passes
        text = _IDENTIFIERS.get(raw)
        if text is not None and len(text) <= max_len:
            return text
        text = raw.strip().upper()
        # Not printable includes the lone surrogates, so a printable text is valid Unicode.
        if text and len(text) <= max_len and text.isprintable():
            if len(raw) <= _CACHED_TEXT_LEN:
                _remember(_IDENTIFIERS, raw, text)
            return text
    if raw is None:
        raise _Reject(DeadLetterReason.MISSING_FIELD, f"{name} is missing")
    if not isinstance(raw, str):
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} must be a string, got {type(raw).__name__}")
    text = raw.strip().upper()
    if not text:
        raise _Reject(DeadLetterReason.MISSING_FIELD, f"{name} is empty")
    if len(text) > max_len:
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} longer than {max_len} characters")
    raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} contains control characters")


def _remember(cache: dict[str, Any], key: str, value: Any) -> None:
    """Memoize a pure function's result; the cache is bounded by starting over when full."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _require_utf8(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Reject(DeadLetterReason.BAD_FIELD, f"{name} is not valid Unicode") from None


#: `type` values as producers usually spell them (any other spelling goes the long way).
_TRADE, _QUOTE = TickKind.TRADE, TickKind.QUOTE
_KIND_WORDS = {
    "trade": TickKind.TRADE, "TRADE": TickKind.TRADE, "Trade": TickKind.TRADE,
    "quote": TickKind.QUOTE, "QUOTE": TickKind.QUOTE, "Quote": TickKind.QUOTE,
}


def _kind(obj: dict[str, Any]) -> TickKind:
    raw = obj.get("type")
    if type(raw) is str:
        kind = _KIND_WORDS.get(raw)
        if kind is not None:
            return kind
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


def _number(raw: object, name: str) -> float | None:
    return None if raw is None else _parse_number(raw, name)


def _required_number(raw: object, name: str) -> float:
    if raw is None:
        raise _Reject(DeadLetterReason.MISSING_FIELD, f"{name} is missing")
    return _parse_number(raw, name)


#: Accepted numeric strings by raw spelling (prices and sizes repeat from tick to tick).
_NUMBERS: dict[str, float] = {}


def _parse_number(raw: object, name: str = "value") -> float:
    """A finite Float64 from a JSON number or a numeric string (the nearest double to its decimal).

    Raises the module's internal rejection for anything else.
    """
    if isinstance(raw, float):
        value = raw
    elif isinstance(raw, str):
        cached = _NUMBERS.get(raw)
        if cached is not None:
            return cached
        text = raw.strip()
        if _DECIMAL_RE.fullmatch(text):
            value = float(text)
            if len(raw) <= _CACHED_TEXT_LEN and math.isfinite(value):
                _remember(_NUMBERS, raw, value)
        elif text.lstrip("+-").lower() in _NON_FINITE_WORDS:
            raise _Reject(DeadLetterReason.NON_FINITE, f"{name} is {_short(text)}")
        else:
            raise _Reject(DeadLetterReason.BAD_NUMBER, f"{name} is not a number: {_short(repr(raw))}")
    elif isinstance(raw, bool):
        raise _Reject(DeadLetterReason.BAD_NUMBER, f"{name} must be a number, got a boolean")
    elif isinstance(raw, int):
        try:
            value = float(raw)
        except OverflowError:
            raise _Reject(DeadLetterReason.NON_FINITE, f"{name} is too large for Float64") from None
    else:
        raise _Reject(DeadLetterReason.BAD_NUMBER, f"{name} must be a number, got {type(raw).__name__}")
    if not math.isfinite(value):
        raise _Reject(DeadLetterReason.NON_FINITE, f"{name} is not finite")
    return value


def _seq(raw: object) -> int | None:
    if raw is None:
        return None
    if type(raw) is int and _INT64_MIN <= raw <= _INT64_MAX:
        return raw
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
    # The common case first: an ASCII string or an integer (ASCII is valid UTF-8).
    if isinstance(raw, str):
        text = raw.strip()
        if text and len(text) <= MAX_TRADE_ID_LEN and text.isascii():
            return text
    elif type(raw) is int:
        text = str(raw)
        if len(text) <= MAX_TRADE_ID_LEN:
            return text
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
            if raw < 10**11:
                ns = raw * 1_000_000_000
            elif raw < 10**14:
                ns = raw * 1_000_000
            else:
                ns = raw * 1_000
            if ns <= _INT64_MAX:
                return ns
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "epoch ts out of range")
        if 10**17 <= raw <= _INT64_MAX:  # nanoseconds already
            return raw
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
    year, month, day, hour, minute, second, frac, tz = match.groups()
    offset_s = 0
    if tz and tz not in ("Z", "z"):
        digits = tz[1:].replace(":", "")
        off_hours, off_minutes = int(digits[:2]), int(digits[2:4] or 0)
        if off_hours > 23 or off_minutes > 59:
            raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"bad UTC offset {tz}")
        offset_s = (-60 if tz[0] == "-" else 60) * (off_hours * 60 + off_minutes)
    h, mi, sec = int(hour), int(minute), int(second or 0)
    try:
        days = _days_since_epoch(int(year), int(month), int(day))
        if h > 23 or mi > 59 or sec > 59:
            datetime(2000, 1, 1, h, mi, sec)  # noqa: DTZ001 - raises datetime's own message
    except ValueError as exc:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, f"ts: {exc}") from None
    seconds = days * 86_400 + h * 3_600 + mi * 60 + sec - offset_s
    ns = seconds * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    if not 0 < ns <= _INT64_MAX:
        raise _Reject(DeadLetterReason.BAD_TIMESTAMP, "ts out of range")
    return ns


@lru_cache(maxsize=4096)
def _days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a calendar date; `ValueError` (datetime's message) for an invalid one."""
    return date(year, month, day).toordinal() - _EPOCH_ORDINAL


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the batch transform ------------------------------------------------------------------------

Clock = Callable[[], int]
#: Turns an accepted tick into the output message's value (`normalization.codec.tick_encoder`).
Encoder = Callable[[NormalizedTick], bytes]
Partitioner = Callable[[bytes, int], int]

#: Header with the event time (ns) of an output; the loop turns it into `dp_event_latency_seconds`.
EVENT_TIME_HEADER = "dp-event-ns"


@dataclass(frozen=True, slots=True)
class NormalizerConfig:
    """What the batch transform needs to know about its surroundings."""

    output_topic: str
    output_partitions: int
    max_future_skew_ns: int = 300 * 1_000_000_000
    dedup_window_ns: int = 600 * 1_000_000_000
    dedup_max_entries: int = 200_000


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A trade dropped because its `venue` + `trade_id` was already accepted inside the window."""

    tick: NormalizedTick
    first: DedupEntry


Outcome = NormalizedTick | Rejection | Duplicate


class Normalizer:
    """Raw-tick records in, normalized ticks, dead letters and duplicate counts out.

    Holds one `DedupWindow` per input partition; the caller persists their pending changes and
    restores them (see `windows`, `restore_partition`, `drop_partition`). Pure apart from that
    in-memory state: the clock, the Avro encoder and the partitioner are injected.
    """

    def __init__(
        self, config: NormalizerConfig, *, encode: Encoder, partitioner: Partitioner, clock: Clock
    ) -> None:
        self.config = config
        self._encode = encode
        self._partitioner = partitioner
        self._clock = clock
        self.windows: dict[int, DedupWindow] = {}

    def window(self, partition: int) -> DedupWindow:
        """The dedup memory of input `partition` (created empty on first use)."""
        window = self.windows.get(partition)
        if window is None:
            window = DedupWindow(self.config.dedup_window_ns, self.config.dedup_max_entries)
            self.windows[partition] = window
        return window

    def restore_partition(self, partition: int, changes: Iterable[tuple[str, DedupEntry | None]]) -> None:
        """Rebuild the dedup memory of `partition` from its changelog, in order."""
        self.window(partition).restore(changes)

    def drop_partition(self, partition: int) -> None:
        """Forget the memory of a partition this instance no longer owns."""
        self.windows.pop(partition, None)

    def classify(self, record: InRecord, now_ns: int) -> Outcome:
        """Decide what one record becomes (updating the dedup memory when a trade is accepted)."""
        parsed = _parse(
            record.value, record.timestamp_ms * 1_000_000, record.partition, record.offset, now_ns,
            self.config.max_future_skew_ns,
        )
        if isinstance(parsed, Rejection) or parsed.trade_id is None:
            return parsed
        verdict = self.window(record.partition).check(
            dedup_key(parsed.venue, parsed.trade_id), parsed.ts_ns, record.offset
        )
        if verdict.duplicate and verdict.first is not None:
            return Duplicate(parsed, verdict.first)
        return parsed

    def process(self, batch: Iterable[InRecord]) -> BatchResult:
        """Transform a batch (in partition order) into a `BatchResult`."""
        result = BatchResult()
        now_ns = self._clock()
        # Event time reached per input partition (its last valid tick's): the loop's alignment input.
        reached = result.event_time_ns
        for record in batch:
            outcome = self.classify(record, now_ns)
            if isinstance(outcome, NormalizedTick):
                result.outputs.append(self._out_record(record, outcome))
                reached[(record.topic, record.partition)] = outcome.ts_ns
            elif isinstance(outcome, Rejection):
                result.dead_letters.append(DeadLetter(record, outcome.reason, outcome.detail))
            else:
                result.deduplicated += 1
                result.audit.append(_duplicate_audit(record, outcome))
                reached[(record.topic, record.partition)] = outcome.tick.ts_ns
        return result

    def _out_record(self, record: InRecord, tick: NormalizedTick) -> OutRecord:
        key = f"{tick.venue}:{tick.symbol}".encode()
        return OutRecord(
            self.config.output_topic,
            key,
            self._encode(tick),
            self._partitioner(key, self.config.output_partitions),
            (
                (CORRELATION_HEADER, ensure_correlation_id(record).encode()),
                (INGEST_TIME_HEADER, b"%d" % tick.ingest_ns),
                (EVENT_TIME_HEADER, b"%d" % tick.ts_ns),
            ),
        )


def _duplicate_audit(record: InRecord, duplicate: Duplicate) -> AuditEvent:
    return AuditEvent(
        event_type="duplicate_dropped",
        outcome="dropped",
        reason="duplicate",
        instrument=duplicate.tick.key,
        correlation_id=ensure_correlation_id(record),
        source_topic=record.topic,
        source_partition=record.partition,
        offset_from=record.offset,
        offset_to=record.offset,
        details={
            "trade_id": duplicate.tick.trade_id,
            "ts_ns": duplicate.tick.ts_ns,
            "first_offset": duplicate.first.offset,
            "first_ts_ns": duplicate.first.ts_ns,
        },
    )
