"""Pure helpers of the drain-benchmark kit, and that every benchmark module imports."""

from __future__ import annotations

import importlib

import pytest
from dptools import benchkit

STATUS = """Name:\tpython
VmPeak:\t  812344 kB
VmSize:\t  800000 kB
VmHWM:\t  409600 kB
VmRSS:\t  307200 kB
Threads:\t12
"""


def test_parse_status_reads_the_memory_lines_in_kib() -> None:
    status = benchkit.parse_status(STATUS)
    assert status == {"VmPeak": 812344, "VmSize": 800000, "VmHWM": 409600, "VmRSS": 307200}


def test_memory_of_this_process_has_a_peak_not_below_the_current_rss() -> None:
    memory = benchkit.memory_mib()
    assert 0 < memory["rss_mib"] <= memory["hwm_mib"]


def test_throughput_takes_means_over_rounds_and_the_relay_to_service_ratio() -> None:
    relay = [benchkit.Drained(1.0, 0.4), benchkit.Drained(3.0, 0.6)]
    service = [benchkit.Drained(4.0, 2.0), benchkit.Drained(4.0, 2.0)]
    figures = benchkit.throughput("svc", 1000, relay, service)
    assert figures["relay_s"] == 2.0
    assert figures["relay_per_s"] == 500
    assert figures["svc_s"] == 4.0
    assert figures["svc_per_s"] == 250
    assert figures["ratio"] == 0.5
    assert figures["rounds"] == 2
    assert figures["svc_runs_s"] == [4.0, 4.0]
    assert figures["relay_cpu_us_per_record"] == 500.0
    assert figures["svc_cpu_us_per_record"] == 2000.0


async def test_alternate_runs_relay_then_service_each_round() -> None:
    calls: list[str] = []

    async def relay(n: int) -> benchkit.Drained:
        calls.append(f"relay{n}")
        return benchkit.Drained(float(n), 0.1)

    async def service(n: int) -> benchkit.Drained:
        calls.append(f"svc{n}")
        return benchkit.Drained(10.0 + n, 1.0)

    relay_runs, service_runs = await benchkit.alternate(2, relay, service)
    assert calls == ["relay0", "svc0", "relay1", "svc1"]
    assert [r.seconds for r in relay_runs] == [0.0, 1.0]
    assert [r.seconds for r in service_runs] == [10.0, 11.0]


@pytest.mark.parametrize("name", ["normalization", "enrichment", "projection", "aggregation"])
def test_each_benchmark_imports_and_has_the_shared_command_line(name: str) -> None:
    module = importlib.import_module(f"dptools.bench_{name}")
    assert callable(module.main)
    parser = benchkit.cli(module.__doc__, default_records=10, default_rounds=1)
    args = parser.parse_args(["--records", "5", "--rounds", "3"])
    assert (args.records, args.rounds, args.partitions, args.out) == (5, 3, None, None)
