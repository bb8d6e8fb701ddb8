"""The common part of the drain-mode benchmarks (`dptools.bench_*`): a service's processor next to the relay.

A benchmark creates uuid-named topics (`bench_topics`), pre-produces a backlog (`produce`), then drains
it with the real `KafkaLoop` under the configured guarantee, once with the plain relay
(`dataproc_shared.kafka.passthrough.PassthroughProcessor`) and once with the service's processor, each
time with a fresh consumer group (`drain`, `alternate`). `throughput` turns the timings into the
report's figures, `machine` adds the facts of the host, `cli`/`emit` give every benchmark the same
command line and JSON output. A service's benchmark keeps only how it builds its backlog and its
processor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from dataproc_shared.config import Settings, admin_config
from dataproc_shared.kafka.loop import KafkaLoop
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics

S = TypeVar("S", bound=Settings)

#: A drain that does not finish within this many seconds fails.
DRAIN_TIMEOUT_S = 1800.0



@dataclass(frozen=True, slots=True)
class Drained:
    """One drain: its wall seconds and the CPU seconds of this process, both from the first record.

    CPU covers all threads of the process: the loop, librdkafka, the processor.
    """

    seconds: float
    cpu_s: float


def run_id() -> str:
    """A short random id naming the run's topics, consumer groups and other resources."""
    return uuid.uuid4().hex[:8]


@contextmanager
def bench_topics(
    settings: Settings,
    topics: Mapping[str, str],
    partitions: int,
    *,
    single: Collection[str] = ("deadletter",),
    compacted: Collection[str] = (),
) -> Iterator[AdminClient]:
    """Create `topics` (role -> name) for the block and delete them after it; yields the admin client.

    Roles in `single` get one partition, the others `partitions`; roles in `compacted` are compacted.
    """
    admin = AdminClient(admin_config(settings))
    new = [
        NewTopic(
            name,
            num_partitions=1 if role in single else partitions,
            replication_factor=1,
            config={"cleanup.policy": "compact"} if role in compacted else {},
        )
        for role, name in topics.items()
    ]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result()
    try:
        yield admin
    finally:
        delete_topics(admin, topics.values())


def delete_topics(admin: AdminClient, topics: Iterable[str]) -> None:
    """Delete `topics` and wait for the broker's answers (a client dropped before them sends nothing).

    A topic that cannot be deleted is reported on stderr; the others are still deleted.
    """
    names = list(topics)
    if not names:
        return
    for name, future in admin.delete_topics(names, operation_timeout=30).items():
        try:
            future.result()
        except Exception as exc:
            print(f"could not delete topic {name}: {exc}", file=sys.stderr)


def produce(bootstrap: str, records: Iterable[tuple[str, bytes, bytes]], partition_of: Callable[[bytes], int]
            ) -> float:
    """Produce (topic, key, value) `records` to partition `partition_of(key)`; return the seconds it took."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "enable.idempotence": True,
        }
    )
    started = time.perf_counter()
    for topic, key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition_of(key))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("backlog not fully delivered")
    return time.perf_counter() - started


def bench_settings(base: S, service: str, group: str, topics: Mapping[str, Any], **fields: Any) -> S:
    """`base` for one drain: service name, topic overrides, consumer group and instance id `group`."""
    return base.model_copy(
        update={
            "service": service,
            "topics": base.topics.model_copy(update=dict(topics)),
            "kafka": base.kafka.model_copy(update={"group_id": f"bench-{service}-{group}"}),
            "instance_id": f"bench-{group}",
            **fields,
        }
    )


def consumed(metrics: ServiceMetrics, service: str, topics: Iterable[str]) -> float:
    """Records the loop has consumed from `topics` (`dp_messages_in_total`)."""
    return sum(
        metrics.registry.get_sample_value("dp_messages_in_total", {"service": service, "topic": t}) or 0.0
        for t in topics
    )


async def drain(
    settings: Settings,
    processor: Any,
    metrics: ServiceMetrics,
    count: int,
    input_topics: list[str],
    *,
    until_stopped: bool = False,
    sample: Callable[[], None] | None = None,
) -> Drained:
    """Run the real loop until `count` records were consumed; its seconds and CPU from the first.

    The time runs to the poll that saw the last record consumed, or with `until_stopped` to the
    loop's return (the last cycle, its flush and its commit included). `sample` is called at each
    poll (every 20 ms), e.g. to read the processor's state while it runs.
    """
    loop = KafkaLoop(settings, processor, input_topics=input_topics, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    first: float | None = None
    first_cpu = time.process_time()
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        seen = consumed(metrics, settings.service, input_topics)
        now = time.perf_counter()
        if sample is not None:
            sample()
        if seen and first is None:
            first = now
            first_cpu = time.process_time()
        if seen >= count:
            break
        if task.done():
            task.result()
            raise RuntimeError("the loop stopped early")
        if time.monotonic() > deadline:
            raise TimeoutError(f"drained {seen:.0f} of {count}")
        await asyncio.sleep(0.02)
    cpu_now = time.process_time()
    stop.set()
    await task
    end = time.perf_counter() if until_stopped else now
    cpu_end = time.process_time() if until_stopped else cpu_now
    return Drained(seconds=end - (first or now), cpu_s=cpu_end - first_cpu)


async def relay_drain(settings: Settings, output_topic: str, count: int, input_topics: list[str],
                      *, until_stopped: bool = False) -> Drained:
    """`drain` with the plain relay (same bytes to `output_topic`, same partition)."""
    return await drain(settings, PassthroughProcessor(output_topic), ServiceMetrics(settings.service), count,
                       input_topics, until_stopped=until_stopped)


async def alternate(rounds: int, relay: Callable[[int], Awaitable[Drained]],
                    service: Callable[[int], Awaitable[Drained]]) -> tuple[list[Drained], list[Drained]]:
    """Run relay then service `rounds` times (given the round number); their drains per round.

    Alternating lets load from other processes on a shared machine hit both alike.
    """
    relay_runs: list[Drained] = []
    service_runs: list[Drained] = []
    for round_no in range(rounds):
        relay_runs.append(await relay(round_no))
        service_runs.append(await service(round_no))
    return relay_runs, service_runs


def setup(settings: Settings, count: int, partitions: int, produce_s: float) -> dict[str, Any]:
    """Figures that describe the run: backlog size, partitions, the loop's guarantee and batch size."""
    return {
        "records": count,
        "partitions": partitions,
        "guarantee": settings.loop.guarantee,
        "batch_size": settings.loop.batch_size,
        "produce_s": round(produce_s, 2),
    }


