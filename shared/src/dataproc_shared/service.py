"""`run_service`: the one entry point a service's `__main__` calls.

    def main() -> int:
        return run_service(AggregationSettings, make_processor, service="aggregation",
                           input_topics=lambda s: [s.topics.enriched], clickhouse_owner=True)

It configures logging, loads and validates the settings (a `ConfigError` prints its message and
exits with status 2), creates the metrics registry, starts the health server (with a Kafka check,
the service's own dependency checks and routes), the audit emitter (and, in the process that owns
an embedded ClickHouse, the audit loader), builds the processor and runs the Kafka loop until
SIGTERM/SIGINT. Every resource sits in one `AsyncExitStack`, closed in reverse order. Exit status:
0 after a clean stop, 1 when a needed topic (input, dead-letter, audit) is still missing after
`loop.startup_topic_wait_s`, the loop failed fatally or did not stop within `loop.shutdown_timeout_s`.

Start-up never gives up on an unreachable broker (`wait_for_kafka`): it retries with backoff while a
health server on the service's port reports `kafka` down (unhealthy, not ready, live). The owner of
a ClickHouse *server* (`http(s)://`) waits for it the same way (`wait_for_clickhouse`, `clickhouse`
down) before it builds its processor (migrations) and consumes anything.

Audit sinks: `audit_sinks` from the settings, except that with an embedded ClickHouse
(`DATA_PROC_CLICKHOUSE_URL` is a path) only the owner may open the engine, so every other service
sends its audit events to the Kafka topic instead, and the owner's `AuditLoader` loads that topic
into `audit_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiohttp import web
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from dataproc_shared.audit import (
    AuditEmitter,
    AuditLoader,
    AuditSink,
    ClickHouseAuditSink,
    KafkaAuditSink,
    lifecycle_event,
)
from dataproc_shared.clickhouse import ClickHouseClient, ClickHouseError, connect
from dataproc_shared.config import (
    Settings,
    consumer_config,
    kafka_common_config,
    load_settings_or_exit,
    producer_config,
)
from dataproc_shared.health import HealthServer, sanitize_error
from dataproc_shared.kafka.loop import KafkaLoop, LoopFatalError
from dataproc_shared.logging import configure_logging
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.processor import Processor
from dataproc_shared.topics import topic_configs

log = structlog.get_logger(__name__)

S = TypeVar("S", bound=Settings)
CheckFn = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Dependency:
    """A dependency the health server checks periodically; `check` raises when it is down."""

    name: str
    check: CheckFn
    critical: bool = True


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What a processor factory gets: the settings and the runtime's shared resources."""

    settings: Settings
    metrics: ServiceMetrics
    health: HealthServer
    audit: AuditEmitter
    exit_stack: AsyncExitStack
    #: Open when the service owns the embedded engine or a ClickHouse server is configured for a sink.
    clickhouse: ClickHouseClient | None


ProcessorFactory = Callable[[ServiceContext], Processor | Awaitable[Processor]]
TopicsArg = Sequence[str] | Callable[[Any], Sequence[str]]


def run_service(
    settings: S | type[S],
    processor: Processor | ProcessorFactory,
    *,
    input_topics: TopicsArg,
    service: str | None = None,
    dependencies: Iterable[Dependency] = (),
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    clickhouse_owner: bool = False,
) -> int:
    """Run a service until SIGTERM/SIGINT; return the process exit status.

    `settings` is a loaded `Settings` or a settings class to load (then `service` names the service).
    `processor` is a `Processor` or a factory taking a `ServiceContext` (sync or async).
    `input_topics` is a list of topics or a function of the settings returning it.
    `clickhouse_owner`: this process owns the embedded ClickHouse (opens it, loads audit events).
    """
    loaded = settings if isinstance(settings, Settings) else load_settings_or_exit(settings, service=service)
    configure_logging(loaded.service, env=loaded.env, level=loaded.log_level, instance_id=loaded.instance_id)
    topics = list(input_topics(loaded) if callable(input_topics) else input_topics)
    code, timed_out = asyncio.run(serve(loaded, processor, input_topics=topics, dependencies=dependencies,
                                        extra_routes=extra_routes, clickhouse_owner=clickhouse_owner))
    if timed_out:
        # A worker thread is still inside a blocking client call; do not wait for it.
        sys.stderr.flush()
        os._exit(code)
    return code


