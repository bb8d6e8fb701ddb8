"""Runs the projection's writes in Redis: an atomic compare-and-set Lua script, pipelined per batch.

A chunk of `HashWrite`s / `SeriesWrite`s is one `EVALSHA` of a script that applies the rules of
`projection.transform` to each write atomically (compare the order key, write, publish the
announcement), so concurrent or replayed writers cannot move a key backwards. One call per chunk
rather than per write keeps the client's cost per write small (measured: the per-command packing of
redis-py dominated otherwise). Every key is declared in `KEYS`; a chunk may span hash slots, so a
Redis Cluster deployment would need chunks grouped by slot.

The script is loaded once and re-loaded when Redis answers `NOSCRIPT` (after a restart or
`SCRIPT FLUSH`); only the chunks that hit `NOSCRIPT` are re-sent, and because every write is
idempotent re-sending is safe.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from projection.transform import UPDATES_CHANNEL, HashWrite, KeyType, Write

# One script call applies a chunk of writes, in order, each atomically (the whole call is atomic).
# KEYS[i]: the key of write i. ARGV[1]: the channel. ARGV[2]: JSON array, write i as
#   {"o": order field, "r": order, "a": announcement, "f": [name, value, ...], "d": [name, ...],
#    "m": [name, integer, ...]}                                       (hash compare-and-set), or
#   {"s": score, "v": version, "b": member, "n": max length, "a": announcement}   (final-bar set).
# Every value travels as a string except "v" and "n" (small integers). Returns 1/0 per write.
APPLY_WRITES = """
local function int_lt(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then return na end
  if #a ~= #b then
    if na then return #a > #b end
    return #a < #b
  end
  if na then return a > b end
  return a < b
end

local function hash_cas(key, w)
  local names = {w.o}
  for i = 1, #w.m, 2 do names[#names + 1] = w.m[i] end
  local cur = redis.call('HMGET', key, unpack(names))
  local stored_order = cur[1]
  if stored_order then
    if stored_order > w.r then return 0 end
    if stored_order == w.r then
      local fnames = {}
      for i = 1, #w.f, 2 do fnames[#fnames + 1] = w.f[i] end
      local fvalues = redis.call('HMGET', key, unpack(fnames))
      local same = true
      for i = 1, #fnames do
        if fvalues[i] ~= w.f[2 * i] then same = false break end
      end
      if same then
        for i = 1, #w.d do
          if redis.call('HEXISTS', key, w.d[i]) == 1 then same = false break end
        end
      end
      if same then return 0 end
    end
  end
  local args = {w.o, w.r}
  for i = 1, #w.f do args[#args + 1] = w.f[i] end
  for i = 1, #w.m, 2 do
    local stored = cur[(i + 1) / 2 + 1]
    if not stored or int_lt(stored, w.m[i + 1]) then
      args[#args + 1] = w.m[i]
      args[#args + 1] = w.m[i + 1]
    end
  end
  redis.call('HSET', key, unpack(args))
  if #w.d > 0 then redis.call('HDEL', key, unpack(w.d)) end
  return 1
end

local function series_cas(key, w)
  local existing = redis.call('ZRANGEBYSCORE', key, w.s, w.s)
  for _, m in ipairs(existing) do
    if m == w.b then return 0 end
    local ok, bar = pcall(cjson.decode, m)
    if ok and type(bar) == 'table' then
      local v = tonumber(bar['version'])
      if v and v > w.v then return 0 end
    end
  end
  if #existing > 0 then redis.call('ZREMRANGEBYSCORE', key, w.s, w.s) end
  redis.call('ZADD', key, w.s, w.b)
  redis.call('ZREMRANGEBYRANK', key, 0, -(w.n + 1))
  if not redis.call('ZSCORE', key, w.b) then return 0 end
  return 1
end

local writes = cjson.decode(ARGV[2])
local out = {}
for i, w in ipairs(writes) do
  local applied
  if w.o then applied = hash_cas(KEYS[i], w) else applied = series_cas(KEYS[i], w) end
  if applied == 1 then redis.call('PUBLISH', ARGV[1], w.a) end
  out[i] = applied
end
return out
"""


def redis_client(url: str, *, ssl: dict[str, Any] | None = None, socket_timeout_s: float = 5.0) -> Redis:
    """An asyncio Redis client that reconnects and retries a command a few times on connection errors.

    Retrying is safe because every write of the projection is idempotent. `ssl` holds redis-py's TLS
    keyword arguments (`ssl_ca_certs`, ...) when TLS is configured apart from a `rediss://` URL.
    """
    return Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=30,
        **(ssl or {}),
    )


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """How many writes of a flush applied and how many were refused as stale, per key type."""

    applied: Counter[KeyType] = field(default_factory=Counter)
    stale: Counter[KeyType] = field(default_factory=Counter)


def _key_type(write: Write) -> KeyType:
    return write.key_type if isinstance(write, HashWrite) else KeyType.BARS


class RedisProjectionSink:
    """Applies batches of writes to Redis through the compare-and-set scripts."""

    def __init__(self, client: Redis, *, channel: str = UPDATES_CHANNEL, chunk_size: int = 500) -> None:
        self._client = client
        self._channel = channel
        self._chunk = chunk_size
        self._sha = _sha1(APPLY_WRITES)
        self._loaded = False

    async def load_scripts(self) -> None:
        """Load the script into Redis (idempotent; its SHA1 is fixed)."""
        await self._client.script_load(APPLY_WRITES)
        self._loaded = True

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        return bool(await self._client.ping())

    async def apply(self, writes: Sequence[Write]) -> WriteOutcome:
        """Apply `writes` in order and return what applied; raises on connection errors.

        The writes go in chunks of `chunk_size`, one script call per chunk, pipelined in one round
        trip. When this returns, every write is in Redis or was refused as stale.
        """
        outcome = WriteOutcome()
        if not writes:
            return outcome
        if not self._loaded:
            await self.load_scripts()
        chunks = [list(writes[i:i + self._chunk]) for i in range(0, len(writes), self._chunk)]
        while chunks:
            results = await self._run(chunks)
            retry = [c for c, r in zip(chunks, results, strict=True) if isinstance(r, NoScriptError)]
            for chunk, result in zip(chunks, results, strict=True):
                if isinstance(result, NoScriptError):
                    continue
                if isinstance(result, BaseException):
                    raise result
                for write, applied in zip(chunk, result, strict=True):  # type: ignore[call-overload]
                    (outcome.applied if applied == 1 else outcome.stale)[_key_type(write)] += 1
            if retry:
                await self.load_scripts()
            chunks = retry
        return outcome

    async def _run(self, chunks: list[list[Write]]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for chunk in chunks:
            payload = orjson.dumps([_encode(w) for w in chunk])
            pipe.evalsha(self._sha, len(chunk), *(w.key for w in chunk), self._channel, payload)
        return list(await pipe.execute(raise_on_error=False))


def _encode(write: Write) -> dict[str, Any]:
    """A write as the script's JSON (strings only where Lua must not round numbers)."""
    if isinstance(write, HashWrite):
        return {
            "o": write.order_field,
            "r": write.order,
            "a": write.announcement.decode(),
            "f": [part for pair in write.fields for part in pair],
            "d": list(write.deletes),
            "m": [part for name, number in write.maxima for part in (name, str(number))],
        }
    return {"s": str(write.score), "v": write.version, "b": write.member, "n": write.max_len,
            "a": write.announcement.decode()}
