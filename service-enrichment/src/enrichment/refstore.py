"""Keeps the in-process `ReferenceCache` in step with PostgreSQL.

One supervisor task owns one asyncpg connection: it `LISTEN`s on `reference_changes` (the triggers of
`migrations/postgres/002_reference_notify.sql`), loads both tables, applies every notification as it
arrives, pings the connection and reloads everything every `refresh_interval_s` as a safety net. When
the connection is lost it reconnects with exponential backoff and reloads (changes made meanwhile
were not announced to it). Notifications that arrive while a load runs are held and applied after
the loaded snapshot, in order, so none is lost between `LISTEN` and the snapshot.

The cache is *current* while the connection is up and listening after a successful load: only then
can a miss be trusted as an unknown instrument. While PostgreSQL is unreachable the cache keeps
serving what it has, and `current` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from enrichment.transform import (
    AppliedChange,
    Instrument,
    NotificationError,
    ReferenceCache,
    ReferenceSnapshot,
    ReloadRequest,
    Venue,
    instrument_from_row,
    parse_notification,
    venue_from_row,
)

log = structlog.get_logger(__name__)

#: PostgreSQL channel the reference triggers notify on.
CHANNEL = "reference_changes"

Connect = Callable[[str], Awaitable[asyncpg.Connection]]
#: Called with the changes applied to the cache and where they came from
#: (`initial`, `notify`, `refresh`, `reconnect`).
ChangeListener = Callable[[list[AppliedChange], str], None]

_VENUES_SQL = "SELECT mic, name, timezone, active FROM venues"
_INSTRUMENTS_SQL = (
    "SELECT instrument_id, venue, venue_symbol, symbol, asset_class, currency, tick_size, multiplier, "
    "active FROM instruments"
)
_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    ConnectionError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Timing of the reference store."""

    refresh_interval_s: float = 60.0
    ping_interval_s: float = 2.0
    connect_timeout_s: float = 5.0
    query_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What health checks need to know of the store."""

    loaded: bool
    connected: bool
    current: bool
    venues: int
    instruments: int
    last_load_age_s: float | None
    last_error: str


def _describe(exc: BaseException) -> str:
    """An error description without connection details (no DSN, no password)."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} (sqlstate {exc.sqlstate})"
    return type(exc).__name__