async def serve(
    settings: Settings,
    processor: Processor | ProcessorFactory,
    *,
    input_topics: Sequence[str],
    dependencies: Iterable[Dependency] = (),
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    clickhouse_owner: bool = False,
    stop: asyncio.Event | None = None,
) -> tuple[int, bool]:
    """The asynchronous body of `run_service`: (exit status, whether shutdown timed out).

    `stop` lets a caller (a test) stop the service; SIGTERM/SIGINT set it too.
    """
    stop = stop or asyncio.Event()
    metrics = ServiceMetrics(settings.service)
    async with AsyncExitStack() as stack:
        health = HealthServer.from_settings(settings, metrics)
        admin = AdminClient(kafka_common_config(settings))
        health.add_check("kafka", lambda: asyncio.to_thread(admin.list_topics, timeout=2.0))
        for dep in dependencies:
            health.add_check(dep.name, dep.check, critical=dep.critical)
        health.add_routes(extra_routes)
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, stop.set)
            stack.callback(running.remove_signal_handler, sig)

        needed = [*input_topics, settings.topics.deadletter]
        if settings.audit_enabled_for() and "kafka" in audit_sink_names(settings, clickhouse_owner):
            needed.append(settings.audit_kafka_topic)
        startup = StartupHealth(settings, metrics)
        stack.push_async_callback(startup.stop)
        missing = await wait_for_kafka(settings, admin, needed, startup, stop)
        if missing is None:
            log.info("service stopped while waiting for kafka")
            return 0, False
        if missing:
            log.error("topics missing: create them with the topic tooling (python -m dptools.topics create)",
                      topics=missing, waited_s=settings.loop.startup_topic_wait_s)
            return 1, False
        deadletter_max_bytes = await asyncio.to_thread(_deadletter_max_bytes, admin, settings)

        clickhouse = _open_clickhouse(settings, clickhouse_owner)
        if clickhouse is not None:
            stack.callback(clickhouse.close)
            server_owner = clickhouse_owner and not settings.clickhouse_embedded
            if server_owner and not await wait_for_clickhouse(settings, clickhouse, startup, stop):
                log.info("service stopped while waiting for clickhouse")
                return 0, False
            client = clickhouse
            health.add_check("clickhouse", lambda: asyncio.to_thread(client.query, "SELECT 1"),
                             critical=clickhouse_owner)

        audit = AuditEmitter(
            service=settings.service,
            environment=settings.env,
            sinks=_audit_sinks(settings, clickhouse, clickhouse_owner, metrics),
            metrics=metrics,
            queue_size=settings.audit_queue_size,
            flush_interval_ms=settings.audit_flush_interval_ms,
            enabled=settings.audit_enabled_for(),
            # With the Kafka sink on, the loop puts each batch's audit events (dead letters, dropped
            # duplicates, batch summaries) into the batch's transaction; without the topic here they
            # would only reach the audit topic by the emitter's periodic flush, after the commit.
            kafka_topic=settings.audit_kafka_topic,
        )
        await stack.enter_async_context(audit)
        audit.emit(lifecycle_event("config_loaded", settings=settings.masked()))
        if clickhouse is not None and clickhouse_owner and settings.clickhouse_embedded:
            await _start_loader(stack, settings, clickhouse, stop)

        context = ServiceContext(settings, metrics, health, audit, stack, clickhouse)
        proc = await _build_processor(processor, context)
        await startup.stop()  # hands the port over to the service's health server
        await stack.enter_async_context(health)

        loop = KafkaLoop(settings, proc, input_topics=input_topics, metrics=metrics, audit=audit,
                         listener=health, deadletter_max_bytes=deadletter_max_bytes)
        log.info("service starting", topics=list(input_topics), guarantee=settings.loop.guarantee)
        task = asyncio.create_task(loop.run(stop), name="kafka-loop")
        waiter = asyncio.create_task(stop.wait(), name="stop-signal")
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        health.set_ready(False)
        if not task.done():
            log.info("stopping", timeout_s=settings.loop.shutdown_timeout_s)
            try:
                await asyncio.wait_for(asyncio.shield(task), settings.loop.shutdown_timeout_s)
            except TimeoutError:
                log.error("shutdown timed out", timeout_s=settings.loop.shutdown_timeout_s)
                return 1, True
            except Exception:  # noqa: S110 - reported from the task below
                pass
        waiter.cancel()
        error = task.exception()
        if error is not None:
            if isinstance(error, LoopFatalError):
                log.error("loop failed", error=str(error))
            else:
                log.error("loop crashed", exc_info=error)
            return 1, False
        log.info("service stopped", committed_cycles=loop.committed_cycles)
    return 0, False


