"""Pure parts of the Kafka loop: error classes, batches, header propagation, call deadlines (no broker)."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from dataproc_shared.config import load_settings
from dataproc_shared.kafka import loop as loop_module
from dataproc_shared.kafka.loop import KafkaLoop, classify
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import CORRELATION_HEADER, INGEST_TIME_HEADER, InRecord, OutRecord


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KafkaError(KafkaError._TIMED_OUT, retriable=True), "retriable"),
        (KafkaError(KafkaError.CONCURRENT_TRANSACTIONS, retriable=True, txn_requires_abort=True),
         "abortable"),
        (KafkaError(KafkaError._STATE, txn_requires_abort=True), "abortable"),
        (KafkaError(KafkaError._FENCED), "fatal"),
        (KafkaError(KafkaError.PRODUCER_FENCED), "fatal"),
        (KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, retriable=True), "fatal"),
        (KafkaError(KafkaError._FATAL, fatal=True), "fatal"),
        (KafkaError(KafkaError.UNKNOWN), "abortable"),
    ],
)
def test_error_classes(error: KafkaError, expected: str) -> None:
    assert classify(error) == expected


def rec(offset: int, key: bytes, headers: tuple[tuple[str, bytes], ...] = ()) -> InRecord:
    return InRecord(topic="in", partition=1, offset=offset, key=key, value=b"v", timestamp_ms=1_000,
                    headers=headers)


def loop() -> KafkaLoop:
    settings = load_settings(service="unit", kafka_bootstrap="127.0.0.1:1")
    return KafkaLoop(settings, PassthroughProcessor("out"), input_topics=["in"],
                     metrics=ServiceMetrics("unit"))


def test_headers_follow_the_source_record_or_the_nth_input_of_the_key() -> None:
    a0 = rec(10, b"A", ((CORRELATION_HEADER, b"c-a0"), (INGEST_TIME_HEADER, b"5")))
    a1 = rec(11, b"A")
    b0 = rec(12, b"B", ((CORRELATION_HEADER, b"c-b0"),))
    outputs = [
        OutRecord("out", b"A", b"1"),
        OutRecord("out", b"A", b"2"),
        OutRecord("out", b"A", b"3"),  # more outputs than inputs: the last input of the key
        OutRecord("out", b"X", b"4", source=b0),
        OutRecord("out", b"B", b"5", headers=((CORRELATION_HEADER, b"own"),)),
        OutRecord("out", b"none", b"6"),
    ]
    got = [dict(o.headers) for o in loop()._propagate_headers([a0, a1, b0], outputs)]
    assert got[0] == {CORRELATION_HEADER: b"c-a0", INGEST_TIME_HEADER: b"5"}
    assert got[1] == {CORRELATION_HEADER: b"in-1-11", INGEST_TIME_HEADER: b"1000000000"}
    assert got[2] == got[1]
    assert got[3][CORRELATION_HEADER] == b"c-b0"
    assert got[4][CORRELATION_HEADER] == b"own"
    assert got[5] == {}


class QueueProducer:
    """Producer stand-in whose queue drains by 1000 records per poll."""

    def __init__(self, queued: int) -> None:
        self.queued = queued

    def __len__(self) -> int:
        return self.queued

    def poll(self, _timeout: float) -> int:
        self.queued = max(0, self.queued - 1000)
        return 0


class PauseRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []

    def pause(self, tps: list[object]) -> None:
        self.calls.append(("pause", [(tp.topic, tp.partition) for tp in tps]))  # type: ignore[attr-defined]

    def resume(self, tps: list[object]) -> None:
        self.calls.append(("resume", [(tp.topic, tp.partition) for tp in tps]))  # type: ignore[attr-defined]


async def test_backpressure_pauses_until_the_producer_queue_drains() -> None:
    lp = loop()
    producer, consumer = QueueProducer(25_000), PauseRecorder()
    lp._producer, lp._consumer = producer, consumer  # type: ignore[assignment]
    lp._assigned = {("in", 0), ("in", 1)}
    await lp._backpressure()
    assert consumer.calls == [("pause", [("in", 0), ("in", 1)]), ("resume", [("in", 0), ("in", 1)])]
    assert producer.queued <= 5_000  # loop.resume_records
    consumer.calls.clear()
    producer.queued = 100
    await lp._backpressure()
    assert consumer.calls == []


async def test_backpressure_does_not_resume_partitions_the_alignment_paused_in_the_client() -> None:
    lp = loop()
    producer, consumer = QueueProducer(25_000), PauseRecorder()
    lp._producer, lp._consumer = producer, consumer  # type: ignore[assignment]
    lp._assigned = {("in", 0), ("in", 1), ("in", 2)}
    alignment, held = lp._alignment, lp._held
    assert alignment is not None  # on by default
    assert held is not None
    alignment.report({("in", 0): 0, ("in", 1): 60 * 10**9, ("in", 2): 60 * 10**9})
    assert alignment.decide({("in", 0), ("in", 1), ("in", 2)}, now_ns=0).pause == {("in", 1), ("in", 2)}
    # ("in", 1) is held inside the loop only; ("in", 2) has held records over the bound: paused in the client
    held.paused.add(("in", 2))
    await lp._backpressure()
    assert consumer.calls == [("pause", [("in", 0), ("in", 1), ("in", 2)]),
                              ("resume", [("in", 0), ("in", 1)])]


class PollingRecorder(PauseRecorder):
    def poll(self, _timeout: float) -> None:
        self.calls.append(("poll", []))


async def test_a_slow_step_pauses_and_polls_until_it_ends_then_resumes() -> None:
    settings = load_settings(service="unit", kafka_bootstrap="127.0.0.1:1",
                             loop={"max_poll_interval_ms": 1000})
    lp = KafkaLoop(settings, PassthroughProcessor("out"), input_topics=["in"], metrics=ServiceMetrics("unit"))
    consumer = PollingRecorder()
    lp._consumer = consumer  # type: ignore[assignment]
    lp._assigned = {("in", 0), ("in", 1)}

    async def step(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    assert await lp._guarded(step(0.05), "process") == "done"
    assert consumer.calls == []  # in time: nothing touched
    assert lp.paused_for_slow_steps == 0
    assert await lp._guarded(step(1.2), "before_commit") == "done"  # keep-alive every 1/3 s
    kinds = [kind for kind, _ in consumer.calls]
    assert (kinds[0], kinds[-1]) == ("pause", "resume")
    assert kinds.count("poll") >= 2
    assert consumer.calls[0][1] == consumer.calls[-1][1] == [("in", 0), ("in", 1)]
    assert lp.paused_for_slow_steps == 1
    consumer.calls.clear()

    async def failing() -> None:
        await asyncio.sleep(0.5)
        raise ValueError("sink down")

    with pytest.raises(ValueError, match="sink down"):
        await lp._guarded(failing(), "before_commit")
    assert [kind for kind, _ in consumer.calls][::len(consumer.calls) - 1] == ["pause", "resume"]


def test_a_transactional_call_past_its_deadline_counts_as_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    """librdkafka can block in send_offsets_to_transaction forever: the loop walks away from it."""
    monkeypatch.setattr(loop_module, "TXN_CALL_DEADLINE_S", 0.2)
    kafka_loop = loop()
    kafka_loop._runner = loop_module._CallRunner("unit-txn")
    release = threading.Event()
    try:
        with pytest.raises(loop_module._CycleFailed) as failed:
            kafka_loop._retry(lambda: release.wait(10), "send_offsets_to_transaction", deadline=True)
        assert failed.value.kind == "hung"
        assert "send_offsets_to_transaction" in str(failed.value)
    finally:
        release.set()
        kafka_loop._runner.stop()


def test_a_transactional_call_within_its_deadline_returns_its_result() -> None:
    kafka_loop = loop()
    kafka_loop._runner = loop_module._CallRunner("unit-txn")
    try:
        assert kafka_loop._retry(lambda: 42, "commit_transaction", deadline=True) == 42
        with pytest.raises(loop_module._CycleFailed) as failed:
            kafka_loop._retry(_raise_fenced, "commit_transaction", deadline=True)
        assert failed.value.kind == "fatal"
    finally:
        kafka_loop._runner.stop()


async def test_a_commit_job_whose_call_passes_its_deadline_counts_as_hung_and_goes_no_further(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit's calls run as one job awaited on the event loop: the per-call deadline holds there.

    A call that comes back after the loop walked away does not let the job start the next one (a
    late `send_offsets_to_transaction` must not be followed by a commit of the abandoned producer).
    """
    monkeypatch.setattr(loop_module, "TXN_CALL_DEADLINE_S", 1.5)
    kafka_loop = loop()
    beats: list[int] = []
    monkeypatch.setattr(kafka_loop, "_heartbeat", lambda: beats.append(1))
    runner = loop_module._CallRunner("unit-txn")
    release, committed, finished = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        try:
            runner.timed("send_offsets_to_transaction", lambda: release.wait(10))
            runner.timed("commit_transaction", committed.set)
        finally:
            finished.set()

    try:
        with pytest.raises(loop_module._CycleFailed) as failed:
            await kafka_loop._await_job(runner, job)
        assert failed.value.kind == "hung"
        assert "send_offsets_to_transaction" in str(failed.value)
        assert beats  # the liveness heartbeat went on while the call was blocked
        release.set()
        assert finished.wait(5)
        assert not committed.is_set()
    finally:
        release.set()
        runner.stop()


