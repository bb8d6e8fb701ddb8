"""The `Native` insert encoding against the `JSONEachRow` one, on the real embedded engine (chDB).

Generated rows for the services' tables (bars, late trades, audit events) with extreme values,
unicode and nulls are inserted once through each encoding into two tables of the same definition;
the stored rows must be identical (compared as the engine's own text output, byte for byte).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
from dataproc_shared.audit import AUDIT_COLUMNS
from dataproc_shared.chnative import BlockEncoder, NativeUnsupportedError, column_encoder, encode_block
from dataproc_shared.clickhouse import ChdbClickHouse, ClickHouseError
from dataproc_shared.migrate import clickhouse_values, migrate_clickhouse

BAR_COLUMNS = (
    "instrument_id", "interval", "window_start", "window_end", "venue", "symbol", "currency",
    "open", "high", "low", "close", "volume", "vwap", "trade_count", "is_final", "version",
    "first_trade_ts", "last_trade_ts", "source_partition", "offset_from", "offset_to",
)
LATE_COLUMNS = (
    "instrument_id", "interval", "window_start", "trade_ts", "watermark_ts", "price", "size", "trade_id",
    "source_partition", "source_offset",
)
UTC = dt.UTC
BATCH = "p0:1-3"
TEXTS = ["", "AAPL.XNAS", "日本語", "ü€𝄞😀", "it's \"quoted\" \\ back", "tab\tnew\nline\r", "nul\x00char",
         "x" * 300, "é" * 70, "LOW;DROP TABLE x"]
FLOATS = [0.0, -0.0, 1.5, 0.1 + 0.2, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1e-300,
          123456789.123456789, 1e16, 3.0, -7.25]
DATETIMES = [
    dt.datetime(1970, 1, 1, tzinfo=UTC),
    dt.datetime(1900, 1, 1, tzinfo=UTC),
    dt.datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    dt.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    dt.datetime(1955, 6, 1, 12, 0, 0, 123_456, tzinfo=UTC),
    dt.datetime(2026, 11, 23, 14, 30, 0, 123_456, tzinfo=UTC),
    dt.datetime(2026, 11, 23, 14, 30, 0, 999_999),  # noqa: DTZ001 - naive = UTC
    dt.datetime(2026, 11, 23, 16, 30, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.datetime(2026, 3, 29, 1, 0, 0, 500, tzinfo=dt.timezone(dt.timedelta(hours=-9, minutes=-30))),
    dt.datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=UTC),  # DateTime64(9)'s last microsecond
]
INT32 = [0, 1, -1, 2**31 - 1, -(2**31)]
INT64 = [0, 1, -1, 2**63 - 1, -(2**63), 1_763_900_000_000_000_000]
UINT32 = [0, 1, 2**32 - 1]
UINT64 = [0, 1, 2**63 + 5, 2**64 - 1]


def bar_rows(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    """Bars rows with extreme values in every column."""
    c = rng.choice
    return [(c(TEXTS), c(("1m", "5m", "1h", "é")), c(DATETIMES), c(DATETIMES), c(TEXTS), c(TEXTS), c(TEXTS),
             c(FLOATS), c(FLOATS), c(FLOATS), c(FLOATS), c(FLOATS), c(FLOATS), c(UINT32), c((0, 1, 255)),
             c(UINT64), c(DATETIMES), c(DATETIMES), c(INT32), c(INT64), c(INT64)) for _ in range(n)]


def late_rows(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    """late_trades rows."""
    c = rng.choice
    return [(c(TEXTS), c(("1m", "1h")), c(DATETIMES), c(DATETIMES), c(DATETIMES), c(FLOATS), c(FLOATS),
             c(TEXTS), c(INT32), c(INT64)) for _ in range(n)]


def audit_rows(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    """audit_events rows (event_time 2000..2090: the TTL drops rows outside today - 10 years .. 2106)."""
    c = rng.choice
    times = [d for d in DATETIMES if 2000 < d.year < 2090]
    return [(f"ev-{i}-{c(TEXTS)}", c(times), c(TEXTS), c(TEXTS), c(TEXTS), c(TEXTS), c(TEXTS), c(TEXTS),
             c(INT32), c(INT64), c(INT64), c(TEXTS), c(TEXTS), '{"k": "' + c(TEXTS[:4]) + '"}')
            for i in range(n)]


TABLES: dict[str, tuple[Sequence[str], Any, str]] = {
    "bars": (BAR_COLUMNS, bar_rows, "instrument_id, interval, window_start, version, open, high, volume"),
    "late_trades": (LATE_COLUMNS, late_rows, "instrument_id, interval, source_partition, source_offset, "
                                             "price, trade_ts"),
    "audit_events": (AUDIT_COLUMNS, audit_rows, "event_id"),
}


@pytest.fixture
def client(chdb_path: str):
    c = ChdbClickHouse(chdb_path)
    migrate_clickhouse(c, values=clickhouse_values(audit_ttl_days=3650))
    yield c
    c.close()


def insert_text_format(client: ChdbClickHouse, table: str, rows: Sequence[Sequence[Any]],
                       columns: Sequence[str], token: str) -> None:
    """Insert through the `JSONEachRow` path (the encoder lookup says "not Native")."""
    native = client._native_block
    client._native_block = lambda *_a: None  # type: ignore[method-assign]
    try:
        client.insert(table, rows, columns, dedup_token=token)
    finally:
        client._native_block = native  # type: ignore[method-assign]


def stored(client: ChdbClickHouse, table: str, columns: Sequence[str], order: str) -> str:
    """The table's rows as the engine prints them (TSV), in a fixed order."""
    cols = ", ".join(f"`{c}`" for c in columns)
    rest = ", ".join(f"`{c}`" for c in columns if c not in order.split(", "))
    result = client._run(f"SELECT {cols} FROM {table} ORDER BY {order}, {rest}", "TabSeparated")  # noqa: S608
    return bytes(result.bytes()).decode()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_native_rows_equal_json_rows(client: ChdbClickHouse, name: str) -> None:
    columns, make, order = TABLES[name]
    rows = make(random.Random(7), 400)
    # Plain MergeTree copies of the table: every inserted row stays (no replacing merges).
    for copy in ("native", "json"):
        client.command(f"CREATE TABLE market_data.{name}_{copy} AS market_data.{name} "
                       "ENGINE = MergeTree ORDER BY tuple()")
    # The rows are all plain values: the Native encoder must take them (else the test compares nothing).
    encoder = client._block_encoder(f"market_data.{name}_native", columns)
    assert isinstance(encoder, BlockEncoder)
    assert encoder.encode(rows)
    for i in range(0, len(rows), 100):
        client.insert(f"market_data.{name}_native", rows[i:i + 100], columns, dedup_token=f"n{i}")
        insert_text_format(client, f"market_data.{name}_json", rows[i:i + 100], columns, f"j{i}")
    native = stored(client, f"market_data.{name}_native", columns, order)
    text = stored(client, f"market_data.{name}_json", columns, order)
    assert native.count("\n") == len(rows)
    assert native == text


