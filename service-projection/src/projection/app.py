"""The projection service's `Processor`: enriched ticks and bars in, Redis read models out.

`process` decodes a batch and turns it into pending writes (pure, `projection.transform`);
`before_commit` applies them to Redis through the compare-and-set scripts, so the loop commits the
input offsets only once the batch is in Redis. While Redis is unavailable `before_commit` keeps
retrying with exponential backoff (the loop consumes nothing meanwhile: consumption is paused) and
the Redis dependency reports unhealthy; after `flush_deadline_s` it raises, the loop aborts the
transaction and rewinds to the committed offsets, and the same records come back: nothing is lost,
and replaying them cannot move a key backwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from dataproc_shared import avro
from dataproc_shared.masking import mask_text
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import BatchResult, InRecord
from redis.exceptions import RedisError

from projection.redis_sink import RedisProjectionSink, WriteOutcome, redis_client
from projection.settings import ProjectionOptions, ProjectionSettings
from projection.transform import (
    InputTopics,
    KeyType,
    PendingWrites,
    ProjectionError,
    field_decoder,
    project_records,
)

log = structlog.get_logger(__name__)

#: Errors that make Redis "unavailable": retried with backoff and reported on `/health`. Besides
#: connection errors this includes every error reply (a read-only replica, a key of the wrong type
#: written by someone else): replaying at once could only fail again, so the service waits for Redis
#: to be fixed instead of spinning.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisError, ConnectionError, asyncio.TimeoutError,
)
#: How often an idle service checks that Redis answers.
PING_INTERVAL_S = 5.0


class RedisUnavailable(ProjectionError):
    """Redis did not accept a batch before the flush deadline; the transaction is aborted and replayed."""


@dataclass(slots=True)
class RedisHealth:
    """What the service last saw of Redis, for `/health` and `dp_dependency_up`."""

    up: bool = False
    detail: str = "not checked yet"
    changed_at: float = 0.0

    def mark(self, up: bool, detail: str, now: float) -> bool:
        """Record a state; True when it changed."""
        changed = up != self.up
        self.up, self.detail = up, detail
        if changed:
            self.changed_at = now
        return changed


class ProjectionMetrics:
    """`dp_redis_writes_total{service, key_type, outcome}` of the service's `ServiceMetrics`."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        for key_type in KeyType:
            for outcome in ("applied", "stale"):
                metrics.child(metrics.redis_writes, key_type=key_type.value, outcome=outcome)

    def record(self, outcome: WriteOutcome) -> None:
        """Count one flush's outcome."""
        m = self._metrics
        for key_type, n in outcome.applied.items():
            m.child(m.redis_writes, key_type=key_type.value, outcome="applied").inc(n)
        for key_type, n in outcome.stale.items():
            m.child(m.redis_writes, key_type=key_type.value, outcome="stale").inc(n)

    def dependency(self, up: bool) -> None:
        """`dp_dependency_up{dependency="redis"}`."""
        self._metrics.set_dependency("redis", up)


def backoff_delays(initial_s: float, max_s: float) -> Callable[[], float]:
    """A generator-like callable of waits: `initial_s`, doubling, capped at `max_s`."""
    delay = initial_s

    def next_delay() -> float:
        nonlocal delay
        current = delay
        delay = min(delay * 2, max_s)
        return current

    return next_delay


