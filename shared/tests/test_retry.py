"""The loop's retry helper (`dataproc_shared.kafka.retry.Retry`): pure logic, no client."""

from __future__ import annotations

import asyncio

import pytest
from dataproc_shared.kafka.retry import Retry
from structlog.testing import capture_logs


class _Flaky:
    """Fails with `error` the first `failures` calls, then returns the call count."""

    def __init__(self, failures: int, error: type[Exception] = ValueError) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return self.calls


def test_retries_until_success_with_the_backoff_of_each_failed_try() -> None:
    waits: list[float] = []
    step = _Flaky(2)
    policy = Retry(5, lambda n: 0.5 * n, event="step failed")
    with capture_logs() as logs:
        assert policy.run(step, sleep=waits.append, log_fields={"what": "x"}) == 3
    assert waits == [0.5, 1.0]
    assert [(e["event"], e["attempt"], e["error"], e["what"], e["log_level"]) for e in logs] == [
        ("step failed", 1, "failure 1", "x", "warning"), ("step failed", 2, "failure 2", "x", "warning")]


def test_the_last_failure_propagates_without_a_wait_or_log_after_it() -> None:
    waits: list[float] = []
    step = _Flaky(10)
    with capture_logs() as logs, pytest.raises(ValueError, match="failure 3"):
        Retry(3, lambda n: 1.0, event="again", level="info").run(step, sleep=waits.append)
    assert step.calls == 3
    assert waits == [1.0, 1.0]
    assert [e["attempt"] for e in logs] == [1, 2]
    assert {e["log_level"] for e in logs} == {"info"}


def test_an_error_that_is_not_retriable_propagates_at_once() -> None:
    step = _Flaky(1, KeyError)
    with pytest.raises(KeyError):
        Retry(5, lambda n: 0.0, lambda exc: isinstance(exc, ValueError)).run(step, sleep=lambda s: None)
    assert step.calls == 1


def test_no_event_logs_nothing() -> None:
    with capture_logs() as logs:
        assert Retry(3, lambda n: 0.0).run(_Flaky(2), sleep=lambda s: None) == 3
    assert logs == []


def test_async_runs_the_step_between_tries_then_the_backoff() -> None:
    order: list[str] = []
    step = _Flaky(2)

    async def attempt() -> int:
        order.append("try")
        return step()

    async def between() -> None:
        order.append("between")

    async def scenario() -> int:
        return await Retry(3, lambda n: 0.001).run_async(attempt, between=between)

    assert asyncio.run(scenario()) == 3
    assert order == ["try", "between", "try", "between", "try"]


def test_async_gives_up_after_the_attempts() -> None:
    step = _Flaky(10)

    async def attempt() -> int:
        return step()

    with pytest.raises(ValueError, match="failure 2"):
        asyncio.run(Retry(2, lambda n: 0.001).run_async(attempt))
    assert step.calls == 2


def test_cancellation_is_never_retried() -> None:
    calls = 0

    async def attempt() -> int:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(Retry(5, lambda n: 0.001).run_async(attempt))
    assert calls == 1


def test_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(0, lambda n: 0.0)
