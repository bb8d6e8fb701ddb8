"""Avro single-object encoding of the message schemas in `dataproc_shared/schemas/`.

Every schema is a file `<name>.v<N>.avsc`. A message is `C3 01`, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form, then the Avro binary body. A reader
looks the writer schema up by fingerprint among every known version and resolves it to the reader
schema it asks for (by default the newest version of that name), so old data stays readable.

Logical types (`timestamp-millis`) are written into the `.avsc` files for other consumers, but this
codec works on the underlying primitives: a `timestamp-millis` field is an `int` of milliseconds here,
like every `*_ns` field is an `int` of nanoseconds.

Compatibility rules for new versions are checked by `check_compatibility` (structural Avro
resolution rules plus a round trip of generated records) and `check_schema_evolution` (every
version of every schema reads all older versions; used by the test suite, hence by CI).
"""

from __future__ import annotations

import copy
import json
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint as _fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.utils import generate_many

from dataproc_shared.avro_flat import FlatCodec, compile_flat, compile_flat_reader
from dataproc_shared.errors import AvroError

SCHEMAS_DIR = Path(__file__).parent / "schemas"
MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
_FILE_NAME = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)\.v(?P<version>\d+)\.avsc$")


class UnknownSchemaError(AvroError):
    """No schema of that name (or version) is known."""


class UnknownFingerprintError(AvroError):
    """A message names a writer schema (fingerprint) that no known schema has."""


class BadMarkerError(AvroError):
    """The bytes are not an Avro single-object encoded message (wrong marker or too short)."""


class DecodeError(AvroError):
    """The body does not decode with its writer schema (truncated or corrupt)."""


class EncodeError(AvroError):
    """A record does not fit its schema."""


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One `.avsc` file: its parsed schema, canonical form and fingerprint."""

    name: str
    version: int
    full_name: str
    source: dict[str, Any]
    parsed: Any
    canonical: str
    fingerprint: bytes

    @property
    def header(self) -> bytes:
        """The 10 bytes every message of this schema starts with."""
        return MARKER + self.fingerprint


def fingerprint_of(schema: Mapping[str, Any] | str) -> bytes:
    """CRC-64-AVRO fingerprint of a schema's canonical form, as the 8 little-endian bytes."""
    return bytes.fromhex(_fingerprint(to_parsing_canonical_form(_strip_logical(schema)), "CRC-64-AVRO"))