class ProjectionProcessor:
    """The `Processor` of the projection service (stateless: Redis holds the projections)."""

    def __init__(
        self,
        sink: RedisProjectionSink,
        topics: InputTopics,
        options: ProjectionOptions,
        metrics: ProjectionMetrics,
        health: RedisHealth | None = None,
        *,
        on_health: Callable[[bool, str], None] | None = None,
        service: str = "projection",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._topics = topics
        self._opts = options
        self._metrics = metrics
        self.health = health or RedisHealth()
        self._on_health = on_health
        self._service = service
        self._sleep = sleep
        self._monotonic = monotonic
        self._pending = PendingWrites()
        self._decode = field_decoder(avro.default_registry())
        self._next_ping = 0.0
        #: Flushes done, and wall seconds spent decoding (`process`) and writing to Redis (`before_commit`).
        self.flushes = 0
        self.process_seconds = 0.0
        self.flush_seconds = 0.0

    async def start(self) -> None:
        """Load the scripts and check Redis; an unavailable Redis is reported, not fatal."""
        try:
            await self._sink.load_scripts()
            self._mark(True, "ok")
        except REDIS_UNAVAILABLE as exc:
            self._mark(False, _describe(exc))

    async def check_redis(self) -> bool:
        """Ping Redis now and record the result (the health check of the Redis dependency)."""
        try:
            up = await self._sink.ping()
            self._mark(up, "ok" if up else "no PONG")
        except REDIS_UNAVAILABLE as exc:
            self._mark(False, _describe(exc))
        return self.health.up

    async def require_redis(self) -> None:
        """Health check of the Redis dependency: raises `RedisUnavailable` when Redis does not answer."""
        if not await self.check_redis():
            raise RedisUnavailable(self.health.detail)

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """Stateless: nothing to restore."""

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Stateless: the last cycle of these partitions has committed or aborted already."""

    async def process(self, batch: list[InRecord]) -> BatchResult:
        """Decode the batch into pending Redis writes; undecodable or unusable records are dead letters."""
        started = time.perf_counter()
        dead = project_records(batch, self._topics, self._decode, self._pending, self._opts.max_final_bars)
        self.process_seconds += time.perf_counter() - started
        return BatchResult(dead_letters=dead)

    async def on_tick(self) -> BatchResult:
        """While idle, check Redis every few seconds so `/health` stays current."""
        now = self._monotonic()
        if now >= self._next_ping:
            self._next_ping = now + PING_INTERVAL_S
            await self.check_redis()
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        """Apply the batch's writes to Redis, retrying with backoff; `RedisUnavailable` at the deadline."""
        if not self._pending:
            return BatchResult()
        started = time.perf_counter()
        writes = self._pending.writes()
        deadline = self._monotonic() + self._opts.flush_deadline_s
        next_delay = backoff_delays(self._opts.retry_initial_ms / 1000, self._opts.retry_max_ms / 1000)
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self._sink.apply(writes)
                break
            except REDIS_UNAVAILABLE as exc:
                self._mark(False, _describe(exc))
                delay = next_delay()
                if self._monotonic() + delay > deadline:
                    log.error("redis unavailable, aborting the batch for a replay", service=self._service,
                              attempts=attempt, writes=len(writes), error=_describe(exc))
                    raise RedisUnavailable(f"Redis unavailable after {attempt} attempts: {_describe(exc)}"
                                           ) from exc
                log.warning("redis unavailable, retrying", service=self._service, attempt=attempt,
                            retry_in_s=round(delay, 3), writes=len(writes), error=_describe(exc))
                await self._sleep(delay)
        self._mark(True, "ok")
        self._metrics.record(outcome)
        self._pending.clear()
        self.flushes += 1
        self.flush_seconds += time.perf_counter() - started
        return BatchResult()

    async def on_abort(self) -> None:
        """Forget the pending writes: the loop replays their records from the committed offsets."""
        self._pending.clear()

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._sink.close()

    def _mark(self, up: bool, detail: str) -> None:
        self._metrics.dependency(up)
        if self._on_health is not None:
            self._on_health(up, detail)
        if self.health.mark(up, detail, self._monotonic()):
            (log.info if up else log.warning)("redis dependency changed", service=self._service,
                                              dependency="redis", up=up, detail=detail)


def _describe(exc: BaseException) -> str:
    """Error text safe to log and serve: redis-py messages name host and port, never the password."""
    return mask_text(f"{type(exc).__name__}: {exc}")[:300]


def input_topics(settings: ProjectionSettings) -> InputTopics:
    """The projection's two input topics from the settings."""
    return InputTopics(ticks=settings.topics.enriched, bars=settings.topics.bars)


def build_processor(settings: ProjectionSettings, metrics: ServiceMetrics,
                    on_health: Callable[[bool, str], None] | None = None) -> ProjectionProcessor:
    """The processor wired to a Redis client built from the settings (the URL is never logged)."""
    opts = settings.projection
    client = redis_client(settings.redis_url_value(), ssl=settings.redis_ssl_options(),
                          socket_timeout_s=opts.socket_timeout_s)
    sink = RedisProjectionSink(client, channel=opts.updates_channel, chunk_size=opts.pipeline_chunk)
    return ProjectionProcessor(sink, input_topics(settings), opts, ProjectionMetrics(metrics),
                               service=settings.service, on_health=on_health)
