"""`python -m projection` as a real process against the real broker and Redis."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Producer
from dataproc_shared import avro
from projection.transform import (
    HashWrite,
    apply_hash_write,
    apply_series_write,
    bar_from_record,
    bar_writes,
    tick_from_record,
    tick_writes,
)

pytestmark = pytest.mark.integration

PARTITIONS = 2
T0_NS = 1_763_908_200_000_000_000
MINUTE_MS = 60_000


def tick_record(iid: str, ts_ns: int, rnd: random.Random) -> dict[str, Any]:
    kind = "TRADE" if rnd.random() < 0.5 else "QUOTE"
    bid = round(rnd.uniform(90, 100), 2) if kind == "QUOTE" and rnd.random() < 0.8 else None
    ask = round(rnd.uniform(100, 110), 2) if kind == "QUOTE" and (bid is None or rnd.random() < 0.7) else None
    return {
        "instrument_id": iid, "venue": "XTST", "venue_symbol": iid.upper(), "symbol": iid,
        "asset_class": "equity", "currency": "USD", "tick_size": 0.01, "multiplier": None,
        "venue_timezone": "UTC", "kind": kind,
        "ts_ns": ts_ns, "seq": rnd.choice([None, rnd.randrange(10)]),
        "trade_id": f"T{rnd.randrange(10**6)}" if kind == "TRADE" and rnd.random() < 0.5 else None,
        "price": round(rnd.uniform(95, 105), 2) if kind == "TRADE" else None,
        "size": float(rnd.randrange(1, 100)) if kind == "TRADE" else None,
        "bid": bid, "ask": ask,
        "bid_size": float(rnd.randrange(0, 50)) if bid is not None else None,
        "ask_size": float(rnd.randrange(0, 50)) if ask is not None else None,
        "ingest_ns": ts_ns, "source_partition": 0, "source_offset": 0,
    }


def bar_record(iid: str, interval: str, window: int, version: int, is_final: bool) -> dict[str, Any]:
    length = {"1m": MINUTE_MS, "5m": 5 * MINUTE_MS}[interval]
    start = T0_NS // 1_000_000 // length * length + window * length
    close = 100 + window + version / 10
    return {
        "instrument_id": iid, "venue": "XTST", "symbol": iid, "currency": "USD", "interval": interval,
        "window_start_ms": start, "window_end_ms": start + length, "open": 100.0, "high": close + 1,
        "low": 99.0, "close": close, "volume": 10.0 * version, "vwap": 100.5, "trade_count": version,
        "is_final": is_final, "version": version, "first_ts_ns": start * 1_000_000,
        "last_ts_ns": start * 1_000_000 + version, "max_ingest_ns": 0, "source_partition": 0,
        "offset_from": 0, "offset_to": version,
    }


def make_stream(prefix: str, instruments: int, ticks_per: int, windows: int,
                seed: int = 1) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, instrument, record) in the order an upstream would emit them; ts goes back now and then."""
    rnd = random.Random(seed)
    out: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(instruments):
        iid = f"{prefix}-{i}"
        ts = T0_NS
        for _ in range(ticks_per):
            ts += rnd.choice([0, 1_000, 250_000_000])
            late = ts - rnd.randrange(1, 10**9) if rnd.random() < 0.1 else ts  # out-of-order ticks
            out.append(("tick", iid, tick_record(iid, late, rnd)))
        for interval in ("1m", "5m"):
            for w in range(windows):
                versions = rnd.randrange(1, 4)
                for v in range(1, versions + 1):
                    out.append(("bar", iid, bar_record(iid, interval, w, v, False)))
                out.append(("bar", iid, bar_record(iid, interval, w, versions + 1, True)))
    # interleave instruments, keeping each instrument's order
    by_iid: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for item in out:
        by_iid.setdefault(item[1], []).append(item)
    mixed: list[tuple[str, str, dict[str, Any]]] = []
    while by_iid:
        iid = rnd.choice(sorted(by_iid))
        mixed.append(by_iid[iid].pop(0))
        if not by_iid[iid]:
            del by_iid[iid]
    return mixed