class ReferenceStore:
    """Loads the reference tables into a `ReferenceCache` and keeps it current. See the module doc."""

    def __init__(
        self,
        dsn: str,
        cache: ReferenceCache,
        *,
        options: StoreOptions = StoreOptions(),
        on_changes: ChangeListener | None = None,
        connect: Connect | None = None,
    ) -> None:
        self._dsn = dsn
        self._cache = cache
        self._options = options
        self._on_changes = on_changes
        self._connect: Connect = connect or _default_connect
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._loaded = asyncio.Event()
        self._current = asyncio.Event()
        self._reload = asyncio.Event()
        self._connected = False
        self._loading = False
        self._buffer: list[str] = []
        self._last_load: float | None = None
        self._last_error = ""
        self._reconnects = 0
        self._was_up = False
        self._failures = 0

    # ---- state --------------------------------------------------------------------------------

    @property
    def cache(self) -> ReferenceCache:
        """The cache this store maintains."""
        return self._cache

    @property
    def loaded(self) -> bool:
        """Whether the cache has been loaded at least once (readiness)."""
        return self._loaded.is_set()

    @property
    def current(self) -> bool:
        """Whether a miss can be trusted: connected, listening, and loaded since connecting."""
        return self._current.is_set()

    def status(self) -> StoreStatus:
        """A snapshot of the store's state for health reporting."""
        age = None if self._last_load is None else time.monotonic() - self._last_load
        return StoreStatus(
            loaded=self.loaded,
            connected=self._connected,
            current=self.current,
            venues=self._cache.venue_count,
            instruments=self._cache.instrument_count,
            last_load_age_s=age,
            last_error=self._last_error,
        )

    async def wait_loaded(self, within_s: float | None = None) -> bool:
        """Wait until the first load finished; False when `within_s` passed first."""
        return await _wait(self._loaded, within_s)

    async def wait_current(self, within_s: float | None = None) -> bool:
        """Wait until the cache is current again; False when `within_s` passed first."""
        return await _wait(self._current, within_s)

    def set_listener(self, on_changes: ChangeListener | None) -> None:
        """Set the function told about every change applied to the cache."""
        self._on_changes = on_changes

    def request_reload(self) -> None:
        """Ask for a full reload at the next opportunity."""
        self._reload.set()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor task (returns at once; see `wait_loaded`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="reference-store")

    async def close(self) -> None:
        """Stop the supervisor and close the connection."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> ReferenceStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- supervisor ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._options.backoff_initial_s
        while not self._closing:
            conn: asyncpg.Connection | None = None
            self._was_up = False
            try:
                conn = await asyncio.wait_for(self._connect(self._dsn), self._options.connect_timeout_s)
                await self._serve(conn)
            except asyncio.CancelledError:
                raise
            except _DB_ERRORS as exc:
                self._mark_down(exc, attempt=self._failures)
                self._failures += 1
            finally:
                self._current.clear()
                self._connected = False
                if conn is not None:
                    conn.terminate()
            if self._closing:
                break
            if self._was_up:
                backoff = self._options.backoff_initial_s
            delay = backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography
            log.debug("reference store reconnecting", delay_s=round(delay, 3), attempt=self._failures)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, self._options.backoff_max_s)
            self._reconnects += 1

    async def _serve(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        self._loading = True
        self._buffer = []
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            source = "reconnect" if self.loaded else "initial"
            await self._full_load(conn, source)
        finally:
            self._loading = False
        self._connected = True
        self._was_up = True
        self._failures = 0
        self._last_error = ""
        self._current.set()
        log.info(
            "reference data loaded",
            source=source,
            venues=self._cache.venue_count,
            instruments=self._cache.instrument_count,
        )
        opts = self._options
        next_refresh = time.monotonic() + opts.refresh_interval_s
        while not self._closing:
            timeout = max(0.0, min(opts.ping_interval_s, next_refresh - time.monotonic()))
            await _first_of(lost, self._reload, within_s=timeout)
            if lost.is_set():
                raise ConnectionError("connection to PostgreSQL lost")
            if self._reload.is_set() or time.monotonic() >= next_refresh:
                self._reload.clear()
                await self._full_load(conn, "refresh")
                next_refresh = time.monotonic() + opts.refresh_interval_s
            else:
                await conn.fetchval("SELECT 1", timeout=opts.query_timeout_s)

    async def _full_load(self, conn: asyncpg.Connection, source: str) -> None:
        """Load both tables in one snapshot, then apply notifications that arrived meanwhile."""
        self._loading = True
        self._buffer = []
        try:
            timeout = self._options.query_timeout_s
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                venue_rows = await conn.fetch(_VENUES_SQL, timeout=timeout)
                instrument_rows = await conn.fetch(_INSTRUMENTS_SQL, timeout=timeout)
            snapshot = ReferenceSnapshot(
                venues=tuple(_venue(r) for r in venue_rows),
                instruments=tuple(_instrument(r) for r in instrument_rows),
            )
            changes = self._cache.load(snapshot)
            if changes:
                self._emit(changes, source)
            buffered, self._buffer = self._buffer, []
        finally:
            self._loading = False
        for payload in buffered:
            self._handle(payload)
        self._last_load = time.monotonic()
        self._loaded.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        if self._loading:
            self._buffer.append(text)
        else:
            self._handle(text)

    def _handle(self, payload: str) -> None:
        try:
            decoded = json.loads(payload)
            if not isinstance(decoded, dict):
                raise NotificationError("payload is not an object")
            change = parse_notification(decoded)
        except (ValueError, NotificationError) as exc:
            log.warning("bad reference notification; reloading", error=str(exc))
            self.request_reload()
            return
        if isinstance(change, ReloadRequest):
            log.info("reference table truncated; reloading", table=change.table.value)
            self.request_reload()
            return
        applied = self._cache.apply(change)
        if applied is not None:
            self._emit([applied], "notify")

    def _emit(self, changes: list[AppliedChange], source: str) -> None:
        for change in changes if source != "initial" else ():
            log.info(
                "reference change applied",
                table=change.table.value,
                op=change.op.value,
                key=change.key,
                source=source,
            )
        if self._on_changes is not None:
            self._on_changes(changes, source)

    def _mark_down(self, exc: BaseException, *, attempt: int) -> None:
        """Record a failed connection; warn on the first failure of an outage, then every 30th."""
        self._last_error = _describe(exc)
        emit = log.warning if attempt % 30 == 0 else log.debug
        emit(
            "reference database unavailable; serving from cache",
            error=self._last_error,
            loaded=self.loaded,
            attempt=attempt + 1,
        )


async def _default_connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def _wait(event: asyncio.Event, within_s: float | None) -> bool:
    try:
        await asyncio.wait_for(event.wait(), within_s)
    except TimeoutError:
        return False
    return True


async def _first_of(*events: asyncio.Event, within_s: float) -> None:
    """Wait until one of `events` is set or `within_s` passes."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _venue(row: Any) -> Venue:
    return venue_from_row(row)


def _instrument(row: Any) -> Instrument:
    return instrument_from_row(row)
