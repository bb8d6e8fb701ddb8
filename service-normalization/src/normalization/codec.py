"""The Avro message of a `NormalizedTick`, written straight from its fields.

The generic path (`NormalizedTick.to_avro` then `dataproc_shared.avro.encode`) builds a dict and
looks every field up again; this encoder writes the same bytes (single-object encoding: marker,
fingerprint, body) from the struct's attributes, about twice as fast. It is written for one field
list, `FIELDS`: `tick_encoder` uses it only when the newest `normalized_tick` schema has exactly
that list, and falls back to the generic path otherwise, so a new schema version can never be
written with the old layout. `tests/test_codec.py` compares both paths byte for byte.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from dataproc_shared import avro
from dataproc_shared.avro_flat import write_long

from normalization.transform import NormalizedTick, TickKind

SCHEMA = "normalized_tick"

#: The (name, type) list the direct encoder writes, in order (types as in the `.avsc`, JSON text).
FIELDS: tuple[tuple[str, str], ...] = (
    ("venue", '"string"'),
    ("symbol", '"string"'),
    ("kind", '{"name": "TickKind", "symbols": ["TRADE", "QUOTE"], "type": "enum"}'),
    ("ts_ns", '"long"'),
    ("seq", '["null", "long"]'),
    ("trade_id", '["null", "string"]'),
    ("price", '["null", "double"]'),
    ("size", '["null", "double"]'),
    ("bid", '["null", "double"]'),
    ("ask", '["null", "double"]'),
    ("bid_size", '["null", "double"]'),
    ("ask_size", '["null", "double"]'),
    ("ingest_ns", '"long"'),
    ("source_partition", '"int"'),
    ("source_offset", '"long"'),
)

TickEncoder = Callable[[NormalizedTick], bytes]

_NULL = b"\x00"
_SOME = b"\x02"  # union branch 1 (the value) of ["null", X]
_SOME_DOUBLE = struct.Struct("<Bd").pack
_TWO_DOUBLES = struct.Struct("<BdBd").pack
_FULL_QUOTE = struct.Struct("<BBBdBdBdBd").pack  # price, size null; bid, ask and both sizes set
_NO_QUOTE = b"\x00\x00\x00\x00"  # bid, ask, bid_size, ask_size all null
_KIND = {TickKind.TRADE: b"\x00", TickKind.QUOTE: b"\x02"}
#: Varints of the lengths of short strings (venue and symbol are at most 64 characters).
_SHORT = tuple(write_long(n) for n in range(64))


def field_list(schema: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(name, type as canonical JSON text) of each field of a record schema, docs and defaults left out."""
    return tuple(
        (str(f["name"]), json.dumps(_without_docs(f["type"]), sort_keys=True)) for f in schema["fields"]
    )


def _without_docs(t: Any) -> Any:
    if isinstance(t, dict):
        return {k: _without_docs(v) for k, v in t.items() if k not in ("doc", "namespace", "aliases")}
    if isinstance(t, list):
        return [_without_docs(v) for v in t]
    return t


def tick_encoder(registry: avro.SchemaRegistry | None = None) -> TickEncoder:
    """The encoder of the newest `normalized_tick` schema: the direct one when it fits, else generic.

    Both raise `dataproc_shared.avro.EncodeError` for a tick that does not fit the schema (a value
    outside a 64-bit long).
    """
    registry = registry or avro.default_registry()
    schema = registry.get(SCHEMA)
    if field_list(schema.source) == FIELDS:
        return _direct_encoder(schema.header, f"{schema.name}.v{schema.version}")
    return lambda tick: registry.encode(SCHEMA, tick.to_avro())


def _direct_encoder(header: bytes, label: str) -> TickEncoder:
    wl, some_double, two_doubles, full_quote = write_long, _SOME_DOUBLE, _TWO_DOUBLES, _FULL_QUOTE
    kinds, short = _KIND, _SHORT
    # The last event and ingest times and their varints: consecutive records often share them
    # (ticks of one millisecond, records produced together).
    last_ts, last_ts_bytes = 0, wl(0)
    last_ingest, last_ingest_bytes = 0, wl(0)

    def encode(t: NormalizedTick) -> bytes:
        nonlocal last_ts, last_ts_bytes, last_ingest, last_ingest_bytes
        try:
            venue = t.venue.encode()
            symbol = t.symbol.encode()
            n_venue, n_symbol = len(venue), len(symbol)
            ts = t.ts_ns
            if ts != last_ts:
                last_ts, last_ts_bytes = ts, wl(ts)
            parts = [
                header, short[n_venue] if n_venue < 64 else wl(n_venue), venue,
                short[n_symbol] if n_symbol < 64 else wl(n_symbol), symbol, kinds[t.kind], last_ts_bytes,
            ]
            append = parts.append
            seq = t.seq
            append(_NULL if seq is None else _SOME + wl(seq))
            trade_id = t.trade_id
            if trade_id is None:
                append(_NULL)
            else:
                raw = trade_id.encode()
                n_raw = len(raw)
                append(_SOME + (short[n_raw] if n_raw < 64 else wl(n_raw)))
                append(raw)
            price, size, bid, ask, bid_size, ask_size = t.price, t.size, t.bid, t.ask, t.bid_size, t.ask_size
            if price is not None and size is not None and bid is None and ask is None and bid_size is None \
                    and ask_size is None:  # a trade
                append(two_doubles(2, price, 2, size))
                append(_NO_QUOTE)
            elif price is None and size is None and bid is not None and ask is not None \
                    and bid_size is not None and ask_size is not None:  # a quote with both sides
                append(full_quote(0, 0, 2, bid, 2, ask, 2, bid_size, 2, ask_size))
            else:
                for x in (price, size, bid, ask, bid_size, ask_size):
                    append(_NULL if x is None else some_double(2, x))
            ingest = t.ingest_ns
            if ingest != last_ingest:
                last_ingest, last_ingest_bytes = ingest, wl(ingest)
            append(last_ingest_bytes)
            partition = t.source_partition
            append(short[partition] if 0 <= partition < 64 else wl(partition))
            append(wl(t.source_offset))
        except (ValueError, TypeError, KeyError, AttributeError, struct.error) as exc:
            raise avro.EncodeError(f"{label}: {exc!r}") from exc
        return b"".join(parts)

    return encode
