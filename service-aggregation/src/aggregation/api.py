"""The read API on aggregation's HTTP port: bars, latest bar, summary and audit events from ClickHouse.

In the local setup aggregation owns the embedded ClickHouse engine, so this is how people, dashboards
and tests read it. Every bar query reads `FINAL` (one row per bar, its highest version). Routes (all
`GET`, JSON unless `format=csv`; a bad parameter gets a 400 with `{"error": reason}`):

- `/api/v1/bars?instrument=ID&interval=1m[&from=T][&to=T][&final=true|false][&limit=N][&format=csv]`:
  bars of one instrument and interval with `from <= window_start < to`, oldest first. `T` is an
  ISO-8601 time (UTC without an offset) or epoch milliseconds. `final=true` (default) returns only
  closed bars, `final=false` also the open ones (their latest update).
- `/api/v1/bars/latest?instrument=ID&interval=1m[&final=true|false]`: the newest bar (404 if none).
- `/api/v1/summary`: per interval, the number of instruments, final bars and open bars, and the
  earliest and latest window end of the open bars (`first_open_end_ms`, `last_open_end_ms`; null
  when none is open).
- `/api/v1/audit?[service=S][&event_type=E][&instrument=I][&from=T][&to=T][&limit=N]`: audit events,
  newest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from dataproc_shared.clickhouse import ClickHouseClient, ClickHouseError

_BAR_SELECT = (
    "SELECT instrument_id, interval, toUnixTimestamp64Milli(window_start) AS window_start_ms, "
    "toUnixTimestamp64Milli(window_end) AS window_end_ms, venue, symbol, currency, open, high, low, close, "
    "volume, vwap, trade_count, is_final, version, toUnixTimestamp64Nano(first_trade_ts) AS first_trade_ns, "
    "toUnixTimestamp64Nano(last_trade_ts) AS last_trade_ns, source_partition, offset_from, offset_to "
    "FROM market_data.bars FINAL"
)
_AUDIT_SELECT = (
    "SELECT event_id, toUnixTimestamp64Milli(event_time) AS event_time_ms, service, event_type, "
    "environment, correlation_id, instrument, source_topic, source_partition, offset_from, "
    "offset_to, outcome, reason, details FROM market_data.audit_events FINAL"
)
_NAME = re.compile(r"^[A-Za-z0-9_.:\-/ ]{1,200}$")
_INTERVAL = re.compile(r"^[1-9][0-9]*(ms|s|m|h|d)$")
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class BadRequestError(ValueError):
    """A parameter of a read API request is wrong; the message says which and why."""


def parse_time_ms(name: str, text: str) -> int:
    """Epoch milliseconds from an ISO-8601 time (UTC if no offset) or an integer of epoch ms."""
    text = text.strip()
    if re.fullmatch(r"-?[0-9]+", text):
        value = int(text)
    else:
        try:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequestError(f"{name}: not an ISO-8601 time or epoch milliseconds: {text!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        value = int(moment.timestamp() * 1000)
    if not 0 <= value <= MAX_MS:
        raise BadRequestError(f"{name}: out of range: {text!r}")
    return value


def _flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise BadRequestError(f"{name}: expected true or false, got {raw!r}")


def _text(query: Mapping[str, str], name: str, *, required: bool = False,
          pattern: re.Pattern[str] = _NAME) -> str | None:
    raw = query.get(name)
    if raw is None or raw == "":
        if required:
            raise BadRequestError(f"{name}: required")
        return None
    if not pattern.match(raw):
        raise BadRequestError(f"{name}: invalid value {raw[:50]!r}")
    return raw


def _limit(query: Mapping[str, str], max_rows: int) -> int:
    raw = query.get("limit")
    if raw is None:
        return max_rows
    if not raw.isdigit() or not 1 <= int(raw) <= max_rows:
        raise BadRequestError(f"limit: expected an integer from 1 to {max_rows}, got {raw!r}")
    return int(raw)


def bars_query(query: Mapping[str, str], max_rows: int) -> tuple[str, dict[str, Any], str]:
    """SQL, parameters and output format of a `/api/v1/bars` request; raises `BadRequestError`."""
    instrument = _text(query, "instrument", required=True)
    interval = _text(query, "interval", required=True, pattern=_INTERVAL)
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequestError(f"format: expected json or csv, got {fmt!r}")
    params: dict[str, Any] = {"instrument": instrument, "interval": interval}
    where = ["instrument_id = {instrument:String}", "interval = {interval:String}"]
    if "from" in query:
        params["from_ms"] = parse_time_ms("from", query["from"])
        where.append("window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')")
    if "to" in query:
        params["to_ms"] = parse_time_ms("to", query["to"])
        where.append("window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')")
    if "from_ms" in params and "to_ms" in params and params["from_ms"] > params["to_ms"]:
        raise BadRequestError("from: later than to")
    if _flag(query, "final", True):
        where.append("is_final = 1")
    limit = _limit(query, max_rows)
    sql = f"{_BAR_SELECT} WHERE {' AND '.join(where)} ORDER BY window_start LIMIT {limit}"
    return sql, params, fmt


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _bar_json(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["is_final"] = bool(row["is_final"])
    out["window_start"] = _iso(int(row["window_start_ms"]))
    out["window_end"] = _iso(int(row["window_end_ms"]))
    return out


def _iso(ms: int) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReadApi:
    """aiohttp handlers over a ClickHouse client (queries run in worker threads)."""

    def __init__(self, client: ClickHouseClient, max_rows: int = 10_000) -> None:
        self._client = client
        self._max_rows = max_rows

    def routes(self) -> list[web.RouteDef]:
        """The API's routes, for `HealthServer.add_routes`."""
        return [
            web.get("/api/v1/bars", self.bars),
            web.get("/api/v1/bars/latest", self.latest),
            web.get("/api/v1/summary", self.summary),
            web.get("/api/v1/audit", self.audit),
        ]

    async def _query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            result = await asyncio.to_thread(self._client.query, sql, params)
        except ClickHouseError as exc:
            raise web.HTTPServiceUnavailable(
                body=orjson.dumps({"error": f"clickhouse: {str(exc)[:200]}"}),
                content_type="application/json",
            ) from exc
        return result.dicts()

    async def bars(self, request: web.Request) -> web.Response:
        """Bars of one instrument and interval in a time range."""
        try:
            sql, params, fmt = bars_query(request.query, self._max_rows)
        except BadRequestError as exc:
            return _json({"error": str(exc)}, 400)
        rows = [_bar_json(r) for r in await self._query(sql, params)]
        if fmt == "csv":
            buf = io.StringIO()
            columns = list(rows[0]) if rows else ["instrument_id", "interval", "window_start_ms"]
            writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            return web.Response(text=buf.getvalue(), content_type="text/csv")
        return _json({"instrument": params["instrument"], "interval": params["interval"], "bars": rows})

    async def latest(self, request: web.Request) -> web.Response:
        """The newest bar of one instrument and interval."""
        q = request.query
        try:
            instrument = _text(q, "instrument", required=True)
            interval = _text(q, "interval", required=True, pattern=_INTERVAL)
            final = _flag(q, "final", False)
        except BadRequestError as exc:
            return _json({"error": str(exc)}, 400)
        where = "instrument_id = {instrument:String} AND interval = {interval:String}"
        if final:
            where += " AND is_final = 1"
        sql = f"{_BAR_SELECT} WHERE {where} ORDER BY window_start DESC LIMIT 1"
        rows = await self._query(sql, {"instrument": instrument, "interval": interval})
        if not rows:
            return _json({"error": "no bar"}, 404)
        return _json(_bar_json(rows[0]))

    async def summary(self, _request: web.Request) -> web.Response:
        """Instruments and bar counts per interval, and the window ends of the open bars."""
        rows = await self._query(
            "SELECT interval, uniqExact(instrument_id) AS instruments, countIf(is_final = 1) AS final_bars, "
            "countIf(is_final = 0) AS open_bars, "
            "toUnixTimestamp64Milli(max(window_start)) AS latest_window_ms, "
            "toUnixTimestamp64Milli(minIf(window_end, is_final = 0)) AS first_open_end_ms, "
            "toUnixTimestamp64Milli(maxIf(window_end, is_final = 0)) AS last_open_end_ms "
            "FROM market_data.bars FINAL GROUP BY interval ORDER BY interval", {})
        for row in rows:
            if not int(row["open_bars"]):  # minIf/maxIf of no rows give the epoch
                row["first_open_end_ms"] = row["last_open_end_ms"] = None
        total = await self._query("SELECT uniqExact(instrument_id) AS n FROM market_data.bars", {})
        return _json({"instruments": int(total[0]["n"]) if total else 0, "intervals": rows})

    async def audit(self, request: web.Request) -> web.Response:
        """Audit events, newest first, filtered by service, type, instrument and time."""
        q = request.query
        try:
            params: dict[str, Any] = {}
            where: list[str] = []
            for name, column in (("service", "service"), ("event_type", "event_type"),
                                 ("instrument", "instrument"), ("reason", "reason")):
                value = _text(q, name)
                if value is not None:
                    params[name] = value
                    where.append(f"{column} = {{{name}:String}}")
            if "from" in q:
                params["from_ms"] = parse_time_ms("from", q["from"])
                where.append("event_time >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')")
            if "to" in q:
                params["to_ms"] = parse_time_ms("to", q["to"])
                where.append("event_time < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')")
            limit = _limit(q, self._max_rows)
        except BadRequestError as exc:
            return _json({"error": str(exc)}, 400)
        # Values are bound parameters; only fixed column conditions and an integer limit are formatted in.
        conditions = f" WHERE {' AND '.join(where)}" if where else ""
        sql = _AUDIT_SELECT + conditions + f" ORDER BY event_time DESC, event_id LIMIT {limit}"
        rows = await self._query(sql, params)
        for r in rows:
            with contextlib.suppress(orjson.JSONDecodeError):
                r["details"] = orjson.loads(r["details"]) if r["details"] else {}
        return _json({"events": rows})
