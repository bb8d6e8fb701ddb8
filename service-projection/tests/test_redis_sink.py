from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
import redis.exceptions
from projection.redis_sink import RedisProjectionSink, redis_client
from projection.transform import (
    Bar,
    HashWrite,
    KeyType,
    PendingWrites,
    Tick,
    Write,
    apply_hash_write,
    apply_series_write,
    bar_writes,
    tick_writes,
)
from redis.asyncio import Redis

pytestmark = pytest.mark.integration

TS = 1_763_908_200_123_456_789
W0 = 1_763_908_200_000


def trade(iid: str, ts: int, price: float, seq: int | None = None, trade_id: str | None = None) -> Tick:
    return Tick(instrument_id=iid, venue="XNYM", symbol="CLZ6", currency="USD", is_trade=True, ts_ns=ts,
                seq=seq, trade_id=trade_id, price=price, size=2.0)


def quote(iid: str, ts: int, bid: float | None, ask: float | None) -> Tick:
    return Tick(instrument_id=iid, venue="XNYM", symbol="CLZ6", currency="USD", is_trade=False, ts_ns=ts,
                bid=bid, ask=ask, bid_size=None if bid is None else 5.0,
                ask_size=None if ask is None else 6.0)


def bar(iid: str, window: int, version: int, is_final: bool, close: float = 10.5) -> Bar:
    start = W0 + window * 60_000
    return Bar(instrument_id=iid, venue="XNYM", symbol="CLZ6", currency="USD", interval="1m",
               window_start_ms=start, window_end_ms=start + 60_000, open=10.0, high=11.0, low=9.5,
               close=close, volume=4.0, vwap=10.25, trade_count=2, is_final=is_final, version=version,
               first_ts_ns=start * 1_000_000, last_ts_ns=start * 1_000_000 + 7)


