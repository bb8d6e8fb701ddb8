"""The ClickHouse client on the real embedded engine (chDB) in a per-test folder."""

from __future__ import annotations

import datetime as dt
import socket
from decimal import Decimal

import pytest
from dataproc_shared.clickhouse import (
    ChdbClickHouse,
    ClickHouseError,
    HttpClickHouse,
    QueryResult,
    chdb_path,
    connect,
)

TABLE = """
CREATE TABLE t.bars (k String, ts DateTime64(3, 'UTC'), v Float64, version UInt64)
ENGINE = ReplacingMergeTree(version) ORDER BY k
SETTINGS non_replicated_deduplication_window = 100
"""
COLUMNS = ["k", "ts", "v", "version"]
BATCH_A = "p0:100-200"
BATCH_B = "p0:201-300"
T0 = dt.datetime(2026, 11, 23, 14, 30, 0, 123000, tzinfo=dt.UTC)


@pytest.fixture
def client(chdb_path: str):
    c = connect(f"chdb://{chdb_path}")
    c.command("CREATE DATABASE t")
    c.command(TABLE)
    yield c
    c.close()


def test_url_picks_backend(chdb_path: str) -> None:
    c = connect(chdb_path)
    try:
        assert isinstance(c, ChdbClickHouse)
        assert c.backend == "chdb"
    finally:
        c.close()


def test_chdb_path_forms() -> None:
    assert chdb_path("chdb:///var/lib/ch") == "/var/lib/ch"
    assert chdb_path(".stack/chdb") == ".stack/chdb"


def test_insert_and_query_keep_types(client: ChdbClickHouse) -> None:
    assert client.insert("t.bars", [["a", T0, 1.5, 2**63 + 5]], COLUMNS) == 1
    result = client.query("SELECT k, ts, v, version FROM t.bars")
    assert result.column_names == ("k", "ts", "v", "version")
    assert result.rows == (("a", T0, 1.5, 2**63 + 5),)
    assert result.dicts() == [{"k": "a", "ts": T0, "v": 1.5, "version": 2**63 + 5}]


def test_naive_datetimes_are_utc(client: ChdbClickHouse) -> None:
    client.insert("t.bars", [["a", T0.replace(tzinfo=None), 1.0, 1]], COLUMNS)
    assert client.query("SELECT ts FROM t.bars").scalar() == T0


def test_replacing_merge_tree_final_keeps_highest_version(client: ChdbClickHouse) -> None:
    client.insert("t.bars", [["a", T0, 1.0, 1], ["b", T0, 5.0, 1]], COLUMNS)
    client.insert("t.bars", [["a", T0, 3.0, 3]], COLUMNS)
    client.insert("t.bars", [["a", T0, 2.0, 2]], COLUMNS)
    assert client.query("SELECT count() FROM t.bars").scalar() == 4
    rows = client.query("SELECT k, v, version FROM t.bars FINAL ORDER BY k").rows
    assert rows == (("a", 3.0, 3), ("b", 5.0, 1))


def test_dedup_token_drops_a_retried_insert(client: ChdbClickHouse) -> None:
    rows = [["a", T0, 1.0, 1], ["b", T0, 2.0, 1]]
    client.insert("t.bars", rows, COLUMNS, dedup_token=BATCH_A)
    client.insert("t.bars", rows, COLUMNS, dedup_token=BATCH_A)
    assert client.query("SELECT count() FROM t.bars").scalar() == 2
    # Same rows, another token: a distinct insert, kept.
    client.insert("t.bars", rows, COLUMNS, dedup_token=BATCH_B)
    assert client.query("SELECT count() FROM t.bars").scalar() == 4


def test_parameters_are_bound(client: ChdbClickHouse) -> None:
    client.insert("t.bars", [["it's", T0, 1.0, 1], ["b", T0, 2.0, 1]], COLUMNS)
    result = client.query("SELECT v FROM t.bars WHERE k = {k:String}", {"k": "it's"})
    assert result.rows == ((1.0,),)


def test_query_converts_common_types(client: ChdbClickHouse) -> None:
    result = client.query(
        "SELECT toDecimal64(1.25, 4) AS d, [1, 2] AS a, CAST(NULL AS Nullable(Int32)) AS n, "
        "toDate('2026-11-23') AS day, true AS flag"
    )
    assert result.dicts() == [{"d": Decimal("1.25"), "a": [1, 2], "n": None,
                               "day": dt.date(2026, 11, 23), "flag": True}]


def test_empty_result(client: ChdbClickHouse) -> None:
    result = client.query("SELECT k FROM t.bars")
    assert isinstance(result, QueryResult)
    assert len(result) == 0
    assert result.scalar() is None


def test_errors_are_clickhouse_errors(client: ChdbClickHouse) -> None:
    with pytest.raises(ClickHouseError, match=r"(?i)unknown table|doesn't exist|does not exist"):
        client.query("SELECT * FROM t.missing")
    with pytest.raises(ClickHouseError, match="plain column"):
        client.insert("t.bars", [["a"]], ["k; DROP TABLE t.bars"])
    with pytest.raises(ClickHouseError, match="plain identifier"):
        client.insert("t.bars; DROP", [["a"]], ["k"])


def test_closed_client_refuses(chdb_path: str) -> None:
    c = connect(chdb_path)
    c.close()
    with pytest.raises(ClickHouseError, match="closed"):
        c.query("SELECT 1")


async def test_async_callers_use_a_thread(client: ChdbClickHouse) -> None:
    import asyncio

    await asyncio.to_thread(client.insert, "t.bars", [["a", T0, 1.0, 1]], COLUMNS)
    results = await asyncio.gather(*(asyncio.to_thread(client.query, "SELECT count() FROM t.bars")
                                     for _ in range(4)))
    assert [r.scalar() for r in results] == [1, 1, 1, 1]


def test_a_server_client_connects_on_first_use_and_retries_every_call() -> None:
    """An unreachable server does not fail construction; each call fails naming the server, retried."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: connections to it are refused
    c = connect(f"http://127.0.0.1:{port}", password="s3cret-pw")  # noqa: S106 - a test value
    assert isinstance(c, HttpClickHouse)
    assert c.backend == "http"
    assert c.address == f"127.0.0.1:{port}"
    for _ in range(2):
        with pytest.raises(ClickHouseError) as err:
            c.query("SELECT 1")
        assert str(port) in str(err.value)
        assert "s3cret-pw" not in str(err.value)
    c.close()
