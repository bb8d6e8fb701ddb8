"""Generated Avro binary codecs for flat record schemas (the hot path of `dataproc_shared.avro`).

fastavro's `schemaless_reader`/`schemaless_writer` go through a file object and a generic
per-type dispatch for every field; for the message schemas of this project (records of `string`,
`long`, `int`, `double`, `boolean`, `enum` and `["null", X]` unions of those) a function written
for the one schema, working on the bytes directly, does the same work in about half the time.
`compile_flat` builds such a pair from a schema (with logical types already stripped) and returns
`None` for anything else, which keeps using fastavro.

The bytes are those of the Avro specification (zig-zag varints, little-endian IEEE 754 doubles,
length-prefixed UTF-8), identical to fastavro's output; the property tests in
`tests/test_avro.py` compare both on generated records. Errors: encoding raises `KeyError`,
`TypeError`, `AttributeError`, `ValueError` or `struct.error` for a record that does not fit;
decoding raises `ValueError`, `IndexError`, `UnicodeDecodeError` or `struct.error` on a truncated
or corrupt body. The caller (`SchemaRegistry`) turns both into its own errors.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_DOUBLE = struct.Struct("<d")
_MISSING = object()
_INTEGERS = frozenset({"int", "long"})
_PRIMITIVES = frozenset({"int", "long", "double", "boolean", "string"})
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
#: A well-formed varint: at most nine bytes with the continuation bit, then one without.
_VARINT = re.compile(rb"[\x80-\xff]{0,9}[\x00-\x7f]")


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))
#: The continuation bits (0x80 in every byte but the last) of a varint of k bytes, as an integer.
_CONTINUATION = tuple(sum(0x80 << (8 * i) for i in range(k - 1)) for k in range(11))


def write_long(n: int) -> bytes:
    """Zig-zag varint of a 64-bit integer (Avro `int` and `long`)."""
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise ValueError(f"{n} does not fit a 64-bit long")
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    # No per-byte loop: spread the low 56 bits into eight 7-bit groups, one per byte, in three
    # mask-and-shift steps (28-bit halves, then 14-bit quarters, then 7-bit groups), put the top
    # bits above them, set the continuation bits and write the integer little-endian.
    x = n & 0xFFFFFFFFFFFFFF
    x = (x & 0xFFFFFFF) | (x & 0xFFFFFFF0000000) << 4
    x = (x & 0x3FFF00003FFF) | (x & 0xFFFC0000FFFC000) << 2
    x = (x & 0x7F007F007F007F) | (x & 0x3F803F803F803F80) << 1
    k = (n.bit_length() + 6) // 7
    if k > 8:
        top = n >> 56
        x |= ((top & 0x7F) | (top & 0x80) << 1) << 64
    return (x | _CONTINUATION[k]).to_bytes(k, "little")


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint at `pos`, and the position after it."""
    c = buf[pos]
    if c < 0x80:
        return (c >> 1) ^ -(c & 1), pos + 1
    n = c & 0x7F
    shift = 7
    pos += 1
    while True:
        c = buf[pos]
        pos += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


@dataclass(frozen=True, slots=True)
class FlatCodec:
    """A schema's generated pair: `encode(record) -> body`, `decode(buf, pos) -> record`."""

    encode: Callable[[Mapping[str, Any]], bytes]
    decode: Callable[[bytes, int], dict[str, Any]]


def _field_type(t: Any) -> tuple[bool, str, list[str] | None] | None:
    """(nullable, primitive or 'enum', enum symbols) of a field type, None when not flat."""
    nullable = False
    if isinstance(t, list):
        if len(t) != 2 or t[0] != "null":
            return None
        nullable, t = True, t[1]
    if isinstance(t, dict):
        if t.get("type") == "enum" and isinstance(t.get("symbols"), list):
            return nullable, "enum", [str(s) for s in t["symbols"]]
        if set(t) == {"type"}:
            t = t["type"]
        else:
            return None
    if isinstance(t, str) and t in _PRIMITIVES:
        return nullable, t, None
    return None


def _read_varint(indent: str, target: str) -> list[str]:
    """Generated lines reading the varint at `p` into `target`: one-byte values inline, others by call.

    Small integers (lengths, enum indices, partitions) are the common case; inlining them saves a
    function call per field.
    """
    return [f"{indent}c = b[p]", f"{indent}if c < 0x80:", f"{indent}    {target} = (c >> 1) ^ -(c & 1)",
            f"{indent}    p += 1", f"{indent}else:", f"{indent}    {target}, p = _rl(b, p)"]


