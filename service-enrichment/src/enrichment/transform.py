"""Pure enrichment logic: the reference-data cache and the join of ticks against it.

Nothing here does I/O. The cache is an in-memory index of the `venues` and `instruments` tables,
changed by whole snapshots (`ReferenceCache.load`) or by single row changes
(`ReferenceCache.apply`). `Enricher.enrich` turns a batch of consumed records into a `BatchResult`,
or into a `Hold` when a record cannot be decided because the cache is not known to be current (the
reference database is unreachable): such a batch must wait, never be dead-lettered as unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dataproc_shared.records import (
    AuditEvent,
    BatchResult,
    DeadLetter,
    DeadLetterReason,
    InRecord,
    OutRecord,
)

AvroDecoder = Callable[[bytes], Mapping[str, Any]]
#: Encodes the output message of one tick: (input bytes, decoded tick, instrument, venue) -> bytes.
AvroEncoder = Callable[[bytes, Mapping[str, Any], "Instrument", "Venue"], bytes]

#: Tick fields copied unchanged from `normalized_tick.v1` to `enriched_tick.v1`.
TICK_FIELDS: tuple[str, ...] = (
    "kind",
    "ts_ns",
    "seq",
    "trade_id",
    "price",
    "size",
    "bid",
    "ask",
    "bid_size",
    "ask_size",
    "ingest_ns",
    "source_partition",
    "source_offset",
)


class RefTable(StrEnum):
    """The reference tables the cache mirrors."""

    VENUES = "venues"
    INSTRUMENTS = "instruments"


class ChangeOp(StrEnum):
    """Kinds of row change. `deactivate` is an update that turned `active` off."""

    INSERT = "insert"
    UPDATE = "update"
    DEACTIVATE = "deactivate"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Venue:
    """One row of `venues`."""

    mic: str
    name: str
    timezone: str
    active: bool


@dataclass(frozen=True, slots=True)
class Instrument:
    """One row of `instruments`."""

    instrument_id: str
    venue: str
    venue_symbol: str
    symbol: str
    asset_class: str
    currency: str
    tick_size: float | None
    multiplier: float | None
    active: bool

    @property
    def listing(self) -> tuple[str, str]:
        """The (`venue`, `venue_symbol`) pair a tick is resolved by."""
        return (self.venue, self.venue_symbol)


Row = Venue | Instrument


@dataclass(frozen=True, slots=True)
class ReferenceSnapshot:
    """Both tables as read at one moment."""

    venues: tuple[Venue, ...]
    instruments: tuple[Instrument, ...]


@dataclass(frozen=True, slots=True)
class RowChange:
    """A change of one row as announced by the database: the new row, or `None` for a delete."""

    table: RefTable
    key: str
    row: Row | None


@dataclass(frozen=True, slots=True)
class AppliedChange:
    """A change that altered the cache, classified for metrics and audit."""

    table: RefTable
    op: ChangeOp
    key: str
    before: Row | None
    after: Row | None


class Resolution(StrEnum):
    """How one tick's (`venue`, `symbol`) resolved."""

    FOUND = "found"
    UNKNOWN = "unknown"
    INACTIVE = "inactive"


@dataclass(frozen=True, slots=True)
class Lookup:
    """Result of a lookup: the instrument and its venue when found and active."""

    resolution: Resolution
    instrument: Instrument | None = None
    venue: Venue | None = None
    detail: str = ""


def _classify(before: Row | None, after: Row | None) -> ChangeOp:
    if after is None:
        return ChangeOp.DELETE
    if before is None:
        return ChangeOp.INSERT
    if before.active and not after.active:
        return ChangeOp.DEACTIVATE
    return ChangeOp.UPDATE