def test_values_left_to_the_text_format_land_as_before(client: ChdbClickHouse) -> None:
    """None, NaN, infinities, bools, out-of-range datetimes and ints: same rows as the old path."""
    rng = random.Random(3)
    rows = [list(r) for r in bar_rows(rng, 6)]
    rows[0][7] = math.nan
    rows[1][8] = math.inf
    rows[2][4] = None
    rows[3][14] = True
    rows[4][2] = dt.datetime(1850, 1, 1, tzinfo=UTC)
    rows[5][13] = None
    for copy in ("native", "json"):
        client.command(f"CREATE TABLE market_data.bars_{copy} AS market_data.bars "
                       "ENGINE = MergeTree ORDER BY tuple()")
    for i, row in enumerate(rows):
        with pytest.raises(NativeUnsupportedError):
            encode_block([(c, t) for c, t in zip(BAR_COLUMNS, _bar_types(client), strict=True)], [row])
        client.insert("market_data.bars_native", [row], BAR_COLUMNS, dedup_token=f"n{i}")
        insert_text_format(client, "market_data.bars_json", [row], BAR_COLUMNS, f"j{i}")
    order = "instrument_id, window_start, version, open"
    assert stored(client, "market_data.bars_native", BAR_COLUMNS, order) == \
        stored(client, "market_data.bars_json", BAR_COLUMNS, order)
    assert client.query("SELECT count() FROM market_data.bars_native").scalar() == len(rows)
    # Past DateTime64(9)'s range: the engine refuses it, whichever way it is sent.
    row = list(bar_rows(rng, 1)[0])
    row[17] = dt.datetime(2299, 12, 31, tzinfo=UTC)
    with pytest.raises(ClickHouseError, match=r"(?i)overflow"):
        client.insert("market_data.bars_native", [row], BAR_COLUMNS)
    with pytest.raises(ClickHouseError, match=r"(?i)overflow"):
        insert_text_format(client, "market_data.bars_json", [row], BAR_COLUMNS, "j-over")