def compile_flat(schema: Any) -> FlatCodec | None:
    """Generated codec of a flat record schema (logical types stripped), else None."""
    if not isinstance(schema, dict) or schema.get("type") != "record" or not schema.get("fields"):
        return None
    ns: dict[str, Any] = {
        "_wl": write_long, "_rl": read_long, "_pd": _DOUBLE.pack, "_ud": _DOUBLE.unpack_from,
        "_missing": _MISSING,
    }
    enc = ["def encode(r):", "    parts = []", "    a = parts.append"]
    for i, f in enumerate(schema["fields"]):
        kind = _field_type(f.get("type"))
        if kind is None:
            return None
        nullable, prim, symbols = kind
        name, v = str(f["name"]), f"v{i}"
        if "default" in f:
            ns[f"_default{i}"] = f["default"]
            enc.append(f"    {v} = r.get({name!r}, _default{i})")
        elif nullable:
            enc.append(f"    {v} = r.get({name!r})")
        else:
            enc.append(f"    {v} = r[{name!r}]")
        e_ind = "    "
        if nullable:
            enc += [f"    if {v} is None:", "        a(b'\\x00')", "    else:", "        a(b'\\x02')"]
            e_ind = "        "
        if prim in _INTEGERS:
            enc.append(f"{e_ind}a(_wl({v}))")
        elif prim == "double":
            enc.append(f"{e_ind}a(_pd({v}))")
        elif prim == "boolean":
            enc.append(f"{e_ind}a(b'\\x01' if {v} else b'\\x00')")
        elif prim == "string":
            enc += [f"{e_ind}{v} = {v}.encode()", f"{e_ind}a(_wl(len({v})))", f"{e_ind}a({v})"]
        else:  # enum
            ns[f"_index{i}"] = {s: k for k, s in enumerate(symbols or [])}
            enc.append(f"{e_ind}a(_wl(_index{i}[{v}]))")
    enc.append("    return b''.join(parts)")
    exec("\n".join(enc), ns)  # noqa: S102 - code generated from the schema's field list above
    decode = compile_flat_reader(schema)
    if decode is None:  # pragma: no cover - the same field kinds as above
        return None
    return FlatCodec(encode=ns["encode"], decode=decode)


Reader = Callable[[bytes, int], dict[str, Any]]


def compile_flat_reader(schema: Any, keep: Iterable[str] | None = None) -> Reader | None:
    """Generated decoder of a flat record schema (logical types stripped), else None.

    With `keep`, the decoder checks the whole body exactly as the full one does (it accepts and
    refuses the same bytes) but returns only the fields named in `keep`: the values of the others
    are not built (integers are only checked to be well-formed varints, doubles to be present,
    strings to be UTF-8).
    """
    if not isinstance(schema, dict) or schema.get("type") != "record" or not schema.get("fields"):
        return None
    wanted = None if keep is None else frozenset(keep)
    ns: dict[str, Any] = {"_rl": read_long, "_ud": _DOUBLE.unpack_from, "_skip": _VARINT.match}
    dec = ["def decode(b, p):", "    lb = len(b)"]
    kept_fields: list[tuple[str, str]] = []
    for i, f in enumerate(schema["fields"]):
        kind = _field_type(f.get("type"))
        if kind is None:
            return None
        nullable, prim, symbols = kind
        name, v = str(f["name"]), f"v{i}"
        kept = wanted is None or name in wanted
        if kept:
            kept_fields.append((name, v))
        d_ind = "    "
        if nullable:
            dec += ["    u = b[p]", "    p += 1", "    if u == 0:",
                    f"        {v} = None" if kept else "        pass", "    elif u != 2:",
                    "        raise ValueError('invalid union index')", "    else:"]
            d_ind = "        "
        if prim in _INTEGERS:
            if kept:
                dec += _read_varint(d_ind, v)
            else:
                dec += [f"{d_ind}if b[p] < 0x80:", f"{d_ind}    p += 1", f"{d_ind}else:",
                        f"{d_ind}    m = _skip(b, p)", f"{d_ind}    if m is None:",
                        f"{d_ind}        raise ValueError('truncated varint or longer than 10 bytes')",
                        f"{d_ind}    p = m.end()"]
        elif prim == "double":
            if kept:
                dec += [f"{d_ind}({v},) = _ud(b, p)", f"{d_ind}p += 8"]
            else:
                dec += [f"{d_ind}p += 8", f"{d_ind}if p > lb:",
                        f"{d_ind}    raise ValueError('truncated double')"]
        elif prim == "boolean":
            dec += [f"{d_ind}c = b[p]", f"{d_ind}if c > 1:",
                    f"{d_ind}    raise ValueError(f'invalid boolean byte {{c}}')",
                    f"{d_ind}{v} = c == 1" if kept else f"{d_ind}pass", f"{d_ind}p += 1"]
        elif prim == "string":
            dec += [*_read_varint(d_ind, "n"), f"{d_ind}if n < 0:",
                    f"{d_ind}    raise ValueError('negative length')",
                    f"{d_ind}q = p + n", f"{d_ind}if q > lb:",
                    f"{d_ind}    raise ValueError('truncated string')",
                    f"{d_ind}{v} = b[p:q].decode()" if kept else f"{d_ind}b[p:q].decode()", f"{d_ind}p = q"]
        else:  # enum
            ns[f"_symbols{i}"] = tuple(symbols or [])
            dec += [*_read_varint(d_ind, "n"), f"{d_ind}if n < 0:",
                    f"{d_ind}    raise IndexError('enum index')",
                    f"{d_ind}{v} = _symbols{i}[n]" if kept else f"{d_ind}_symbols{i}[n]"]
    dec.append("    return {" + ", ".join(f"{n!r}: {v}" for n, v in kept_fields) + "}")
    exec("\n".join(dec), ns)  # noqa: S102 - code generated from the schema's field list above
    decoder: Reader = ns["decode"]
    return decoder