async def test_a_commit_job_returns_its_result_or_its_error_class() -> None:
    kafka_loop = loop()
    runner = loop_module._CallRunner("unit-txn")
    calls: list[int] = []

    def retriable_once() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True))
        return 7

    def job(call: Callable[[], int]) -> Callable[[], int]:
        return lambda: kafka_loop._retry(lambda: runner.timed("commit_transaction", call),
                                         "commit_transaction")

    try:
        assert await kafka_loop._await_job(runner, job(lambda: 42)) == 42
        assert await kafka_loop._await_job(runner, job(retriable_once)) == 7
        assert len(calls) == 2
        with pytest.raises(loop_module._CycleFailed) as failed:
            await kafka_loop._await_job(runner, job(_raise_fenced))  # type: ignore[arg-type]
        assert failed.value.kind == "fatal"
    finally:
        runner.stop()


def _raise_fenced() -> None:
    raise KafkaException(KafkaError(KafkaError._FENCED))


def test_batch_keeps_assigned_records_in_order_with_first_and_last_offsets_per_partition() -> None:
    lp = loop()
    lp._assigned = {("in", 0), ("in", 1)}
    msgs = [
        Message(topic="in", partition=0, offset=5, key=b"k", value=b"a", timestamp=(1, 7)),
        Message(topic="in", partition=0, offset=6, key=b"k", value=b"b", timestamp=(1, 8),
                headers=[("h", "text"), ("n", None), ("b", b"raw")]),
        Message(topic="in", partition=1, offset=40, key=None, value=None, timestamp=(1, 9)),
        Message(topic="in", partition=2, offset=90, key=b"k", value=b"revoked", timestamp=(1, 9)),
        Message(topic="in", partition=0, offset=7, key=b"k", value=b"c", timestamp=(1, 10)),
        Message(topic="in", partition=1, offset=41, key=b"k", value=b"d", timestamp=(1, 11)),
        Message(topic="in", partition=2, offset=91, key=b"k", value=b"revoked", timestamp=(1, 12)),
    ]
    batch = lp._to_batch(msgs)
    assert [(r.partition, r.offset, r.value) for r in batch.records] == [
        (0, 5, b"a"), (0, 6, b"b"), (1, 40, None), (0, 7, b"c"), (1, 41, b"d")]
    assert batch.first == {("in", 0): 5, ("in", 1): 40}
    assert batch.last == {("in", 0): 7, ("in", 1): 41}
    assert [(tp.partition, tp.offset) for tp in batch.offsets()] == [(0, 8), (1, 42)]
    assert batch.records[0] == InRecord("in", 0, 5, b"k", b"a", 7, ())
    assert batch.records[1].headers == (("h", b"text"), ("n", b""), ("b", b"raw"))