def _bar_types(client: ChdbClickHouse) -> list[str]:
    result = client.query("SELECT name, type FROM system.columns WHERE database = 'market_data' "
                          "AND table = 'bars'")
    types = dict(result.rows)
    return [str(types[c]) for c in BAR_COLUMNS]


def test_dedup_token_applies_to_native_inserts(client: ChdbClickHouse) -> None:
    rows = [(f"I{i}", *row[1:]) for i, row in enumerate(bar_rows(random.Random(5), 3))]
    client.insert("market_data.bars", rows, BAR_COLUMNS, dedup_token=BATCH)
    client.insert("market_data.bars", rows, BAR_COLUMNS, dedup_token=BATCH)
    assert client.query("SELECT count() FROM market_data.bars").scalar() == 3


def test_unsupported_column_types_fall_back_to_text(client: ChdbClickHouse) -> None:
    client.command("CREATE TABLE market_data.odd (k String, d Decimal(10, 2), a Array(Int32), "
                   "n Nullable(Float64)) ENGINE = MergeTree ORDER BY k")
    assert client._block_encoder("market_data.odd", ["k", "d", "a", "n"]) is None
    client.insert("market_data.odd", [["x", 1.25, [1, 2], None]], ["k", "d", "a", "n"])
    result = client.query("SELECT k, toString(d), a, n FROM market_data.odd")
    assert result.rows == (("x", "1.25", [1, 2], None),)


def test_encoder_shapes() -> None:
    assert column_encoder("LowCardinality(String)")[0] == "String"
    assert column_encoder("DateTime64(9, 'UTC')")[0] == "DateTime64(9, 'UTC')"
    for bad in ("Float32", "Nullable(String)", "DateTime", "Decimal(18, 4)", "Array(String)"):
        with pytest.raises(NativeUnsupportedError):
            column_encoder(bad)
    block = encode_block([("k", "String"), ("v", "UInt8")], [("é" * 100, 7)])
    # columns, rows, then "k" "String" <varint 200> <200 bytes> ...
    assert block[:2] == b"\x02\x01"
    assert b"\xc8\x01" + "é".encode() * 100 in block
    with pytest.raises(NativeUnsupportedError, match="values for"):
        encode_block([("k", "String")], [("a", "b")])
    with pytest.raises(NativeUnsupportedError):
        encode_block([("v", "UInt8")], [(256,)])
    with pytest.raises(NativeUnsupportedError):
        encode_block([("k", "String")], [("\ud800",)])
    assert encode_block([("k", "String")], []) == b"\x01\x00\x01k\x06String"