def _strip_logical(schema: Any) -> Any:
    """Copy of a schema without `logicalType` annotations (the codec works on the primitives)."""
    if isinstance(schema, dict):
        return {k: _strip_logical(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_strip_logical(s) for s in schema]
    return schema


def _load_version(name: str, version: int, source: dict[str, Any]) -> SchemaVersion:
    plain = _strip_logical(copy.deepcopy(source))
    parsed = parse_schema(plain, named_schemas={})
    canonical = to_parsing_canonical_form(plain)
    namespace = source.get("namespace")
    full_name = f"{namespace}.{source['name']}" if namespace else str(source["name"])
    return SchemaVersion(
        name=name,
        version=version,
        full_name=full_name,
        source=source,
        parsed=parsed,
        canonical=canonical,
        fingerprint=bytes.fromhex(_fingerprint(canonical, "CRC-64-AVRO")),
    )


class SchemaRegistry:
    """The known schemas (all versions), indexed by name and by fingerprint."""

    def __init__(self, versions: Iterable[SchemaVersion]) -> None:
        self._by_name: dict[str, dict[int, SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for v in versions:
            self._by_name.setdefault(v.name, {})[v.version] = v
            other = self._by_fingerprint.get(v.fingerprint)
            if other is not None and other.canonical != v.canonical:  # pragma: no cover - 2^-64
                raise AvroError(f"fingerprint collision between {other.name} and {v.name}")
            self._by_fingerprint.setdefault(v.fingerprint, v)
        self._latest = {name: by_version[max(by_version)] for name, by_version in self._by_name.items()}
        # Generated codecs of the flat record schemas (all message schemas): about twice as fast as
        # fastavro's generic reader/writer; other schemas, and reading across versions, use fastavro.
        self._flat: dict[bytes, FlatCodec] = {}
        for v in self._by_fingerprint.values():
            codec = compile_flat(_strip_logical(v.source))
            if codec is not None:
                self._flat[v.fingerprint] = codec
        # The common case of `decode`: a message written with the newest version of the schema asked
        # for, recognised by its 10-byte header alone (no fingerprint lookup, no resolution).
        self._newest_flat: dict[str, tuple[bytes, SchemaVersion, FlatCodec]] = {
            name: (v.header, v, self._flat[v.fingerprint])
            for name, v in self._latest.items() if v.fingerprint in self._flat
        }

    @classmethod
    def from_directory(cls, directory: Path = SCHEMAS_DIR) -> SchemaRegistry:
        """Load every `<name>.v<N>.avsc` file of `directory`."""
        versions = []
        for path in sorted(directory.glob("*.avsc")):
            match = _FILE_NAME.match(path.name)
            if match is None:
                raise AvroError(f"{path.name}: schema files are named <name>.v<N>.avsc")
            source = json.loads(path.read_text(encoding="utf-8"))
            versions.append(_load_version(match["name"], int(match["version"]), source))
        return cls(versions)

    @property
    def names(self) -> list[str]:
        """Names of the known schemas (file names without the version)."""
        return sorted(self._by_name)

    def versions(self, name: str) -> list[SchemaVersion]:
        """Every version of `name`, oldest first."""
        by_version = self._by_name.get(name)
        if by_version is None:
            raise UnknownSchemaError(f"unknown schema {name!r}; known: {', '.join(self.names)}")
        return [by_version[k] for k in sorted(by_version)]

    def get(self, name: str, version: int | None = None) -> SchemaVersion:
        """Version `version` of `name`, or its newest version. `name` may also be `<name>.v<N>`."""
        if version is None and ".v" in name:
            base, _, number = name.rpartition(".v")
            if number.isdigit():
                name, version = base, int(number)
        if version is None:
            latest = self._latest.get(name)
            if latest is None:
                raise UnknownSchemaError(f"unknown schema {name!r}; known: {', '.join(self.names)}")
            return latest
        found = self._by_name.get(name, {}).get(version)
        if found is None:
            raise UnknownSchemaError(f"unknown schema {name!r} version {version}")
        return found

    def by_fingerprint(self, fp: bytes) -> SchemaVersion:
        """The writer schema with fingerprint `fp`."""
        found = self._by_fingerprint.get(fp)
        if found is None:
            raise UnknownFingerprintError(f"unknown writer schema fingerprint {fp.hex()}")
        return found

    def encode(self, schema_name: str, record: Mapping[str, Any]) -> bytes:
        """Single-object encoding of `record` with (the newest version of) `schema_name`."""
        schema = self.get(schema_name)
        flat = self._flat.get(schema.fingerprint)
        if flat is not None:
            try:
                return schema.header + flat.encode(record)
            except (ValueError, TypeError, KeyError, AttributeError, struct.error) as exc:
                raise EncodeError(f"{schema.name}.v{schema.version}: {exc!r}") from exc
        buf = BytesIO()
        buf.write(MARKER)
        buf.write(schema.fingerprint)
        try:
            schemaless_writer(buf, schema.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise EncodeError(f"{schema.name}.v{schema.version}: {exc}") from exc
        return buf.getvalue()

    def field_reader(self, schema_name: str, fields: Iterable[str]) -> Callable[[bytes], dict[str, Any]]:
        """A decoder of `schema_name` messages that returns (at least) `fields`.

        A message written with the newest version of the schema is checked in full, so it is accepted
        or refused exactly as by `decode`, but only `fields` are built; a message of any other writer
        version is decoded in full by `decode`. Errors are `decode`'s.
        """
        schema = self.get(schema_name)
        wanted = tuple(fields)
        known = {str(f["name"]) for f in schema.source.get("fields", [])}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise UnknownSchemaError(f"{schema.name}.v{schema.version} has no field {', '.join(missing)}")
        full = self.decode
        flat = None
        if schema.fingerprint in self._flat:
            flat = compile_flat_reader(_strip_logical(schema.source), wanted)
        if flat is None:
            return lambda data: full(data, schema_name)
        header = schema.header
        label = f"{schema.name}.v{schema.version}"

        def read(data: bytes) -> dict[str, Any]:
            if data[:HEADER_SIZE] != header:
                return full(data, schema_name)
            try:
                return flat(data if type(data) is bytes else bytes(data), HEADER_SIZE)
            except (ValueError, IndexError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
                raise DecodeError(f"cannot decode {label} as {label}: {exc!r}") from exc

        return read

    def writer_of(self, data: bytes) -> SchemaVersion:
        """The writer schema named by a message's header."""
        if len(data) < HEADER_SIZE or data[:2] != MARKER:
            raise BadMarkerError(
                f"not an Avro single-object message (starts {bytes(data[:2]).hex() or 'empty'}, "
                f"length {len(data)})"
            )
        return self.by_fingerprint(bytes(data[2:HEADER_SIZE]))

    def decode(self, data: bytes, reader_schema_name: str) -> dict[str, Any]:
        """Decode a single-object message written with any known version, as `reader_schema_name`."""
        newest = self._newest_flat.get(reader_schema_name)
        if newest is not None and data[:HEADER_SIZE] == newest[0]:
            try:
                return newest[2].decode(data if type(data) is bytes else bytes(data), HEADER_SIZE)
            except (ValueError, IndexError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
                schema = newest[1]
                raise DecodeError(
                    f"cannot decode {schema.name}.v{schema.version} as {schema.name}.v{schema.version}: "
                    f"{exc!r}"
                ) from exc
        writer = self.writer_of(data)
        reader = self.get(reader_schema_name)
        flat = self._flat.get(writer.fingerprint) if writer is reader else None
        if flat is not None:
            try:
                return flat.decode(bytes(data), HEADER_SIZE)
            except (ValueError, IndexError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
                raise DecodeError(
                    f"cannot decode {writer.name}.v{writer.version} as {reader.name}.v{reader.version}: "
                    f"{exc!r}"
                ) from exc
        body = BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            if writer is reader:
                out = schemaless_reader(body, writer.parsed, None)
            else:
                out = schemaless_reader(body, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, SchemaResolutionError...
            raise DecodeError(
                f"cannot decode {writer.name}.v{writer.version} as {reader.name}.v{reader.version}: {exc!r}"
            ) from exc
        if not isinstance(out, dict):  # pragma: no cover - every message schema is a record
            raise DecodeError(f"{reader.name} is not a record schema")
        return out


@lru_cache(maxsize=1)
def default_registry() -> SchemaRegistry:
    """The schemas shipped in `dataproc_shared/schemas/` (loaded once)."""
    return SchemaRegistry.from_directory(SCHEMAS_DIR)


def encode(schema_name: str, record: Mapping[str, Any]) -> bytes:
    """Encode `record` with the newest version of `schema_name` (single-object encoding)."""
    return default_registry().encode(schema_name, record)


def decode(data: bytes, reader_schema_name: str) -> dict[str, Any]:
    """Decode a message of any known writer version into the newest version of `reader_schema_name`."""
    return default_registry().decode(data, reader_schema_name)


# ---- schema evolution ---------------------------------------------------------------------------------

_PROMOTIONS: dict[str, set[str]] = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    return str(schema["type"])


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _resolve(writer: Any, reader: Any, path: str, named: tuple[dict[str, Any], dict[str, Any]]) -> list[str]:
    """Problems reading data of `writer` with `reader` (Avro schema resolution rules)."""
    w_named, r_named = named
    if isinstance(writer, str) and writer not in _PRIMITIVES:
        writer = w_named.get(writer, w_named.get(_short(writer), writer))
    if isinstance(reader, str) and reader not in _PRIMITIVES:
        reader = r_named.get(reader, r_named.get(_short(reader), reader))
    wt, rt = _type_name(writer), _type_name(reader)

    if wt == "union":
        problems: list[str] = []
        for i, branch in enumerate(writer):
            problems += _resolve(branch, reader, f"{path}<branch {i}>", named)
        return problems
    if rt == "union":
        for branch in reader:
            if not _resolve(writer, branch, path, named):
                return []
        return [f"{path}: writer type {wt} matches no branch of the reader union"]
    if wt in _PRIMITIVES or rt in _PRIMITIVES:
        if rt == wt or rt in _PROMOTIONS.get(wt, set()):
            return []
        return [f"{path}: writer {wt} cannot be read as {rt}"]
    if wt != rt:
        return [f"{path}: writer {wt} cannot be read as {rt}"]

    if rt in ("record", "enum", "fixed"):
        w_named[writer["name"]] = writer
        r_named[reader["name"]] = reader
        reader_names = {_short(reader["name"]), *(_short(a) for a in reader.get("aliases", []))}
        if _short(writer["name"]) not in reader_names:
            return [f"{path}: writer {rt} {writer['name']} is not reader {reader['name']} (nor an alias)"]
    if rt == "record":
        problems = []
        w_fields = {f["name"]: f for f in writer["fields"]}
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            source = next((w_fields[n] for n in names if n in w_fields), None)
            fpath = f"{path}.{field['name']}"
            if source is None:
                if "default" not in field:
                    problems.append(f"{fpath}: new field without a default")
            else:
                problems += _resolve(source["type"], field["type"], fpath, named)
        return problems
    if rt == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        if missing and "default" not in reader:
            return [f"{path}: enum symbols {sorted(missing)} removed without a reader default"]
        return []
    if rt == "fixed":
        return [] if writer["size"] == reader["size"] else [f"{path}: fixed size changed"]
    if rt == "array":
        return _resolve(writer["items"], reader["items"], f"{path}[]", named)
    if rt == "map":
        return _resolve(writer["values"], reader["values"], f"{path}{{}}", named)
    return [f"{path}: unsupported schema type {rt}"]  # pragma: no cover


def check_compatibility(reader: Mapping[str, Any], writer: Mapping[str, Any], samples: int = 50) -> list[str]:
    """Problems that stop `reader` from reading data written with `writer` (empty list: compatible).

    Checks the Avro resolution rules structurally, then round-trips `samples` generated records.
    """
    r, w = _strip_logical(dict(reader)), _strip_logical(dict(writer))
    name = str(reader.get("name", "schema"))
    problems = _resolve(w, r, name, ({}, {}))
    if problems:
        return problems
    w_parsed = parse_schema(w, named_schemas={})
    r_parsed = parse_schema(r, named_schemas={})
    for record in generate_many(w_parsed, samples):
        buf = BytesIO()
        schemaless_writer(buf, w_parsed, record)
        buf.seek(0)
        try:
            schemaless_reader(buf, w_parsed, r_parsed)
        except Exception as exc:  # a resolution failure of any kind is the finding
            return [f"{name}: generated record does not resolve: {exc!r}"]
    return []


def check_schema_evolution(registry: SchemaRegistry | None = None) -> list[str]:
    """Every version of every schema must read every older version of it (backward compatibility)."""
    registry = registry or default_registry()
    problems: list[str] = []
    for name in registry.names:
        versions = registry.versions(name)
        for i, newer in enumerate(versions):
            for older in versions[:i]:
                for p in check_compatibility(newer.source, older.source):
                    problems.append(f"{name}.v{newer.version} cannot read v{older.version}: {p}")
    return problems