class Feed:
    """Produces the stream to the two input topics and keeps what the projection must end up as."""

    def __init__(self, bootstrap: str, ticks_topic: str, bars_topic: str, max_final_bars: int) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        self.ticks_topic, self.bars_topic = ticks_topic, bars_topic
        self.max_final_bars = max_final_bars
        self.model: dict[str, Any] = {}
        self.produced = 0

    def send(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        delivered: list[tuple[int, str, dict[str, Any]]] = []

        def report(kind: str, record: dict[str, Any]) -> Callable[[Any, Any], None]:
            def cb(err: Any, msg: Any) -> None:
                assert err is None, err
                delivered.append((msg.offset(), kind, record))
            return cb

        for kind, iid, record in items:
            partition = int(iid.rsplit("-", 1)[1]) % PARTITIONS
            topic, schema = (
                (self.ticks_topic, "enriched_tick") if kind == "tick" else (self.bars_topic, "bar"))
            self.producer.produce(topic, key=f"XTST:{iid.upper()}".encode(),
                                  value=avro.encode(schema, record), partition=partition,
                                  on_delivery=report(kind, record))
            self.producer.poll(0)
        assert self.producer.flush(30) == 0
        self.produced += len(items)
        for offset, kind, record in delivered:  # delivery order = per-partition offset order
            writes = (tick_writes(tick_from_record(record), arrival=offset) if kind == "tick"
                      else bar_writes(bar_from_record(record), self.max_final_bars))
            for w in writes:
                if isinstance(w, HashWrite):
                    apply_hash_write(self.model.setdefault(w.key, {}), w)
                else:
                    apply_series_write(self.model.setdefault(w.key, {}), w)

    def expected(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if v}


def snapshot(client: redis.Redis, prefix: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for raw in client.scan_iter(match=f"md:*:{prefix}-*", count=1000):
        key = raw.decode()
        if key.startswith("md:bars:"):
            state[key] = {m.decode(): int(s) for m, s in client.zrange(key, 0, -1, withscores=True)}
        else:
            state[key] = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
    return state


def wait_state(client: redis.Redis, prefix: str, expected: dict[str, Any], svc: Any,
               timeout: float = 90) -> None:
    svc.wait_for(lambda: snapshot(client, prefix) == expected, timeout, "the expected Redis state")


@pytest.fixture
def topics(topic_factory: Callable[..., str]) -> dict[str, str]:
    return {
        "ticks": topic_factory("enriched", partitions=PARTITIONS),
        "bars": topic_factory("bars", partitions=PARTITIONS),
        "deadletter": topic_factory("dlq", partitions=1),
        "audit": topic_factory("audit", partitions=1),
    }


def service_env(topics: dict[str, str], redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "DATA_PROC_TOPICS__ENRICHED": topics["ticks"],
        "DATA_PROC_TOPICS__BARS": topics["bars"],
        "DATA_PROC_TOPICS__DEADLETTER": topics["deadletter"],
        "DATA_PROC_AUDIT_KAFKA_TOPIC": topics["audit"],
        "DATA_PROC_KAFKA__GROUP_ID": f"projection-test-{uuid.uuid4().hex[:8]}",
        "DATA_PROC_INSTANCE_ID": f"test-{uuid.uuid4().hex[:8]}",
        "DATA_PROC_REDIS_URL": redis_url,
        "DATA_PROC_LOOP__TICK_INTERVAL_MS": "200",
        "DATA_PROC_PROJECTION__MAX_FINAL_BARS": "3",
        **extra,
    }


def test_projects_known_input_exactly_and_a_replay_changes_nothing(
    kafka_bootstrap: str, redis_url: str, topics: dict[str, str], instrument_prefix: str, service_factory: Any
) -> None:
    client = redis.Redis.from_url(redis_url)
    feed = Feed(kafka_bootstrap, topics["ticks"], topics["bars"], max_final_bars=3)
    feed.send(make_stream(instrument_prefix, instruments=4, ticks_per=120, windows=5))
    # one hand-made instrument with known values
    iid = f"{instrument_prefix}-9"
    trade = tick_record(iid, T0_NS + 5, random.Random(0)) | {
        "kind": "TRADE", "price": 101.5, "size": 7.0, "seq": 3, "trade_id": "X-1",
        "bid": None, "ask": None, "bid_size": None, "ask_size": None}
    older = trade | {"ts_ns": T0_NS + 4, "price": 1.0, "trade_id": "OLD"}
    final_bar = bar_record(iid, "1m", 0, 2, True)
    feed.send([("tick", iid, trade), ("tick", iid, older), ("bar", iid, final_bar),
               ("bar", iid, bar_record(iid, "1m", 0, 1, False))])
    env = service_env(topics, redis_url)
    svc = service_factory(env)
    svc.start()
    wait_state(client, instrument_prefix, feed.expected(), svc)

    state = snapshot(client, instrument_prefix)
    tick = state[f"md:tick:{iid}"]
    assert (tick["trade_price"], tick["trade_size"], tick["trade_id"], tick["ts"]) == (
        "101.5", "7.0", "X-1", str(T0_NS + 5))
    latest = state[f"md:bar:{iid}:1m"]
    assert (latest["version"], latest["is_final"], latest["close"]) == ("2", "1", "100.2")
    [member] = state[f"md:bars:{iid}:1m"]
    assert orjson.loads(member)["version"] == 2
    assert all(len(v) <= 3 for k, v in state.items() if k.startswith("md:bars:"))
    assert svc.metric("dp_redis_writes_total", outcome="applied") > 0
    status, body = svc.get("/health")
    health = json.loads(body)
    assert status == 200
    assert health["dependencies"]["redis"]["status"] == "up"
    assert redis_url.split("@")[0].split(":")[-1] not in body.decode()  # the password is never served
    assert svc.stop() == 0

    # a second consumer group replays the whole input: nothing applies, nothing is announced
    pubsub = client.pubsub()
    pubsub.subscribe("md:updates")
    replay = service_factory(env | {"DATA_PROC_KAFKA__GROUP_ID": f"projection-replay-{uuid.uuid4().hex[:8]}"})
    replay.start()
    replay.wait_for(lambda: replay.metric("dp_messages_in_total") >= feed.produced, 90, "the replay")
    replay.wait_for(lambda: replay.metric("dp_transactions_total", outcome="committed") > 0, 30, "a commit")
    time.sleep(1.0)
    assert replay.metric("dp_redis_writes_total", outcome="applied") == 0
    assert replay.metric("dp_redis_writes_total", outcome="stale") > 0
    assert snapshot(client, instrument_prefix) == state
    announced = []
    while (msg := pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
        if orjson.loads(msg["data"])["instrument_id"].startswith(instrument_prefix):
            announced.append(msg)
    assert announced == []
    pubsub.close()
    assert replay.stop() == 0


def test_kill9_and_restart_gives_the_same_state(
    kafka_bootstrap: str, redis_url: str, topics: dict[str, str], instrument_prefix: str, service_factory: Any
) -> None:
    client = redis.Redis.from_url(redis_url)
    feed = Feed(kafka_bootstrap, topics["ticks"], topics["bars"], max_final_bars=3)
    stream = make_stream(instrument_prefix, instruments=6, ticks_per=250, windows=6, seed=2)
    half = len(stream) // 2
    feed.send(stream[:half])
    env = service_env(topics, redis_url, DATA_PROC_LOOP__BATCH_SIZE="40")
    svc = service_factory(env)
    svc.start()
    svc.wait_for(lambda: svc.metric("dp_messages_in_total") >= half // 3, 60, "some progress")
    svc.kill9()
    feed.send(stream[half:])
    again = service_factory(env)
    again.start()
    wait_state(client, instrument_prefix, feed.expected(), again)
    assert again.stop() == 0


def test_redis_restart_mid_stream_gives_the_same_state(
    kafka_bootstrap: str, topics: dict[str, str], instrument_prefix: str, service_factory: Any,
    private_redis: Any
) -> None:
    client = redis.Redis.from_url(private_redis.url)
    feed = Feed(kafka_bootstrap, topics["ticks"], topics["bars"], max_final_bars=3)
    stream = make_stream(instrument_prefix, instruments=4, ticks_per=200, windows=5, seed=3)
    half = len(stream) // 2
    feed.send(stream[:half])
    env = service_env(topics, private_redis.url, DATA_PROC_PROJECTION__RETRY_MAX_MS="500",
                      DATA_PROC_PROJECTION__FLUSH_DEADLINE_S="3")
    svc = service_factory(env)
    svc.start()
    wait_state(client, instrument_prefix, feed.expected(), svc)
    private_redis.kill()

    def redis_down() -> bool:
        status, body = svc.get("/health")
        return status == 503 and json.loads(body)["dependencies"]["redis"]["status"] == "down"

    feed.send(stream[half:])
    svc.wait_for(redis_down, 30, "/health to report Redis down")
    assert svc.get("/live")[0] == 200  # the process is alive, it waits for Redis
    time.sleep(4)  # past the flush deadline: at least one abort and replay
    private_redis.start()
    wait_state(client, instrument_prefix, feed.expected(), svc)
    svc.wait_for(lambda: svc.get("/health")[0] == 200, 30, "/health to recover")
    assert svc.metric("dp_transactions_total", outcome="aborted") >= 1
    assert svc.stop() == 0


def test_redis_down_at_start_waits_then_projects(
    kafka_bootstrap: str, topics: dict[str, str], instrument_prefix: str, service_factory: Any,
    private_redis: Any
) -> None:
    private_redis.kill()  # Redis is not there when the service starts
    client = redis.Redis.from_url(private_redis.url)
    feed = Feed(kafka_bootstrap, topics["ticks"], topics["bars"], max_final_bars=3)
    feed.send(make_stream(instrument_prefix, instruments=2, ticks_per=50, windows=2, seed=5))
    svc = service_factory(service_env(topics, private_redis.url, DATA_PROC_PROJECTION__RETRY_MAX_MS="500"))
    svc.start(wait_ready=False)

    def redis_down() -> bool:
        status, body = svc.get("/health")
        return status == 503 and json.loads(body)["dependencies"]["redis"]["status"] == "down"

    svc.wait_for(redis_down, 60, "/health to report Redis down")
    assert svc.get("/ready")[0] == 503
    assert svc.get("/live")[0] == 200
    time.sleep(3)
    assert svc.proc is not None
    assert svc.proc.poll() is None  # still there, waiting
    private_redis.start()
    wait_state(client, instrument_prefix, feed.expected(), svc)
    svc.wait_for(lambda: svc.get("/ready")[0] == 200, 30, "ready once Redis is up")
    assert svc.stop() == 0