class ReferenceCache:
    """In-memory index of the reference tables, keyed for tick lookups.

    Venues are indexed by MIC, instruments by id and by (`venue`, `venue_symbol`). A lookup joins an
    instrument with its venue at lookup time, so a venue change applies to all its instruments at once.
    """

    def __init__(self) -> None:
        self._venues: dict[str, Venue] = {}
        self._instruments: dict[str, Instrument] = {}
        self._by_listing: dict[tuple[str, str], Instrument] = {}

    @property
    def venue_count(self) -> int:
        """Number of cached venues."""
        return len(self._venues)

    @property
    def instrument_count(self) -> int:
        """Number of cached instruments."""
        return len(self._instruments)

    def venue(self, mic: str) -> Venue | None:
        """The cached venue `mic`, if any."""
        return self._venues.get(mic)

    def instrument(self, instrument_id: str) -> Instrument | None:
        """The cached instrument `instrument_id`, if any."""
        return self._instruments.get(instrument_id)

    def snapshot(self) -> ReferenceSnapshot:
        """The cache's content, sorted by key."""
        return ReferenceSnapshot(
            venues=tuple(self._venues[k] for k in sorted(self._venues)),
            instruments=tuple(self._instruments[k] for k in sorted(self._instruments)),
        )

    def load(self, snapshot: ReferenceSnapshot) -> list[AppliedChange]:
        """Replace the content with `snapshot`; return how it differs from what was cached."""
        venues = {v.mic: v for v in snapshot.venues}
        instruments = {i.instrument_id: i for i in snapshot.instruments}
        changes = _diff(RefTable.VENUES, self._venues, venues)
        changes.extend(_diff(RefTable.INSTRUMENTS, self._instruments, instruments))
        self._venues = venues
        self._instruments = instruments
        self._by_listing = {i.listing: i for i in instruments.values()}
        return changes

    def apply(self, change: RowChange) -> AppliedChange | None:
        """Apply one row change; `None` when it changes nothing (e.g. a repeated notification)."""
        if change.table is RefTable.VENUES:
            return self._apply_venue(change)
        return self._apply_instrument(change)

    def _apply_venue(self, change: RowChange) -> AppliedChange | None:
        before = self._venues.get(change.key)
        after = change.row
        if after is not None and not isinstance(after, Venue):
            raise TypeError(f"venues change carries {type(after).__name__}")
        if before == after:
            return None
        if after is None:
            del self._venues[change.key]
        else:
            self._venues[change.key] = after
        return AppliedChange(RefTable.VENUES, _classify(before, after), change.key, before, after)

    def _apply_instrument(self, change: RowChange) -> AppliedChange | None:
        before = self._instruments.get(change.key)
        after = change.row
        if after is not None and not isinstance(after, Instrument):
            raise TypeError(f"instruments change carries {type(after).__name__}")
        if before == after:
            return None
        if before is not None and self._by_listing.get(before.listing) is before:
            del self._by_listing[before.listing]
        if after is None:
            del self._instruments[change.key]
        else:
            self._instruments[change.key] = after
            self._by_listing[after.listing] = after
        return AppliedChange(RefTable.INSTRUMENTS, _classify(before, after), change.key, before, after)

    def resolve(self, venue: str, venue_symbol: str) -> tuple[Instrument, Venue] | None:
        """The instrument and its venue when `lookup` would find them (both known and active), else None.

        The per-tick fast path: nothing is allocated beyond the result; `lookup` says why not.
        """
        instrument = self._by_listing.get((venue, venue_symbol))
        if instrument is None or not instrument.active:
            return None
        venue_row = self._venues.get(instrument.venue)
        if venue_row is None or not venue_row.active:
            return None
        return instrument, venue_row

    def lookup(self, venue: str, venue_symbol: str) -> Lookup:
        """Resolve a tick's (`venue`, `symbol`) against (`venue`, `venue_symbol`)."""
        instrument = self._by_listing.get((venue, venue_symbol))
        if instrument is None:
            return Lookup(Resolution.UNKNOWN, detail=f"no instrument for {venue}:{venue_symbol}")
        venue_row = self._venues.get(instrument.venue)
        if venue_row is None:
            return Lookup(Resolution.UNKNOWN, detail=f"venue {instrument.venue} unknown")
        if not instrument.active:
            return Lookup(
                Resolution.INACTIVE, instrument, venue_row, f"instrument {instrument.instrument_id} inactive"
            )
        if not venue_row.active:
            return Lookup(Resolution.INACTIVE, instrument, venue_row, f"venue {venue_row.mic} inactive")
        return Lookup(Resolution.FOUND, instrument, venue_row)


