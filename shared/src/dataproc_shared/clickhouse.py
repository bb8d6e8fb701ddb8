"""One ClickHouse client interface over two backends: a server (HTTP) or the embedded engine (chDB).

`connect(url)` picks the backend from `DATA_PROC_CLICKHOUSE_URL`:

- `http://...` / `https://...` -> `HttpClickHouse` (clickhouse-connect);
- `chdb://PATH` or a plain folder path -> `ChdbClickHouse` (the engine in-process, data in PATH).

Both run the same SQL. Calls block: async callers wrap them in `asyncio.to_thread`. Both are safe to
share between threads (chDB calls are serialised by a lock; clickhouse-connect's client is
thread-safe for sequential queries per call). chDB locks its folder: only one process may open it.

The embedded engine takes inserts in the `Native` format (`dataproc_shared.chnative`), falling back
to `JSONEachRow` for column types or values that encoder leaves out; both store the same rows.

Inserts take an optional `dedup_token`: a retried insert with the same token into a table with
`non_replicated_deduplication_window` set is dropped by the engine, which makes replays after a crash
idempotent.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import orjson

from dataproc_shared.chnative import BlockEncoder, NativeUnsupportedError
from dataproc_shared.errors import DataProcError


class ClickHouseError(DataProcError):
    """A ClickHouse statement failed (the message carries the engine's error)."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Rows of a query as tuples, with the column names in order."""

    column_names: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by column name."""
        return [dict(zip(self.column_names, row, strict=True)) for row in self.rows]

    def scalar(self) -> Any:
        """The first column of the first row (None when there is no row)."""
        return self.rows[0][0] if self.rows else None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class ClickHouseClient(Protocol):
    """What every ClickHouse backend offers."""

    @property
    def backend(self) -> str:
        """`http` or `chdb`."""
        ...

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns no rows (DDL, INSERT ... SELECT, OPTIMIZE ...)."""
        ...

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> QueryResult:
        """Run a SELECT; `{name:Type}` placeholders are bound from `parameters`."""
        ...

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        dedup_token: str | None = None,
    ) -> int:
        """Insert `rows` (sequences in `column_names` order) into `table`; return the rows sent."""
        ...

    def close(self) -> None:
        """Release the connection or the embedded engine."""
        ...


def connect(url: str, *, username: str = "default", password: str | None = None,
            database: str | None = None, **http_options: Any) -> ClickHouseClient:
    """A client for `url`: a server for `http(s)://`, the embedded engine for a path or `chdb://PATH`."""
    if url.startswith(("http://", "https://")):
        return HttpClickHouse(url, username=username, password=password, database=database, **http_options)
    return ChdbClickHouse(chdb_path(url))


def chdb_path(url: str) -> str:
    """The folder of an embedded-engine URL (`chdb://PATH` or a bare path)."""
    return url[len("chdb://"):] if url.startswith("chdb://") else url


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quote_identifier(name: str) -> str:
    """`db.table` or `column`, checked and back-quoted."""
    if not _IDENT.match(name):
        raise ClickHouseError(f"not a plain identifier: {name!r}")
    return ".".join(f"`{part}`" for part in name.split("."))