def test_raw_inputs_get_both_tracing_headers_and_keep_processor_headers() -> None:
    src = InRecord(topic="in", partition=3, offset=9, key=b"A", value=b"v", timestamp_ms=2)
    plain, own = loop()._propagate_headers([src], [
        OutRecord("out", b"A", b"1", partition=4, source=src),
        OutRecord("out", b"A", b"2", headers=(("x", b"y"),), source=src),
    ])
    assert (plain.topic, plain.key, plain.value, plain.partition, plain.source) == ("out", b"A", b"1", 4, src)
    assert plain.headers == ((CORRELATION_HEADER, b"in-3-9"), (INGEST_TIME_HEADER, b"2000000"))
    assert own.headers == (("x", b"y"), (CORRELATION_HEADER, b"in-3-9"), (INGEST_TIME_HEADER, b"2000000"))


def test_older_epochs_are_looked_for_on_every_topic_the_service_may_write() -> None:
    settings = load_settings(service="normalization", kafka_bootstrap="127.0.0.1:1")
    lp = KafkaLoop(settings, PassthroughProcessor("out"), input_topics=[settings.topics.raw],
                   metrics=ServiceMetrics("normalization"))
    lp._topic_bytes("out")  # a topic produced to in this process
    t = settings.topics
    topics = lp._output_topics()
    assert {t.normalized, t.deadletter, t.normalization_dedup_changelog, "out"} <= set(topics)
    assert t.raw not in topics
    assert t.aggregation_windows_changelog not in topics