def _diff(table: RefTable, old: Mapping[str, Row], new: Mapping[str, Row]) -> list[AppliedChange]:
    changes: list[AppliedChange] = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before != after:
            changes.append(AppliedChange(table, _classify(before, after), key, before, after))
    return changes


def enriched_value(tick: Mapping[str, Any], instrument: Instrument, venue: Venue) -> dict[str, Any]:
    """The `enriched_tick.v1` record for a normalized tick and its resolved instrument."""
    out: dict[str, Any] = {
        "instrument_id": instrument.instrument_id,
        "venue": instrument.venue,
        "venue_symbol": instrument.venue_symbol,
        "symbol": instrument.symbol,
        "asset_class": instrument.asset_class,
        "currency": instrument.currency,
        "tick_size": instrument.tick_size,
        "multiplier": instrument.multiplier,
        "venue_timezone": venue.timezone,
    }
    for name in TICK_FIELDS:
        out[name] = tick.get(name)
    return out


@dataclass(frozen=True, slots=True)
class Hold:
    """A batch that cannot be decided yet: these records missed a cache that is not known current."""

    waiting: tuple[InRecord, ...]

    @property
    def first(self) -> InRecord:
        """The first record that has to wait."""
        return self.waiting[0]


def audit_for_change(change: AppliedChange, *, source: str) -> AuditEvent:
    """The audit event recorded for one reference-data change applied to the cache."""
    instrument = ""
    if change.table is RefTable.INSTRUMENTS:
        row = change.after or change.before
        if isinstance(row, Instrument):
            instrument = row.instrument_id
    return AuditEvent(
        event_type="reference_change",
        instrument=instrument,
        details={
            "table": change.table.value,
            "op": change.op.value,
            "key": change.key,
            "source": source,
            "before": _row_details(change.before),
            "after": _row_details(change.after),
        },
    )


