"""The Kafka loop against the real broker: exactly-once across kill -9, dead letters, SIGTERM, ALO."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from dataproc_shared.deadletter import decode_dead_letter
from dataproc_shared.records import InRecord

pytestmark = pytest.mark.integration

APP = Path(__file__).with_name("loop_app.py")
KEYS = [f"XNYM:K{i}" for i in range(7)]


def produce_inputs(bootstrap: str, topic: str, values: list[bytes]) -> list[tuple[bytes, bytes]]:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    sent: list[tuple[bytes, bytes]] = []
    for i, value in enumerate(values):
        key = KEYS[i % len(KEYS)].encode()
        producer.produce(topic, value, key)
        sent.append((key, value))
    assert producer.flush(30) == 0
    return sent


def expected_outputs(sent: list[tuple[bytes, bytes]]) -> Counter[tuple[bytes, bytes]]:
    seen: Counter[bytes] = Counter()
    out: Counter[tuple[bytes, bytes]] = Counter()
    for key, value in sent:
        if value in (b"POISON", b"CRASH"):
            continue
        seen[key] += 1
        out[(key, value.upper() + b"|%d" % seen[key])] += 1
    return out


class App:
    """Starts the test service as a subprocess with its own topics and instance id."""

    def __init__(self, bootstrap: str, env: dict[str, str], tmp: Path, name: str = "app") -> None:
        self.env = {**os.environ, "DATA_PROC_KAFKA_BOOTSTRAP": bootstrap, **env}
        self.tmp = tmp
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        with (self.tmp / f"{self.name}-{self.runs}.log").open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(APP)], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self.proc

    def log(self) -> str:
        return "\n".join((self.tmp / f"{self.name}-{i}.log").read_text(errors="replace")[-3000:]
                         for i in range(1, self.runs + 1))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def app_factory(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def make(**env: str) -> App:
        app = App(kafka_bootstrap, env, tmp_path, name=f"app{len(apps)}")
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop_quietly()


def topics(topic_factory: Callable[..., str], partitions: int = 3) -> dict[str, str]:
    return {
        "APP_INPUT": topic_factory("loop-in", partitions),
        "APP_OUTPUT": topic_factory("loop-out", partitions),
        "APP_CHANGELOG": topic_factory("loop-changelog", partitions, {"cleanup.policy": "compact"}),
        "DATA_PROC_TOPICS__DEADLETTER": topic_factory("loop-dlq", 1),
        "DATA_PROC_KAFKA__GROUP_ID": f"loop-group-{time.time_ns()}",
        "DATA_PROC_INSTANCE_ID": f"i{time.time_ns()}",
        "DATA_PROC_LOOP__SESSION_TIMEOUT_MS": "6000",
        "DATA_PROC_AUDIT_ENABLED": "false",
        "DATA_PROC_HTTP__PORT": "0",
    }


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def pairs(records: list[InRecord]) -> Counter[tuple[bytes, bytes]]:
    return Counter((r.key or b"", r.value or b"") for r in records)


def test_exactly_once_survives_kill_9(
    topic_factory: Callable[..., str], app_factory: Callable[..., App], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    env = topics(topic_factory)
    values = [b"v%d" % i for i in range(400)]
    values[57] = b"POISON"
    values[211] = b"CRASH"
    sent = produce_inputs(kafka_bootstrap, env["APP_INPUT"], values)
    expected = expected_outputs(sent)
    app = app_factory(**env, APP_SLEEP_S="0.15", DATA_PROC_LOOP__BATCH_SIZE="15")
    total = sum(expected.values())

    def committed() -> int:
        return len(consume_all([env["APP_OUTPUT"]], timeout=30))

    # Kill points: once a number of outputs is committed (mid-stream), and once shortly after start
    # (during group join / state restore).
    seen_progress: list[int] = []
    for kind, point in (("outputs", 40), ("seconds", 0.8), ("outputs", 130), ("outputs", 210)):
        app.start()
        if kind == "outputs":
            wait_for(lambda point=point: committed() >= point, 90, f"{point} outputs")
        else:
            time.sleep(point)
        app.kill()
        seen_progress.append(committed())
    app.start()
    wait_for(lambda: committed() >= total, 90, "all outputs")
    assert app.terminate() == 0, app.log()

    outputs = consume_all([env["APP_OUTPUT"]], timeout=30)
    assert pairs(outputs) == expected, app.log()
    # Outputs kept the input partition and, per key, the input order (counts 1, 2, 3, ... by offset).
    inputs = consume_all([env["APP_INPUT"]], timeout=30)
    partition_of = {r.key: r.partition for r in inputs}
    assert all(r.partition == partition_of[r.key] for r in outputs)
    for key in partition_of:
        counts = [int((r.value or b"").rsplit(b"|", 1)[1]) for r in sorted(outputs, key=lambda r: r.offset)
                  if r.key == key]
        assert counts == list(range(1, len(counts) + 1))
    dead = [decode_dead_letter(r.value or b"") for r in consume_all([env["DATA_PROC_TOPICS__DEADLETTER"]])]
    assert sorted(d["payload"] for d in dead) == [b"CRASH", b"POISON"]
    assert {d["reason"] for d in dead} == {"bad_field", "processing_error"}
    # The kills really landed mid-stream: some but not all outputs were committed before the last one.
    assert seen_progress[0] >= 40, seen_progress
    assert seen_progress[-1] < total, seen_progress


def test_sigterm_mid_batch_commits_and_restart_adds_nothing(
    topic_factory: Callable[..., str], app_factory: Callable[..., App], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    env = topics(topic_factory, partitions=2)
    sent = produce_inputs(kafka_bootstrap, env["APP_INPUT"], [b"s%d" % i for i in range(200)])
    expected = expected_outputs(sent)
    app = app_factory(**env, APP_SLEEP_S="0.3", DATA_PROC_LOOP__BATCH_SIZE="10")
    app.start()
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) > 0, 60, "first outputs")
    started = time.monotonic()
    assert app.terminate() == 0, app.log()
    assert time.monotonic() - started < 20
    assert "exit=0" in app.log()
    partial = pairs(consume_all([env["APP_OUTPUT"]], timeout=30))
    assert 0 < sum(partial.values()) < sum(expected.values())
    assert not partial - expected  # nothing unexpected, no duplicates

    app.env["APP_SLEEP_S"] = "0"
    app.start()
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) >= sum(expected.values()), 60,
             "all outputs")
    assert app.terminate() == 0, app.log()
    assert pairs(consume_all([env["APP_OUTPUT"]], timeout=30)) == expected


def test_at_least_once_delivers_everything(
    topic_factory: Callable[..., str], app_factory: Callable[..., App], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    env = topics(topic_factory, partitions=2)
    values = [b"a%d" % i for i in range(150)]
    values[10] = b"POISON"
    sent = produce_inputs(kafka_bootstrap, env["APP_INPUT"], values)
    expected = expected_outputs(sent)
    app = app_factory(**env, DATA_PROC_LOOP__GUARANTEE="at-least-once", DATA_PROC_LOOP__BATCH_SIZE="25")
    app.start()
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], read_committed=False, timeout=30))
             >= sum(expected.values()), 60, "all outputs")
    assert app.terminate() == 0, app.log()
    got = pairs(consume_all([env["APP_OUTPUT"]], read_committed=False, timeout=30))
    assert got == expected  # a clean run produces no duplicates either
    dead = consume_all([env["DATA_PROC_TOPICS__DEADLETTER"]], read_committed=False)
    assert [decode_dead_letter(r.value or b"")["payload"] for r in dead] == [b"POISON"]


def test_rebalance_to_a_surviving_instance_restores_state_exactly_once(
    topic_factory: Callable[..., str], app_factory: Callable[..., App], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    env = topics(topic_factory, partitions=4)
    sent = produce_inputs(kafka_bootstrap, env["APP_INPUT"], [b"r%d" % i for i in range(300)])
    expected = expected_outputs(sent)
    common = {**env, "DATA_PROC_LOOP__BATCH_SIZE": "10"}
    # The first instance is slow, so work is left for the second one whatever the machine's load.
    first = app_factory(**{**common, "DATA_PROC_INSTANCE_ID": env["DATA_PROC_INSTANCE_ID"] + "a",
                           "APP_SLEEP_S": "0.6"})
    second = app_factory(**{**common, "DATA_PROC_INSTANCE_ID": env["DATA_PROC_INSTANCE_ID"] + "b",
                            "APP_SLEEP_S": "0.1"})
    first.start()
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) >= 20, 60, "progress")
    second.start()
    wait_for(lambda: "state restored" in second.log(), 60, "the second instance's share")
    first.kill()
    assert len(consume_all([env["APP_OUTPUT"]], timeout=30)) < sum(expected.values())
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) >= sum(expected.values()), 120,
             "all outputs after the rebalance")
    assert second.terminate() == 0, second.log()
    assert pairs(consume_all([env["APP_OUTPUT"]], timeout=30)) == expected, second.log()
    log = second.log()
    assert "partitions revoke" in log
    assert log.count("partitions assign") >= 2
    assert "partitions revoke" in first.log()


def test_of_two_instances_with_one_id_one_exits_non_zero_and_the_other_finishes(
    topic_factory: Callable[..., str], app_factory: Callable[..., App], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    """A second instance with the same instance id (same transactional.id and group.instance.id).

    Each fences the other's producer and static membership; a fenced loop replaces its producer and
    consumer (a fence after a broker restart or a transaction timeout looks the same), so the two
    fence each other until one of them cannot go on and exits non-zero. Which one is a race (seen
    both ways); the guarantee is that one exits, the other finishes the input, and every input is
    in the output exactly once.
    """
    env = topics(topic_factory, partitions=2)
    sent = produce_inputs(kafka_bootstrap, env["APP_INPUT"], [b"f%d" % i for i in range(200)])
    expected = expected_outputs(sent)
    old = app_factory(**env, APP_SLEEP_S="0.4", DATA_PROC_LOOP__BATCH_SIZE="5")
    new = app_factory(**env, APP_SLEEP_S="0.02", DATA_PROC_LOOP__BATCH_SIZE="5")
    old.start()
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) >= 20, 60, "progress")
    new.start()  # same instance id: same transactional.id and group.instance.id
    old_proc, new_proc = old.proc, new.proc
    assert old_proc is not None
    assert new_proc is not None
    wait_for(lambda: old_proc.poll() is not None or new_proc.poll() is not None, 180, "one instance exits")
    loser, winner = (old, new) if old_proc.poll() is not None else (new, old)
    assert loser.proc is not None
    assert loser.proc.returncode != 0, loser.log()
    wait_for(lambda: len(consume_all([env["APP_OUTPUT"]], timeout=30)) >= sum(expected.values()), 120,
             "all outputs")
    assert winner.terminate() == 0, winner.log()
    assert pairs(consume_all([env["APP_OUTPUT"]], timeout=30)) == expected, old.log() + new.log()


def test_at_least_once_loses_nothing_across_kill_9(
    topic_factory: Callable[..., str], app_factory: Callable[..., App], kafka_bootstrap: str,
    consume_all: Callable[..., list[InRecord]],
) -> None:
    env = topics(topic_factory, partitions=2)
    sent = produce_inputs(kafka_bootstrap, env["APP_INPUT"], [b"l%d" % i for i in range(200)])
    wanted = {value.upper() for _, value in sent}

    def delivered() -> set[bytes]:
        records = consume_all([env["APP_OUTPUT"]], read_committed=False, timeout=30)
        return {(r.value or b"").rsplit(b"|", 1)[0] for r in records}

    app = app_factory(**env, DATA_PROC_LOOP__GUARANTEE="at-least-once", DATA_PROC_LOOP__BATCH_SIZE="10",
                      APP_SLEEP_S="0.15")
    app.start()
    wait_for(lambda: len(delivered()) >= 50, 60, "progress")
    app.kill()
    assert len(delivered()) < len(wanted)
    app.start()
    wait_for(lambda: delivered() >= wanted, 90, "every value")
    assert app.terminate() == 0, app.log()
    assert delivered() == wanted