def throughput(name: str, count: int, relay_runs: Sequence[Drained],
               service_runs: Sequence[Drained]) -> dict[str, Any]:
    """Figures of the drains: mean seconds and records/s of relay and `name`, ratio, per-round seconds.

    Also the CPU µs per record of each (this process, all its threads: the figure to compare between
    versions on a loaded machine).
    """
    relay_s = sum(r.seconds for r in relay_runs) / len(relay_runs)
    service_s = sum(r.seconds for r in service_runs) / len(service_runs)
    relay_cpu_s = sum(r.cpu_s for r in relay_runs) / len(relay_runs)
    service_cpu_s = sum(r.cpu_s for r in service_runs) / len(service_runs)
    return {
        "relay_cpu_us_per_record": round(relay_cpu_s / count * 1e6, 1),
        f"{name}_cpu_us_per_record": round(service_cpu_s / count * 1e6, 1),
        "relay_s": round(relay_s, 2),
        "relay_per_s": round(count / relay_s),
        f"{name}_s": round(service_s, 2),
        f"{name}_per_s": round(count / service_s),
        "ratio": round(relay_s / service_s, 3),
        "rounds": len(service_runs),
        "relay_runs_s": [round(r.seconds, 2) for r in relay_runs],
        f"{name}_runs_s": [round(r.seconds, 2) for r in service_runs],
    }


def counter_totals(metrics: ServiceMetrics, family: str, labels: tuple[str, ...]) -> dict[str, float]:
    """Non-zero `_total` samples of counter `family`, keyed by their `labels` values joined with `/`."""
    out: dict[str, float] = {}
    for metric in metrics.registry.collect():
        if metric.name == family:
            for s in metric.samples:
                if s.name.endswith("_total") and s.value:
                    out["/".join(s.labels[label] for label in labels)] = s.value
    return out


def machine() -> dict[str, Any]:
    """Facts of the host the figures were measured on."""
    return {
        "machine": f"{platform.machine()} {platform.system()} {platform.python_version()} "
        f"{os.cpu_count()} cpus",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def parse_status(text: str) -> dict[str, int]:
    """The memory lines (`VmRSS`, `VmHWM`, ...) of a `/proc/<pid>/status` text, in KiB."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name.startswith("Vm") and len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
            out[name] = int(fields[0])
    return out


def memory_mib() -> dict[str, float]:
    """Resident set of this process now (`rss_mib`) and at its peak (`hwm_mib`), from /proc/self/status."""
    status = parse_status(Path("/proc/self/status").read_text())
    return {"rss_mib": round(status["VmRSS"] / 1024, 1), "hwm_mib": round(status["VmHWM"] / 1024, 1)}


def cli(doc: str | None, default_records: int, default_rounds: int) -> argparse.ArgumentParser:
    """The command line every benchmark shares: `--records`, `--partitions`, `--rounds`, `--out`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=default_records)
    parser.add_argument("--partitions", type=int, default=None, help="default: topics.partitions")
    parser.add_argument("--rounds", type=int, default=default_rounds,
                        help="relay/service pairs, alternating")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    return parser


def emit(result: Mapping[str, Any], out: Path | None = None) -> None:
    """Print the JSON report (and write it to `out`)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