#: First delay between two attempts to reach the broker at start (doubled up to
#: `loop.startup_backoff_max_s`), and how long one attempt waits for an answer.
STARTUP_BACKOFF_INITIAL_S = 0.5
STARTUP_PROBE_TIMEOUT_S = 5.0


class StartupHealth:
    """The health server of a service that is not up yet: started only when start-up has to wait.

    It serves the service's port while the service waits for a dependency (`/health` unhealthy with
    the dependency down, `/ready` 503, `/live` 200: the process is fine, a restart would not help)
    and until the service's own health server takes the port over (`stop`).
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._server: HealthServer | None = None

    async def report(self, name: str, up: bool, error: str | None = None) -> None:
        """Record the state of dependency `name`; start serving on the first report of a dependency down."""
        if self._server is None:
            if up:
                return
            settings = self._settings
            # Live for as long as it waits: no loop runs yet whose heartbeat could stall.
            self._server = HealthServer(settings.service, self._metrics, instance_id=settings.instance_id,
                                        version=settings.version, host=settings.http.host,
                                        port=settings.http.port, live_stall_timeout_s=math.inf)
            await self._server.start()
        self._server.report(name, up, error)
        self._server.heartbeat()

    async def stop(self) -> None:
        """Free the port (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()


async def wait_for_kafka(
    settings: Settings, admin: AdminClient, needed: Sequence[str], health: StartupHealth,
    stop: asyncio.Event, *, clock: Callable[[], float] = time.monotonic,
) -> list[str] | None:
    """Wait until the broker answers; return the topics of `needed` it lacks, None if `stop` was set.

    An unreachable broker is retried with exponential backoff for as long as it takes (the
    orchestrator may start the services before the broker). A needed topic missing on a reachable
    broker is waited for up to `loop.startup_topic_wait_s`, then returned: topics are created by the
    topic tooling before the services, so that is a deployment error to stop on. Meanwhile `health`
    reports the `kafka` dependency down with the reason.
    """
    delay = STARTUP_BACKOFF_INITIAL_S
    missing_since: float | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            existing = await asyncio.to_thread(_topic_names, admin, STARTUP_PROBE_TIMEOUT_S)
        except KafkaException as exc:
            error = f"broker unreachable ({settings.kafka_bootstrap}): {exc}"
            missing_since = None
        else:
            missing = sorted(set(needed) - existing)
            if not missing:
                if attempts > 1:
                    log.info("kafka reachable", attempts=attempts)
                await health.report("kafka", True)
                return []
            now = clock()
            missing_since = now if missing_since is None else missing_since
            if now - missing_since >= settings.loop.startup_topic_wait_s:
                return missing
            error = "topics missing: " + ", ".join(missing)
        await health.report("kafka", False, error)
        log.warning("waiting for kafka", error=error, attempt=attempts, retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return None
        delay = min(delay * 2, settings.loop.startup_backoff_max_s)


async def wait_for_clickhouse(
    settings: Settings, client: ClickHouseClient, health: StartupHealth, stop: asyncio.Event,
) -> bool:
    """Wait until the ClickHouse server answers `SELECT 1`; False if `stop` was set first.

    Only the process that writes to ClickHouse (the owner) waits: it cannot do its job without the
    server. Retried with exponential backoff (`STARTUP_BACKOFF_INITIAL_S`, doubled up to
    `loop.startup_backoff_max_s`) for as long as it takes, like an unreachable broker; meanwhile
    `health` reports the `clickhouse` dependency down with the reason (unhealthy, not ready, live).
    """
    delay = STARTUP_BACKOFF_INITIAL_S
    attempts = 0
    address = getattr(client, "address", "server")
    while True:
        attempts += 1
        try:
            await asyncio.to_thread(client.query, "SELECT 1")
        except ClickHouseError as exc:
            error = f"clickhouse unreachable ({address}): {exc}"
        else:
            if attempts > 1:
                log.info("clickhouse reachable", attempts=attempts)
            await health.report("clickhouse", True)
            return True
        await health.report("clickhouse", False, error)
        log.warning("waiting for clickhouse", error=sanitize_error(error), attempt=attempts, retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return False
        delay = min(delay * 2, settings.loop.startup_backoff_max_s)


def _topic_names(admin: AdminClient, timeout_s: float) -> set[str]:
    """Names of the broker's topics (raises `KafkaException` when the broker does not answer)."""
    return set(admin.list_topics(timeout=timeout_s).topics)


def _deadletter_max_bytes(admin: AdminClient, settings: Settings) -> int:
    """The dead-letter size limit to fit: the configured one, or the topic's when that is lower."""
    configured = settings.topics.deadletter_message_limit
    topic = settings.topics.deadletter
    try:
        actual = int(topic_configs(admin, [topic], timeout_s=15.0)[topic]["max.message.bytes"])
    except (KafkaException, KeyError, ValueError) as exc:
        log.warning("cannot read the dead-letter topic's max.message.bytes", topic=topic, error=str(exc),
                    max_bytes=configured)
        return configured
    if actual < configured:
        log.warning("the dead-letter topic accepts smaller messages than configured: larger dead letters "
                    "are truncated (dptools.topics create --update-config sets the configured limit)",
                    topic=topic, topic_max_bytes=actual, configured_max_bytes=configured)
    return min(actual, configured)


def _open_clickhouse(settings: Settings, owner: bool) -> ClickHouseClient | None:
    """The ClickHouse client this process may use: the embedded engine only in its owner."""
    if settings.clickhouse_embedded:
        return connect(settings.clickhouse_url) if owner else None
    wants_audit = settings.audit_enabled_for() and "clickhouse" in settings.audit_sinks
    if not (owner or wants_audit):
        return None
    password = settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
    return connect(settings.clickhouse_url, username=settings.clickhouse_user, password=password,
                   database=settings.clickhouse_database)


def audit_sink_names(settings: Settings, owner: bool) -> list[str]:
    """The audit sinks this process uses: a non-owner of an embedded ClickHouse goes through Kafka."""
    names: list[str] = list(dict.fromkeys(settings.audit_sinks))
    if settings.clickhouse_embedded and not owner and "clickhouse" in names:
        names = [n for n in names if n != "clickhouse"]
        if "kafka" not in names:
            names.append("kafka")
    return names


def _audit_sinks(settings: Settings, clickhouse: ClickHouseClient | None, owner: bool,
                 metrics: ServiceMetrics | None = None) -> list[AuditSink]:
    sinks: list[AuditSink] = []
    if not settings.audit_enabled_for():
        return sinks
    for name in audit_sink_names(settings, owner):
        if name == "clickhouse" and clickhouse is not None:
            sinks.append(ClickHouseAuditSink(clickhouse, f"{settings.clickhouse_database}.audit_events"))
        elif name == "kafka":
            sinks.append(KafkaAuditSink(producer_config(settings), settings.audit_kafka_topic,
                                        settings.service, metrics=metrics))
    return sinks


async def _start_loader(stack: AsyncExitStack, settings: Settings, client: ClickHouseClient,
                        stop: asyncio.Event) -> None:
    conf = consumer_config(settings, group_id=f"dataproc-audit-loader-{settings.service}")
    # One insert per audit flush interval (at most 1 s: the wait ends shutdown's wait too) or per
    # 5,000 events: an insert costs milliseconds of engine CPU whatever its size.
    loader = AuditLoader(client=client, consumer_config=conf, topic=settings.audit_kafka_topic,
                         table=f"{settings.clickhouse_database}.audit_events", batch_size=5_000,
                         poll_timeout_s=min(settings.audit_flush_interval_ms / 1000, 1.0))
    task = asyncio.create_task(loader.run(stop), name="audit-loader")

    async def finish() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(loader.close)

    stack.push_async_callback(finish)


async def _build_processor(processor: Processor | ProcessorFactory, context: ServiceContext) -> Processor:
    if hasattr(processor, "process"):
        return processor  # type: ignore[return-value]
    factory: Any = processor
    built = factory(context)
    if inspect.isawaitable(built):
        built = await built
    return built  # type: ignore[no-any-return]
