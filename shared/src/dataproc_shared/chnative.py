"""Rows -> one block of ClickHouse's `Native` input format, for inserts into the embedded engine.

The engine parses `Native` (column after column, fixed-width values as raw little-endian bytes) much
more cheaply than `JSONEachRow` with `best_effort` datetimes, and Python encodes it mostly with
`array` in C. `encode_block` covers the values the services insert: integers into `Int*`/`UInt*`,
floats and integers into `Float64`, `str` into `String`/`LowCardinality(String)`, `datetime` into
`DateTime64(P[, tz])` (naive = UTC, as everywhere in the project). Anything else — another column
type, `None`, a non-finite float, an integer out of its type's range, a datetime outside
`DateTime64`'s range (1900-01-01 to 2299-12-31) — raises `NativeUnsupportedError`, and the caller
sends that insert in the old text format instead, so such rows land exactly as before.

The rows stored are the same as through `JSONEachRow`: `shared/tests/test_chnative.py` inserts
generated rows both ways and compares the tables.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

#: Array type codes of the fixed-width integer types (sizes checked at import below).
_INT_CODES = {
    "Int8": "b", "UInt8": "B", "Int16": "h", "UInt16": "H",
    "Int32": "i", "UInt32": "I", "Int64": "q", "UInt64": "Q",
}
_INT_SIZES = {"Int8": 1, "UInt8": 1, "Int16": 2, "UInt16": 2,
               "Int32": 4, "UInt32": 4, "Int64": 8, "UInt64": 8}
_DT64 = re.compile(r"^DateTime64\((\d)(?:\s*,\s*'[^']*')?\)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)  # noqa: DTZ001 - naive datetimes are UTC by convention
#: DateTime64's range in microseconds since the epoch: 1900-01-01 .. 2299-12-31 23:59:59.999999.
_DT64_MIN_US = int((datetime(1900, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds()) * 1_000_000
_DT64_MAX_US = int((datetime(2300, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds()) * 1_000_000 - 1
_LITTLE = sys.byteorder == "little"

Encoder = Callable[[Sequence[Any]], bytes]


class NativeUnsupportedError(ValueError):
    """A column type or a value this encoder does not send (the caller falls back to the text format)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _fixed(code: str, values: Sequence[Any]) -> bytes:
    try:
        arr = array(code, values)
    except (TypeError, OverflowError) as exc:
        raise NativeUnsupportedError(str(exc)) from exc
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _int_encoder(code: str) -> Encoder:
    def encode(values: Sequence[Any]) -> bytes:
        for v in values:
            if type(v) is not int:
                raise NativeUnsupportedError(f"not an int: {type(v).__name__}")
        return _fixed(code, values)
    return encode


def _float64(values: Sequence[Any]) -> bytes:
    for v in values:
        if type(v) is not float and type(v) is not int:
            raise NativeUnsupportedError(f"not a float: {type(v).__name__}")
    arr = array("d", values)
    total = sum(arr)
    if not math.isfinite(total) and not all(math.isfinite(v) for v in arr):
        # The text format sends NaN and infinities as null (stored as 0): leave them to it.
        raise NativeUnsupportedError("non-finite float")
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _string(values: Sequence[Any]) -> bytes:
    out = bytearray()
    for v in values:
        if type(v) is not str:
            raise NativeUnsupportedError(f"not a str: {type(v).__name__}")
        try:
            b = v.encode()
        except UnicodeEncodeError as exc:
            raise NativeUnsupportedError(str(exc)) from exc
        n = len(b)
        if n < 0x80:
            out.append(n)
        else:
            out += _varint(n)
        out += b
    return bytes(out)


def _datetime64_encoder(precision: int) -> Encoder:
    def encode(values: Sequence[Any]) -> bytes:
        ticks: list[int] = []
        append = ticks.append
        for v in values:
            if type(v) is not datetime:
                raise NativeUnsupportedError(f"not a datetime: {type(v).__name__}")
            d = v - (_EPOCH if v.tzinfo is not None else _EPOCH_NAIVE)
            us = (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
            if us < _DT64_MIN_US or us > _DT64_MAX_US:
                raise NativeUnsupportedError("datetime outside DateTime64's range")
            append(us)
        if precision > 6:
            scale = 10 ** (precision - 6)
            ticks = [t * scale for t in ticks]
        elif precision < 6:
            # Digits beyond the precision are dropped toward the past, like the text parser does.
            div = 10 ** (6 - precision)
            ticks = [t // div for t in ticks]
        return _fixed("q", ticks)
    return encode


def column_encoder(type_name: str) -> tuple[str, Encoder]:
    """(type sent in the block, encoder) for a column of `type_name`; `NativeUnsupportedError` if none."""
    if type_name in _INT_CODES:
        code = _INT_CODES[type_name]
        if array(code).itemsize != _INT_SIZES[type_name]:
            raise NativeUnsupportedError(f"no {type_name} array on this platform")
        return type_name, _int_encoder(code)
    if type_name == "Float64":
        return type_name, _float64
    if type_name in ("String", "LowCardinality(String)"):
        # The engine converts String to LowCardinality(String) on insert.
        return "String", _string
    m = _DT64.match(type_name)
    if m is not None:
        return type_name, _datetime64_encoder(int(m.group(1)))
    raise NativeUnsupportedError(f"column type {type_name} is not sent as Native")


class BlockEncoder:
    """Encodes rows for a fixed list of (column name, ClickHouse type) into one `Native` block."""

    def __init__(self, columns: Sequence[tuple[str, str]]) -> None:
        """Raises `NativeUnsupportedError` when a column's type is not supported."""
        self._heads: list[bytes] = []
        self._encoders: list[Encoder] = []
        for name, type_name in columns:
            sent, encoder = column_encoder(type_name)
            raw_name, raw_type = name.encode(), sent.encode()
            self._heads.append(_varint(len(raw_name)) + raw_name + _varint(len(raw_type)) + raw_type)
            self._encoders.append(encoder)

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        """One block holding `rows`; raises `NativeUnsupportedError` for a value it does not send."""
        width = len(self._heads)
        for row in rows:
            if len(row) != width:
                raise NativeUnsupportedError(f"row has {len(row)} values for {width} columns")
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]
        parts = [_varint(width), _varint(len(rows))]
        for head, encoder, values in zip(self._heads, self._encoders, columns, strict=True):
            parts.append(head)
            parts.append(encoder(values))
        return b"".join(parts)


def encode_block(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> bytes:
    """`rows` (values in `columns` order) as one `Native` block; see `BlockEncoder`."""
    return BlockEncoder(columns).encode(rows)
