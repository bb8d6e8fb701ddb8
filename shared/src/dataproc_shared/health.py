"""The health and metrics HTTP server every service runs on its port.

Routes:

- `GET /health`: JSON `{"status": "healthy|degraded|unhealthy", "service", "instance_id", "version",
  "ready", "live", "uptime_s", "dependencies": {name: {"status": "up|down|unknown", "critical",
  "latency_ms", "last_error", "checked_at"}}}`. `unhealthy` (HTTP 503) when a critical dependency is
  down or the loop is stalled; `degraded` (HTTP 200) when a non-critical dependency is down or the
  service has not started yet. Errors are sanitised: no secrets, no credentials in URLs/DSNs.
- `GET /ready`: 200 once the service declared itself started (`set_ready`, or the loop's
  `assigned` hook) and while every critical dependency is up; else 503.
- `GET /live`: 503 only when the loop's heartbeat (`heartbeat()`) is older than the stall timeout.
- `GET /metrics`: the service's Prometheus registry.

Dependencies either register an async check (`add_check`: run periodically with a timeout; raising
means down) or push their state (`report`, e.g. the Kafka loop on a broker error). Both update
`dp_dependency_up`. The server implements the Kafka loop's listener hooks (`assigned`, `heartbeat`).
A service adds routes of its own through `add_routes` or `app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from dataproc_shared.masking import mask_text
from dataproc_shared.metrics import CONTENT_TYPE, ServiceMetrics

CheckFn = Callable[[], Awaitable[object]]
DependencyState = Literal["up", "down", "unknown"]
OverallStatus = Literal["healthy", "degraded", "unhealthy"]

MAX_ERROR_CHARS = 300


def sanitize_error(error: BaseException | str | None) -> str | None:
    """A short, secret-free description of an error, fit to serve."""
    if error is None:
        return None
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        text = error
    text = mask_text(" ".join(text.split()))
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class DependencyStatus:
    """Last known state of one dependency."""

    name: str
    critical: bool
    status: DependencyState = "unknown"
    latency_ms: float | None = None
    last_error: str | None = None
    checked_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The dependency's entry in `/health`."""
        return {
            "status": self.status,
            "critical": self.critical,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "last_error": self.last_error,
            "checked_at": self.checked_at,
        }


