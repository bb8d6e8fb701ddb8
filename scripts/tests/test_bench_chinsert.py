"""The insert benchmark's command on a tiny run (real embedded engine, no servers)."""

from __future__ import annotations

import json

import pytest
from aggregation.codec import BAR_COLUMNS
from dptools import bench_chinsert


def test_bar_rows_are_rows_of_the_bars_table() -> None:
    rows = bench_chinsert.bar_rows(1_000)
    assert len(rows) == 1_000
    assert {len(r) for r in rows} == {len(BAR_COLUMNS)}
    assert {r[14] for r in rows} <= {0, 1}
    assert all(r[15] >= 1 for r in rows)  # versions


def test_command_reports_each_variant_and_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_chinsert.main(["--rows", "20", "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    variants = [(r["format"], r["parts"]) for r in result["runs"]]
    assert variants == [("JSONEachRow", "full"), ("JSONEachRow", "packed below 1 MiB"),
                        ("Native", "packed below 1 MiB")]
    for run in result["runs"]:
        assert [run[size]["calls"] for size in ("1", "100", "1000")] == [20, 3, 3]
        assert all(run[size]["cpu_ms_per_call"] > 0 for size in ("1", "100", "1000"))