def _stats(ts_s: float, app: int, ls: int) -> str:
    import json

    part = {"app_offset": app, "next_offset": app, "committed_offset": -1001, "ls_offset": ls,
            "hi_offset": ls, "fetchq_cnt": 0, "fetch_state": "active"}
    return json.dumps({"ts": int(ts_s * 1e6), "topics": {"in": {"partitions": {"0": part, "-1": {}}}}})


def test_statistics_report_a_partition_stuck_with_records_waiting() -> None:
    """The stall diagnostic: logged after `STUCK_PARTITION_S` without progress, then once per period."""
    from structlog.testing import capture_logs

    lp = loop()
    lp._assigned = {("in", 0)}
    with capture_logs() as logs:
        lp._cb_stats(_stats(0, 10, 14))
        lp._cb_stats(_stats(20, 10, 14))
        assert logs == []  # not long enough
        lp._cb_stats(_stats(35, 10, 14))
        lp._cb_stats(_stats(40, 10, 14))  # reported already within the period
        lp._cb_stats(_stats(70, 12, 14))  # moved: the clock starts again
        lp._cb_stats(_stats(95, 12, 12))  # caught up: nothing waiting
        lp._cb_stats(_stats(200, 12, 12))
        lp._cb_stats("not json")
    stuck = [e for e in logs if e["event"] == "consumer partition not advancing"]
    assert len(stuck) == 1
    assert (stuck[0]["topic"], stuck[0]["partition"], stuck[0]["app_offset"], stuck[0]["ls_offset"],
            stuck[0]["stuck_s"], stuck[0]["fetch_state"]) == ("in", 0, 10, 14, 35.0, "active")


class _FreshlyAssigned:
    """A consumer with a partition assigned but not consumed yet: no position (-1001)."""

    def __init__(self, committed: int, high: int) -> None:
        self.committed_offset, self.high, self.lookups = committed, high, 0

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return (0, self.high)

    def committed(self, tps: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        self.lookups += 1
        return [TopicPartition(tp.topic, tp.partition, self.committed_offset) for tp in tps]


def test_lag_of_a_partition_not_consumed_since_its_assignment_counts_from_its_committed_offset() -> None:
    """The seed-3 "stall": a fully processed partition showed its whole length (14) as lag."""
    lp = loop()
    consumer = _FreshlyAssigned(committed=14, high=14)
    lp._consumer = consumer  # type: ignore[assignment]
    lp._assigned = {("in", 2)}
    assert lp._update_lag() == {("in", 2): 0}
    consumer.high = 20  # records arrived, not fetched yet
    assert lp._update_lag() == {("in", 2): 6}
    assert consumer.lookups == 1  # looked up once per assignment


def test_statistics_take_the_committed_offset_of_a_partition_not_consumed_yet() -> None:
    import json

    from structlog.testing import capture_logs

    lp = loop()
    lp._assigned = {("in", 0)}
    part = {"app_offset": -1001, "next_offset": 14, "committed_offset": 14, "ls_offset": 14,
            "hi_offset": 14, "fetchq_cnt": 0, "fetch_state": "active"}
    with capture_logs() as logs:
        for ts in (0, 40, 80):
            lp._cb_stats(json.dumps({"ts": ts * 1_000_000, "topics": {"in": {"partitions": {"0": part}}}}))
    assert [e for e in logs if e["event"] == "consumer partition not advancing"] == []


def test_closing_a_failed_producer_logs_the_clients_warnings_and_goes_on() -> None:
    """A producer whose transaction cannot be aborted warns from `close`; where warnings are errors the
    warning would fail the call. Closing a failed producer logs it and goes on (the loop's recovery)."""
    from structlog.testing import capture_logs

    calls: list[str] = []

    class FatalProducer:
        def purge(self) -> None:
            calls.append("purge")
            raise KafkaException(KafkaError(KafkaError._FATAL))

        def flush(self, timeout: float) -> int:
            calls.append("flush")
            return 0

        def close(self) -> None:
            calls.append("close")
            warnings.warn("Producer abort_transaction failed during close", RuntimeWarning, stacklevel=1)

    with warnings.catch_warnings(), capture_logs() as logs:
        warnings.simplefilter("error")
        loop_module._close_producer(FatalProducer())  # type: ignore[arg-type]
    assert calls == ["purge", "flush", "close"]
    assert [(e["log_level"], e["category"], e["warning"]) for e in logs if "category" in e] == [
        ("warning", "RuntimeWarning", "Producer abort_transaction failed during close")]