@dataclass(frozen=True, slots=True)
class _Check:
    fn: CheckFn
    interval_s: float
    timeout_s: float


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HealthServer:
    """Health state of one service process and the aiohttp server that serves it."""

    def __init__(
        self,
        service: str,
        metrics: ServiceMetrics,
        *,
        instance_id: str = "",
        version: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        live_stall_timeout_s: float = 60.0,
        check_interval_s: float = 5.0,
        check_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.instance_id = instance_id
        self.version = version
        self.host = host
        self.port = port
        self.live_stall_timeout_s = live_stall_timeout_s
        self.check_interval_s = check_interval_s
        self.check_timeout_s = check_timeout_s
        self._clock = clock
        self._started_at = clock()
        self._last_beat = self._started_at
        self._ready = False
        self._assigned = 0
        self._deps: dict[str, DependencyStatus] = {}
        self._checks: dict[str, _Check] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/ready", self._ready_route)
        self.app.router.add_get("/live", self._live)
        self.app.router.add_get("/metrics", self._metrics)

    @classmethod
    def from_settings(cls, settings: Any, metrics: ServiceMetrics, **kwargs: Any) -> HealthServer:
        """A server configured from `Settings` (`http.host`, `http.port`, `loop.live_stall_timeout_s`)."""
        return cls(
            settings.service,
            metrics,
            instance_id=settings.instance_id,
            version=settings.version,
            host=settings.http.host,
            port=settings.http.port,
            live_stall_timeout_s=settings.loop.live_stall_timeout_s,
            **kwargs,
        )

    # ---- what the service tells us ----------------------------------------------------------------------

    def add_check(self, name: str, check: CheckFn, *, critical: bool = True,
                  interval_s: float | None = None, timeout_s: float | None = None) -> None:
        """Register an async check of dependency `name`, run periodically; raising means down."""
        self._checks[name] = _Check(
            check, interval_s or self.check_interval_s, timeout_s or self.check_timeout_s
        )
        self._deps.setdefault(name, DependencyStatus(name, critical))
        self._deps[name] = replace(self._deps[name], critical=critical)
        if self._runner is not None:
            self._start_check(name)

    def report(self, name: str, up: bool, error: BaseException | str | None = None, *,
               critical: bool | None = None, latency_ms: float | None = None) -> None:
        """Push the state of dependency `name` (registered on first report; critical by default)."""
        previous = self._deps.get(name)
        is_critical = critical if critical is not None else (previous.critical if previous else True)
        self._deps[name] = DependencyStatus(
            name=name,
            critical=is_critical,
            status="up" if up else "down",
            latency_ms=latency_ms,
            last_error=None if up else sanitize_error(error) or "down",
            checked_at=_now_iso(),
        )
        self.metrics.set_dependency(name, up)

    def set_ready(self, ready: bool = True) -> None:
        """The service has started (connected, assigned) - or is going away (`False`)."""
        self._ready = ready

    def assigned(self, partitions: Collection[tuple[str, int]]) -> None:
        """Loop listener hook: the group assignment completed (state restored); the service is ready.

        An empty assignment counts too: an instance without partitions still serves its routes.
        """
        self._assigned = len(partitions)
        self._ready = True

    def heartbeat(self) -> None:
        """The processing loop is alive (call at least every `live_stall_timeout_s`)."""
        self._last_beat = self._clock()
        self.metrics.heartbeat()

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Add a service's own routes (before `start`)."""
        self.app.add_routes(list(routes))

    # ---- state -------------------------------------------------------------------------------------------

    def dependencies(self) -> dict[str, DependencyStatus]:
        """Current state of every dependency."""
        return dict(self._deps)

    def is_live(self) -> bool:
        """Whether the loop's heartbeat is recent enough."""
        return self._clock() - self._last_beat <= self.live_stall_timeout_s

    def is_ready(self) -> bool:
        """Started, and no critical dependency down (or not yet checked)."""
        return self._ready and all(d.status == "up" for d in self._deps.values() if d.critical)

    def status(self) -> OverallStatus:
        """Overall status of the service."""
        deps = self._deps.values()
        if not self.is_live() or any(d.critical and d.status == "down" for d in deps):
            return "unhealthy"
        if not self._ready or any(d.status != "up" for d in deps):
            return "degraded"
        return "healthy"

    def snapshot(self) -> dict[str, Any]:
        """The `/health` document."""
        return {
            "status": self.status(),
            "service": self.service,
            "instance_id": self.instance_id,
            "version": self.version,
            "ready": self.is_ready(),
            "live": self.is_live(),
            "uptime_s": round(self._clock() - self._started_at, 3),
            "assigned_partitions": self._assigned,
            "dependencies": {name: dep.as_json() for name, dep in sorted(self._deps.items())},
        }

    # ---- checks ------------------------------------------------------------------------------------------

    async def run_check(self, name: str) -> DependencyStatus:
        """Run the check of `name` once, record and return its outcome."""
        check = self._checks[name]
        started = time.perf_counter()
        error: BaseException | str | None = None
        try:
            await asyncio.wait_for(check.fn(), timeout=check.timeout_s)
        except TimeoutError:
            error = f"no answer within {check.timeout_s:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of a check means the dependency is down
            error = exc
        latency = (time.perf_counter() - started) * 1000
        self.report(name, error is None, error, latency_ms=latency)
        return self._deps[name]

    async def _check_loop(self, name: str) -> None:
        while True:
            await self.run_check(name)
            await asyncio.sleep(self._checks[name].interval_s)

    def _start_check(self, name: str) -> None:
        old = self._tasks.pop(name, None)
        if old is not None:
            old.cancel()
        self._tasks[name] = asyncio.create_task(self._check_loop(name), name=f"health-check-{name}")

    # ---- server ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the port and start the periodic checks. `port` then holds the bound port."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break
        for name in self._checks:
            self._start_check(name)

    async def stop(self) -> None:
        """Stop the checks and the server."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- routes ------------------------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        body = self.snapshot()
        return web.json_response(body, status=503 if body["status"] == "unhealthy" else 200)

    async def _ready_route(self, _request: web.Request) -> web.Response:
        ready = self.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _live(self, _request: web.Request) -> web.Response:
        live = self.is_live()
        since = round(self._clock() - self._last_beat, 3)
        return web.json_response({"live": live, "since_heartbeat_s": since}, status=200 if live else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
