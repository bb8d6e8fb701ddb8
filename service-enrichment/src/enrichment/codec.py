"""Avro encoding of the enrichment service, with a splice fast path.

`enriched_tick.v1` is `normalized_tick.v1` with its two leading fields (`venue`, `symbol`) replaced by
nine instrument fields; every tick field after them has the same name, type and order. Avro's binary
encoding of a record is the concatenation of its fields' encodings, so an enriched message is:

    enriched header + encoded instrument fields + the normalized body after `symbol`

The input is still decoded in full (that validates it and gives the tick's fields); only the output
encoding is replaced by a byte splice with the instrument fields encoded once per instrument. The
splice is used only when the message's writer schema is the exact `normalized_tick` version the
splice was checked against at start (`splice_compatible`); any other writer version takes the
plain path (decode with resolution, encode the record). Both paths give identical bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any

from dataproc_shared import avro
from fastavro import parse_schema, schemaless_writer

from enrichment.transform import Instrument, Venue, enriched_value

INPUT_SCHEMA = "normalized_tick"
OUTPUT_SCHEMA = "enriched_tick"
#: Fields of the input that the output replaces by instrument fields, in order.
REPLACED_FIELDS = ("venue", "symbol")
#: Fields of a spliced message that the enrichment reads: the listing to resolve and the event time.
READ_FIELDS = ("venue", "symbol", "ts_ns")
#: Bound of the per-instrument prefix cache (cleared when exceeded).
PREFIX_CACHE_MAX = 100_000
_HEADER_SIZE = avro.HEADER_SIZE


def _without_docs(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_docs(v) for k, v in value.items() if k not in ("doc", "default")}
    if isinstance(value, list):
        return [_without_docs(v) for v in value]
    return value


def splice_compatible(input_source: Mapping[str, Any], output_source: Mapping[str, Any]) -> int | None:
    """Number of output prefix fields when the splice is exact for these two schemas, else `None`.

    Exact means: the input starts with `venue`, `symbol` (strings) and the output ends with the
    input's remaining fields, same names, same types, same order.
    """
    in_fields = list(input_source.get("fields", []))
    out_fields = list(output_source.get("fields", []))
    head = [(f["name"], f["type"]) for f in in_fields[: len(REPLACED_FIELDS)]]
    if head != [(name, "string") for name in REPLACED_FIELDS]:
        return None
    rest = [_without_docs(f) for f in in_fields[len(REPLACED_FIELDS) :]]
    prefix = len(out_fields) - len(rest)
    if prefix <= 0 or [_without_docs(f) for f in out_fields[prefix:]] != rest:
        return None
    return prefix


def _skip_string(data: bytes, pos: int) -> int:
    """Position after the Avro string (zig-zag varint length + bytes) at `pos`."""
    shift = 0
    raw = 0
    while True:
        byte = data[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
    length = (raw >> 1) ^ -(raw & 1)
    if length < 0 or pos + length > len(data):
        raise ValueError("bad string length")
    return pos + length


class TickCodec:
    """Decodes `normalized_tick` messages and encodes `enriched_tick` messages (see the module doc)."""

    def __init__(self, registry: avro.SchemaRegistry | None = None) -> None:
        self._registry = registry or avro.default_registry()
        self._in = self._registry.get(INPUT_SCHEMA)
        self._out = self._registry.get(OUTPUT_SCHEMA)
        self._in_header = self._in.header
        self._out_header = self._out.header
        prefix = splice_compatible(self._in.source, self._out.source)
        self._prefix_names: tuple[str, ...] = ()
        self._prefix_schema: Any = None
        if prefix is not None:
            fields = [_without_docs(f) for f in self._out.source["fields"][:prefix]]
            self._prefix_names = tuple(f["name"] for f in fields)
            self._prefix_schema = parse_schema(
                {
                    "type": "record",
                    "name": "EnrichedPrefix",
                    "namespace": "dataproc.internal",
                    "fields": fields,
                },
                named_schemas={},
            )
        self._prefixes: dict[tuple[int, int], tuple[Instrument, Venue, bytes]] = {}
        self._read: Callable[[bytes], dict[str, Any]] = self.decode
        if self._prefix_schema is not None:
            self._read = self._registry.field_reader(INPUT_SCHEMA, READ_FIELDS)

    @property
    def splices(self) -> bool:
        """Whether the splice fast path is available for the current schema versions."""
        return self._prefix_schema is not None

    def decode(self, raw: bytes) -> dict[str, Any]:
        """Decode a `normalized_tick` message of any known writer version (raises when it does not)."""
        return self._registry.decode(raw, INPUT_SCHEMA)

    def read(self, raw: bytes) -> dict[str, Any]:
        """What `encode` needs of a message: `decode`'s result, or with the splice only `READ_FIELDS`.

        A message that the splice will take is still checked in full (it fails exactly when `decode`
        fails), but only the fields the enrichment reads are built.
        """
        return self._read(raw)

    def encode(self, raw: bytes, tick: Mapping[str, Any], instrument: Instrument, venue: Venue) -> bytes:
        """The `enriched_tick` message for `tick` (`read` or `decode` of `raw`) and its instrument."""
        if self._prefix_schema is not None and raw[:_HEADER_SIZE] == self._in_header:
            venue_text, symbol = tick["venue"], tick["symbol"]
            if len(venue_text) < 64 and len(symbol) < 64 and venue_text.isascii() and symbol.isascii():
                # two ASCII strings shorter than 64 bytes: a one-byte length each, then the bytes
                pos = _HEADER_SIZE + 2 + len(venue_text) + len(symbol)
            else:
                pos = _HEADER_SIZE
                for _ in REPLACED_FIELDS:
                    pos = _skip_string(raw, pos)
            return self._out_header + self._prefix(instrument, venue) + raw[pos:]
        return self._registry.encode(OUTPUT_SCHEMA, enriched_value(tick, instrument, venue))

    def encode_plain(self, tick: Mapping[str, Any], instrument: Instrument, venue: Venue) -> bytes:
        """The same message through the plain path (record encoding), for comparison."""
        return self._registry.encode(OUTPUT_SCHEMA, enriched_value(tick, instrument, venue))

    def _prefix(self, instrument: Instrument, venue: Venue) -> bytes:
        # Keyed by the identity of the two rows (hashing them field by field cost more than the rest of
        # the splice); an entry holds its rows, so their ids stay theirs while it lives. A changed row
        # is a new object: it gets its own entry.
        key = (id(instrument), id(venue))
        found = self._prefixes.get(key)
        if found is not None and found[0] is instrument and found[1] is venue:
            return found[2]
        return self._new_prefix(key, instrument, venue)

    def _new_prefix(self, key: tuple[int, int], instrument: Instrument, venue: Venue) -> bytes:
        if len(self._prefixes) >= PREFIX_CACHE_MAX:
            self._prefixes.clear()
        values = enriched_value({}, instrument, venue)
        buf = BytesIO()
        schemaless_writer(buf, self._prefix_schema, {name: values[name] for name in self._prefix_names})
        prefix = buf.getvalue()
        self._prefixes[key] = (instrument, venue, prefix)
        return prefix