async def snapshot(client: Redis, prefix: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    async for raw in client.scan_iter(match=f"md:*{prefix}*", count=1000):
        key = raw.decode()
        if key.startswith("md:bars:"):
            items = await client.zrange(key, 0, -1, withscores=True)
            state[key] = {m.decode(): int(s) for m, s in items}
        else:
            state[key] = {k.decode(): v.decode() for k, v in (await client.hgetall(key)).items()}
    return state


def model(writes: list[Write]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for w in writes:
        if isinstance(w, HashWrite):
            apply_hash_write(state.setdefault(w.key, {}), w)
        else:
            apply_series_write(state.setdefault(w.key, {}), w)
    return {k: v for k, v in state.items() if v}


class Announcements:
    """Collects `md:updates` messages about one test's instruments."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.pubsub = client.pubsub()
        self.prefix = prefix
        self.messages: list[dict[str, Any]] = []

    async def __aenter__(self) -> Announcements:
        await self.pubsub.subscribe("md:updates")
        await self.pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        return self

    async def drain(self) -> list[dict[str, Any]]:
        while (msg := await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)) is not None:
            body = orjson.loads(msg["data"])
            if str(body["instrument_id"]).startswith(self.prefix):
                self.messages.append(body)
        out, self.messages = self.messages, []
        return out

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()


async def test_known_ticks_and_bars_exact_state(stack_redis: Redis, instrument_prefix: str) -> None:
    iid = f"{instrument_prefix}-CL"
    sink = RedisProjectionSink(stack_redis)
    writes: list[Write] = [
        *tick_writes(trade(iid, TS, 71.25, seq=3, trade_id="T-1")),
        *tick_writes(quote(iid, TS + 10, 71.2, 71.3)),
        *tick_writes(quote(iid, TS + 20, None, 71.28)),
        *bar_writes(bar(iid, 0, 1, False)),
        *bar_writes(bar(iid, 0, 2, True, close=10.75)),
        *bar_writes(bar(iid, 1, 1, False, close=11.0)),
    ]
    async with Announcements(stack_redis, instrument_prefix) as ann:
        outcome = await sink.apply(writes)
        messages = await ann.drain()
    assert outcome.applied == {KeyType.TICK: 4, KeyType.BAR: 3, KeyType.BARS: 1}
    assert not outcome.stale
    state = await snapshot(stack_redis, instrument_prefix)
    tick = state[f"md:tick:{iid}"]
    assert {k: v for k, v in tick.items() if not k.startswith("_")} == {
        "instrument_id": iid, "venue": "XNYM", "symbol": "CLZ6", "currency": "USD",
        "ts": str(TS + 20), "quote_ts": str(TS + 20),
        "trade_ts": str(TS), "trade_price": "71.25", "trade_size": "2.0", "trade_seq": "3", "trade_id": "T-1",
        "bid_ts": str(TS + 10), "bid": "71.2", "bid_size": "5.0",
        "ask_ts": str(TS + 20), "ask": "71.28", "ask_size": "6.0",
    }
    latest = state[f"md:bar:{iid}:1m"]
    assert (latest["window_start"], latest["version"], latest["is_final"], latest["close"]) == (
        str(W0 + 60_000), "1", "0", "11.0")
    [(member, score)] = state[f"md:bars:{iid}:1m"].items()
    assert score == W0
    assert orjson.loads(member)["close"] == 10.75
    assert orjson.loads(member)["version"] == 2
    assert state == model(writes)
    assert [(m["type"], m.get("side"), m.get("version")) for m in messages] == [
        ("tick", "trade", None), ("tick", "bid", None), ("tick", "ask", None), ("tick", "ask", None),
        ("bar", None, 1), ("bar", None, 2), ("bars", None, 2), ("bar", None, 1)]


async def test_older_over_newer_refused_and_not_announced(stack_redis: Redis, instrument_prefix: str) -> None:
    iid = f"{instrument_prefix}-CL"
    sink = RedisProjectionSink(stack_redis)
    newer: list[Write] = [*tick_writes(trade(iid, TS, 2.0, seq=5)), *bar_writes(bar(iid, 3, 4, True))]
    older: list[Write] = [
        *tick_writes(trade(iid, TS, 1.0, seq=4)),        # same time, lower seq
        *tick_writes(trade(iid, TS - 1, 1.0, seq=99)),   # earlier time
        *bar_writes(bar(iid, 3, 3, True, close=1.0)),    # lower version, same window (hash + set)
        *bar_writes(bar(iid, 2, 9, False, close=1.0)),   # older window, higher version
    ]
    await sink.apply(newer)
    before = await snapshot(stack_redis, instrument_prefix)
    async with Announcements(stack_redis, instrument_prefix) as ann:
        outcome = await sink.apply(older)
        assert await ann.drain() == []
    assert not outcome.applied
    assert outcome.stale == {KeyType.TICK: 2, KeyType.BAR: 2, KeyType.BARS: 1}
    assert await snapshot(stack_redis, instrument_prefix) == before


async def test_random_streams_match_model_and_replay_is_a_no_op(
    stack_redis: Redis, instrument_prefix: str
) -> None:
    rnd = random.Random(7)
    writes: list[Write] = []
    for i in range(400):
        iid = f"{instrument_prefix}-{rnd.randrange(4)}"
        r = rnd.random()
        if r < 0.4:
            tick = trade(iid, TS + rnd.randrange(50), rnd.uniform(1, 2), seq=rnd.choice([None, 1, 2]))
            writes += tick_writes(tick, arrival=i)
        elif r < 0.7:
            tick = quote(iid, TS + rnd.randrange(50), rnd.choice([None, 1.0 + i]), 3.0 + i)
            writes += tick_writes(tick, arrival=i)
        else:
            window, version = rnd.randrange(12), rnd.randrange(1, 5)
            # an emission's version identifies its content
            emitted = bar(iid, window, version, rnd.random() < 0.5, close=window * 10.0 + version)
            writes += bar_writes(emitted, max_final_bars=5)
    sink = RedisProjectionSink(stack_redis, chunk_size=37)
    pending = PendingWrites()
    for start in range(0, len(writes), 64):  # batches, coalesced like the service does
        pending.extend(writes[start:start + 64])
        await sink.apply(pending.writes())
        pending.clear()
    expected = model(writes)
    state = await snapshot(stack_redis, instrument_prefix)
    assert state == expected
    assert all(len(v) <= 5 for k, v in state.items() if k.startswith("md:bars:"))
    async with Announcements(stack_redis, instrument_prefix) as ann:
        outcome = await sink.apply(writes)
        assert await ann.drain() == []
    assert not outcome.applied
    assert await snapshot(stack_redis, instrument_prefix) == expected


async def test_scripts_reloaded_after_flush_and_restart(private_redis: Any, instrument_prefix: str) -> None:
    client = redis_client(private_redis.url)
    try:
        sink = RedisProjectionSink(client)
        iid = f"{instrument_prefix}-X"
        await sink.apply(tick_writes(trade(iid, TS, 1.0)))
        await client.script_flush()
        outcome = await sink.apply([*tick_writes(trade(iid, TS + 1, 2.0)), *bar_writes(bar(iid, 0, 1, True))])
        assert outcome.applied == {KeyType.TICK: 1, KeyType.BAR: 1, KeyType.BARS: 1}
        private_redis.restart()  # scripts are gone, data is kept (append-only file)
        outcome = await sink.apply(tick_writes(trade(iid, TS + 2, 3.0)))
        assert outcome.applied == {KeyType.TICK: 1}
        assert await client.hget(f"md:tick:{iid}", "trade_price") == b"3.0"
        again = await sink.apply(bar_writes(bar(iid, 0, 1, True)))
        assert again.stale == {KeyType.BAR: 1, KeyType.BARS: 1}
    finally:
        await client.aclose()


async def test_connection_error_raises_and_nothing_partial_is_lost(
    private_redis: Any, instrument_prefix: str
) -> None:
    client = redis_client(private_redis.url, socket_timeout_s=2)
    try:
        sink = RedisProjectionSink(client)
        iid = f"{instrument_prefix}-X"
        writes = [w for i in range(50) for w in tick_writes(trade(iid, TS + i, float(i)))]
        private_redis.kill()
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            await sink.apply(writes)
        private_redis.start()
        outcome = await sink.apply(writes)  # the retry of the whole batch
        assert outcome.applied[KeyType.TICK] + outcome.stale[KeyType.TICK] == 50
        assert await client.hget(f"md:tick:{iid}", "trade_price") == b"49.0"
    finally:
        await client.aclose()