def _row_details(row: Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    if isinstance(row, Venue):
        return {"mic": row.mic, "name": row.name, "timezone": row.timezone, "active": row.active}
    return {
        "instrument_id": row.instrument_id,
        "venue": row.venue,
        "venue_symbol": row.venue_symbol,
        "symbol": row.symbol,
        "asset_class": row.asset_class,
        "currency": row.currency,
        "tick_size": row.tick_size,
        "multiplier": row.multiplier,
        "active": row.active,
    }


class Enricher:
    """Joins batches of normalized ticks with a `ReferenceCache`.

    Output records keep the input key, partition and headers (plus, when `event_time_header` is
    given, that header with the tick's event time in ns as ASCII digits), and name their input as
    `source` (the loop takes the tracing headers from it). A tick that does not
    decode becomes an `undecodable` dead letter; an unknown or inactive instrument becomes an
    `unknown_instrument` / `inactive_instrument` dead letter, but only when the cache is current:
    otherwise the whole batch is returned as a `Hold`, so nothing is produced or committed past a
    record that cannot be decided.
    """

    def __init__(
        self,
        cache: ReferenceCache,
        *,
        output_topic: str,
        decode: AvroDecoder,
        encode: AvroEncoder,
        event_time_header: str | None = None,
    ) -> None:
        self._cache = cache
        self._output_topic = output_topic
        self._decode = decode
        self._encode = encode
        self._event_time_header = event_time_header

    def enrich(self, batch: Sequence[InRecord], *, cache_current: bool) -> BatchResult | Hold:
        """Enrich `batch`, or return `Hold` when a record misses a cache that is not known current."""
        result = BatchResult()
        outputs, dead_letters = result.outputs, result.dead_letters
        waiting: list[InRecord] = []
        resolve = self._cache.resolve
        encode = self._encode
        topic = self._output_topic
        event_header = self._event_time_header
        for record in batch:
            if record.value is None:
                result.dead_letters.append(
                    DeadLetter(record, DeadLetterReason.UNDECODABLE, "record has no value")
                )
                continue
            try:
                tick = self._decode(record.value)
                venue, symbol = tick["venue"], tick["symbol"]
            except Exception as exc:  # any decoding failure is a property of the data
                result.dead_letters.append(
                    DeadLetter(record, DeadLetterReason.UNDECODABLE, f"{type(exc).__name__}: {exc}")
                )
                continue
            resolved = resolve(venue, symbol)
            if resolved is not None:
                headers = record.headers
                if event_header is not None:
                    headers = (*headers, (event_header, b"%d" % tick["ts_ns"]))
                outputs.append(
                    OutRecord(topic, record.key, encode(record.value, tick, *resolved), record.partition,
                              headers, record)
                )
                continue
            found = self._cache.lookup(venue, symbol)
            if not cache_current:
                waiting.append(record)
            elif found.resolution is Resolution.UNKNOWN:
                dead_letters.append(DeadLetter(record, DeadLetterReason.UNKNOWN_INSTRUMENT, found.detail))
            else:
                dead_letters.append(DeadLetter(record, DeadLetterReason.INACTIVE_INSTRUMENT, found.detail))
        if waiting:
            return Hold(tuple(waiting))
        return result

    def audit_changes(self, changes: Iterable[AppliedChange], *, source: str) -> list[AuditEvent]:
        """Audit events for applied reference changes (`source`: `notify` or `refresh`)."""
        return [audit_for_change(c, source=source) for c in changes]


class NotificationError(ValueError):
    """A reference-change notification that cannot be understood."""


@dataclass(frozen=True, slots=True)
class ReloadRequest:
    """A notification that asks for a full reload (e.g. a table was truncated)."""

    table: RefTable


def venue_from_row(row: Mapping[str, Any]) -> Venue:
    """A `Venue` from a `venues` row (database record or JSON object)."""
    return Venue(
        mic=str(row["mic"]),
        name=str(row["name"] or ""),
        timezone=str(row["timezone"] or "UTC"),
        active=bool(row["active"]),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def instrument_from_row(row: Mapping[str, Any]) -> Instrument:
    """An `Instrument` from an `instruments` row (database record or JSON object)."""
    return Instrument(
        instrument_id=str(row["instrument_id"]),
        venue=str(row["venue"]),
        venue_symbol=str(row["venue_symbol"]),
        symbol=str(row["symbol"] or row["venue_symbol"]),
        asset_class=str(row["asset_class"] or ""),
        currency=str(row["currency"] or "").strip(),
        tick_size=_optional_float(row["tick_size"]),
        multiplier=_optional_float(row["multiplier"]),
        active=bool(row["active"]),
    )


def parse_notification(payload: Mapping[str, Any]) -> RowChange | ReloadRequest:
    """Turn a decoded `reference_changes` payload into a row change or a reload request.

    Payload (written by the triggers of `migrations/postgres/002_reference_notify.sql`):
    `{"table": "venues"|"instruments", "op": "INSERT"|"UPDATE"|"DELETE"|"TRUNCATE", "key": ...,
    "row": {...}}`.
    """
    try:
        table = RefTable(payload["table"])
        op = str(payload["op"]).upper()
        if op == "TRUNCATE":
            return ReloadRequest(table)
        key = str(payload["key"])
        row = payload.get("row")
        if op == "DELETE":
            return RowChange(table, key, None)
        if op not in ("INSERT", "UPDATE") or not isinstance(row, Mapping):
            raise NotificationError(f"unsupported notification op={op!r} row={type(row).__name__}")
        parsed: Row = venue_from_row(row) if table is RefTable.VENUES else instrument_from_row(row)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, NotificationError):
            raise
        raise NotificationError(f"bad notification: {type(exc).__name__}: {exc}") from exc
    return RowChange(table, key, parsed)
