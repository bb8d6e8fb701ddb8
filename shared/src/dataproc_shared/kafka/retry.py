"""The one retry helper of the Kafka loop: attempts, backoff, which errors, what to log.

A `Retry` says how a step is tried again: how many tries in all, how long to wait after the n-th
failed one, which failures may be tried again (any other propagates at once) and the log message of
a failure that is tried again. The last failure always propagates: the caller decides what giving
up means (raise a fatal error, log and go on, ...). `run` is for blocking steps (called in worker
threads), `run_async` for coroutines, with an optional step between two tries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


def any_error(exc: BaseException) -> bool:
    """Every `Exception` is retriable (not `BaseException`s such as cancellation)."""
    return isinstance(exc, Exception)


@dataclass(frozen=True, slots=True)
class Retry:
    """How a step is retried.

    `attempts`: tries in all (>= 1); `backoff(n)`: seconds to wait after the n-th failed try
    (n from 1); `retriable(exc)`: whether that failure may be tried again; `event`: the log message
    of a failure that is tried again (with `error` and `attempt`, plus the caller's fields), None
    for none; `level`: its log level.
    """

    attempts: int
    backoff: Callable[[int], float]
    retriable: Callable[[BaseException], bool] = any_error
    event: str | None = None
    level: Literal["debug", "info", "warning"] = "warning"

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")

    def _again(self, exc: BaseException, attempt: int, fields: Mapping[str, Any] | None) -> bool:
        """Whether to try again after failed try `attempt`; logs it when so."""
        if attempt >= self.attempts or not self.retriable(exc):
            return False
        if self.event is not None:
            getattr(log, self.level)(self.event, error=str(exc), attempt=attempt, **(fields or {}))
        return True

    def run(self, step: Callable[[], T], *, log_fields: Mapping[str, Any] | None = None,
            sleep: Callable[[float], object] = time.sleep) -> T:
        """`step()`, tried again per this policy; the last failure propagates.

        `log_fields` go with the log line of a retried failure; `sleep` waits the backoff.
        """
        attempt = 1
        while True:
            try:
                return step()
            except BaseException as exc:
                if not self._again(exc, attempt, log_fields):
                    raise
            sleep(self.backoff(attempt))
            attempt += 1

    async def run_async(self, step: Callable[[], Awaitable[T]], *,
                        between: Callable[[], Awaitable[object]] | None = None,
                        log_fields: Mapping[str, Any] | None = None) -> T:
        """`await step()`, tried again per this policy; `between` is awaited before each backoff."""
        attempt = 1
        while True:
            try:
                return await step()
            except BaseException as exc:
                if not self._again(exc, attempt, log_fields):
                    raise
            if between is not None:
                await between()
            await asyncio.sleep(self.backoff(attempt))
            attempt += 1