def _token_literal(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---- server over HTTP -----------------------------------------------------------------------------


class HttpClickHouse:
    """A ClickHouse server through clickhouse-connect.

    The connection is made on first use, not here: clickhouse-connect asks the server for its
    version when a client is created, so an unreachable server would make construction fail. Each
    call that finds no client tries to create one and raises `ClickHouseError` while the server does
    not answer; the next call tries again. Once created, the client reconnects by itself (each call
    is an HTTP request from a pool), so a server lost and back needs nothing more.
    """

    backend = "http"

    def __init__(self, url: str, *, username: str = "default", password: str | None = None,
                 database: str | None = None, **options: Any) -> None:
        parts = urlsplit(url)
        self._lock = threading.Lock()
        self._client: Any = None
        self._options: dict[str, Any] = dict(
            host=parts.hostname or "localhost",
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            secure=parts.scheme == "https",
            username=unquote(parts.username) if parts.username else username,
            password=unquote(parts.password) if parts.password else (password or ""),
            database=database or (parts.path.strip("/") or None),
            **options,
        )
        #: `host:port` of the server (for messages; never the credentials).
        self.address = f"{self._options['host']}:{self._options['port']}"

    def _connected(self) -> Any:
        """The clickhouse-connect client, created on first use (call with the lock held)."""
        if self._client is None:
            import clickhouse_connect

            self._client = clickhouse_connect.get_client(**self._options)
        return self._client

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns no rows."""
        try:
            with self._lock:
                self._connected().command(sql, parameters=dict(parameters or {}))
        except Exception as exc:
            raise ClickHouseError(str(exc)) from exc

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> QueryResult:
        """Run a SELECT."""
        try:
            with self._lock:
                result = self._connected().query(sql, parameters=dict(parameters or {}))
        except Exception as exc:
            raise ClickHouseError(str(exc)) from exc
        return QueryResult(tuple(result.column_names), tuple(tuple(r) for r in result.result_rows))

    def insert(self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str],
               dedup_token: str | None = None) -> int:
        """Insert rows; `dedup_token` becomes the insert's `insert_deduplication_token`."""
        if not rows:
            return 0
        settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
        database, _, name = table.rpartition(".")
        try:
            with self._lock:
                self._connected().insert(name, [list(r) for r in rows], column_names=list(column_names),
                                    database=database or None, settings=settings)
        except Exception as exc:
            raise ClickHouseError(str(exc)) from exc
        return len(rows)

    def close(self) -> None:
        """Close the HTTP pool (if a client was created)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


# ---- embedded engine (chDB) -----------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"cannot send {type(value).__name__} to ClickHouse")


def _encode_row(columns: Sequence[str], row: Sequence[Any]) -> bytes:
    if len(row) != len(columns):
        raise ClickHouseError(f"row has {len(row)} values for {len(columns)} columns")
    values: dict[str, Any] = {}
    for name, value in zip(columns, row, strict=True):
        if isinstance(value, dt.datetime):
            # Naive datetimes are UTC by the project's convention; send an explicit offset.
            value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
            value = value.isoformat()
        values[name] = value
    return orjson.dumps(values, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


_INT_TYPES = ("Int", "UInt")


def _strip(type_name: str, wrapper: str) -> str | None:
    prefix = wrapper + "("
    if type_name.startswith(prefix) and type_name.endswith(")"):
        return type_name[len(prefix):-1]
    return None


def _convert(type_name: str, value: Any) -> Any:
    """Turn a JSON value of ClickHouse type `type_name` into the Python value clickhouse-connect gives."""
    if value is None:
        return None
    for wrapper in ("Nullable", "LowCardinality"):
        inner = _strip(type_name, wrapper)
        if inner is not None:
            return _convert(inner, value)
    inner = _strip(type_name, "Array")
    if inner is not None:
        return [_convert(inner, v) for v in value]
    if type_name.startswith(_INT_TYPES):
        return int(value)
    if type_name.startswith("Float"):
        return float(value)
    if type_name.startswith("Decimal"):
        return decimal.Decimal(str(value))
    if type_name.startswith("DateTime"):
        parsed = dt.datetime.fromisoformat(str(value))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    if type_name == "Date" or type_name == "Date32":
        return dt.date.fromisoformat(str(value))
    if type_name == "Bool":
        return bool(value)
    return value


class ChdbClickHouse:
    """The ClickHouse engine in this process (chDB), with its data in one folder.

    Only one process can open a folder; within the process, calls are serialised by a lock.
    """

    backend = "chdb"

    def __init__(self, path: str, *, native_inserts: bool = True) -> None:
        """`native_inserts=False` sends every insert as `JSONEachRow` (for comparisons)."""
        from chdb import session

        self.path = path
        self._native_inserts = native_inserts
        self._lock = threading.Lock()
        self._session: Any = session.Session(path)  # type: ignore[no-untyped-call]
        # Native-format encoder per (table, columns); None when the table needs the text format.
        self._encoders: dict[tuple[str, tuple[str, ...]], BlockEncoder | None] = {}
        # Session-wide output settings so JSON values keep their types (64-bit ints as numbers).
        self._run("SET output_format_json_quote_64bit_integers = 0", "CSV")
        self._run("SET output_format_json_quote_decimals = 1", "CSV")

    def _run(self, sql: str, fmt: str, parameters: Mapping[str, Any] | None = None) -> Any:
        try:
            with self._lock:
                if self._session is None:
                    raise ClickHouseError("client is closed")
                if parameters:
                    return self._session.query(sql, fmt, params=dict(parameters))
                return self._session.query(sql, fmt)
        except ClickHouseError:
            raise
        except Exception as exc:
            raise ClickHouseError(str(exc)) from exc

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns no rows."""
        self._run(sql, "CSV", parameters)

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> QueryResult:
        """Run a SELECT; values are converted like clickhouse-connect does (ints, datetimes in UTC)."""
        result = self._run(sql, "JSONCompact", parameters)
        text = result.bytes() if hasattr(result, "bytes") else bytes(result)
        if not text.strip():
            return QueryResult((), ())
        payload = orjson.loads(text)
        meta = payload.get("meta", [])
        names = tuple(str(m["name"]) for m in meta)
        types = [str(m["type"]) for m in meta]
        rows = tuple(
            tuple(_convert(t, v) for t, v in zip(types, row, strict=True)) for row in payload.get("data", [])
        )
        return QueryResult(names, rows)

    def insert(self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str],
               dedup_token: str | None = None) -> int:
        """Insert rows; `dedup_token` becomes `insert_deduplication_token`.

        Rows are sent in the `Native` format (`dataproc_shared.chnative`) when every column type and
        value allows it, else as `JSONEachRow` with `best_effort` datetimes; both store the same rows.
        """
        if not rows:
            return 0
        columns = ", ".join(f"`{c}`" for c in column_names if _COLUMN.match(c) or _bad_column(c))
        target = _quote_identifier(table)
        token = f"insert_deduplication_token = {_token_literal(dedup_token)}" if dedup_token else ""
        block = self._native_block(table, column_names, rows) if self._native_inserts else None
        if block is not None:
            sql = f"INSERT INTO {target} ({columns})" + (f" SETTINGS {token}" if token else "")
            try:
                with self._lock:
                    if self._session is None:
                        raise ClickHouseError("client is closed")
                    inserter = self._session.send_insert(sql, "Native")
                    try:
                        inserter.append(block)
                    except BaseException:
                        inserter.cancel()
                        raise
                    inserter.finish()
            except ClickHouseError:
                raise
            except Exception as exc:
                self._encoders.pop((table, tuple(column_names)), None)
                raise ClickHouseError(str(exc)) from exc
            return len(rows)
        settings = ["date_time_input_format = 'best_effort'", "input_format_skip_unknown_fields = 0"]
        if token:
            settings.append(token)
        body = b"\n".join(_encode_row(column_names, r) for r in rows).decode("utf-8")
        sql = f"INSERT INTO {target} ({columns}) SETTINGS {', '.join(settings)} FORMAT JSONEachRow\n{body}"
        self._run(sql, "CSV")
        return len(rows)

    def _native_block(self, table: str, column_names: Sequence[str],
                      rows: Sequence[Sequence[Any]]) -> bytes | None:
        """`rows` as a `Native` block, or None when a column type or a value needs the text format."""
        key = (table, tuple(column_names))
        encoder: BlockEncoder | None = self._encoders.get(key, _NO_ENCODER)
        if encoder is _NO_ENCODER:
            encoder = self._block_encoder(table, column_names)
        if encoder is None:
            return None
        try:
            return encoder.encode(rows)
        except NativeUnsupportedError:
            return None

    def _block_encoder(self, table: str, column_names: Sequence[str]) -> BlockEncoder | None:
        database, _, name = table.rpartition(".")
        result = self.query(
            "SELECT name, type FROM system.columns WHERE database = "  # noqa: S608 - constant text
            + ("{db:String}" if database else "currentDatabase()") + " AND table = {t:String}",
            {"db": database, "t": name} if database else {"t": name},
        )
        types = {str(n): str(t) for n, t in result.rows}
        if any(c not in types for c in column_names):
            return None  # not cached: the engine reports the missing table or column, or it comes later
        try:
            encoder: BlockEncoder | None = BlockEncoder([(c, types[c]) for c in column_names])
        except NativeUnsupportedError:
            encoder = None
        self._encoders[(table, tuple(column_names))] = encoder
        return encoder

    def close(self) -> None:
        """Close the engine's session (the folder lock is released when the process ends)."""
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None


_NO_ENCODER: Any = object()


def _bad_column(name: str) -> bool:
    raise ClickHouseError(f"not a plain column name: {name!r}")
