"""Runs the projection's writes in Redis: atomic compare-and-set Lua scripts, pipelined per batch.

Each `HashWrite` / `SeriesWrite` is one `EVALSHA` of a script that applies the rules of
`projection.transform` atomically (compare the order key, write, publish the announcement), so
concurrent or replayed writers cannot move a key backwards. The scripts are loaded once per connection
target and re-loaded when Redis answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`); only the
writes that hit `NOSCRIPT` are re-sent, and because every write is idempotent re-sending is safe.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from projection.transform import UPDATES_CHANNEL, HashWrite, KeyType, Write

# KEYS[1] hash. ARGV: order_field, order, channel, announcement, #fields, #deletes, #maxima,
# then (name, value) * #fields, name * #deletes, (name, integer) * #maxima.
HASH_CAS = """
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
local key, ofield, ord = KEYS[1], ARGV[1], ARGV[2]
local nf, nd, nm = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local fi = 8
local di = fi + 2 * nf
local mi = di + nd
local cur = redis.call('HGET', key, ofield)
if cur then
  if cur > ord then return 0 end
  if cur == ord then
    local same = true
    for i = fi, di - 1, 2 do
      if redis.call('HGET', key, ARGV[i]) ~= ARGV[i + 1] then same = false break end
    end
    if same then
      for i = di, mi - 1 do
        if redis.call('HEXISTS', key, ARGV[i]) == 1 then same = false break end
      end
    end
    if same then return 0 end
  end
end
local args = {ofield, ord}
for i = fi, di - 1 do args[#args + 1] = ARGV[i] end
redis.call('HSET', key, unpack(args))
if nd > 0 then redis.call('HDEL', key, unpack(ARGV, di, mi - 1)) end
for i = mi, mi + 2 * nm - 1, 2 do
  local stored = redis.call('HGET', key, ARGV[i])
  if not stored or int_lt(stored, ARGV[i + 1]) then redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS[1] sorted set. ARGV: score, version, member, max_len, channel, announcement.
SERIES_CAS = """
local key, score, version, member = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local existing = redis.call('ZRANGEBYSCORE', key, score, score)
for _, m in ipairs(existing) do
  if m == member then return 0 end
  local ok, bar = pcall(cjson.decode, m)
  if ok and type(bar) == 'table' then
    local v = tonumber(bar['version'])
    if v and v > version then return 0 end
  end
end
if #existing > 0 then redis.call('ZREMRANGEBYSCORE', key, score, score) end
redis.call('ZADD', key, score, member)
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[4]) + 1))
if not redis.call('ZSCORE', key, member) then return 0 end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
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

    def __init__(self, client: Redis, *, channel: str = UPDATES_CHANNEL, chunk_size: int = 2000) -> None:
        self._client = client
        self._channel = channel
        self._chunk = chunk_size
        self._hash_sha = _sha1(HASH_CAS)
        self._series_sha = _sha1(SERIES_CAS)
        self._loaded = False

    async def load_scripts(self) -> None:
        """Load both scripts into Redis (idempotent; their SHA1s are fixed)."""
        await self._client.script_load(HASH_CAS)
        await self._client.script_load(SERIES_CAS)
        self._loaded = True

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        return bool(await self._client.ping())

    def _args(self, write: Write) -> tuple[str, list[str | bytes | int]]:
        if isinstance(write, HashWrite):
            args: list[str | bytes | int] = [
                write.order_field, write.order, self._channel, write.announcement,
                len(write.fields), len(write.deletes), len(write.maxima),
            ]
            for name, value in write.fields:
                args += (name, value)
            args += write.deletes
            for name, number in write.maxima:
                args += (name, str(number))
            return self._hash_sha, args
        return self._series_sha, [write.score, write.version, write.member, write.max_len,
                                  self._channel, write.announcement]

    async def apply(self, writes: Sequence[Write]) -> WriteOutcome:
        """Apply `writes` (pipelined, in order) and return what applied; raises on connection errors.

        When this returns, every write is in Redis or was refused as stale.
        """
        outcome = WriteOutcome()
        if not self._loaded:
            await self.load_scripts()
        for start in range(0, len(writes), self._chunk):
            todo = list(writes[start:start + self._chunk])
            while todo:
                results = await self._run(todo)
                retry = [w for w, r in zip(todo, results, strict=True) if isinstance(r, NoScriptError)]
                for write, result in zip(todo, results, strict=True):
                    if isinstance(result, NoScriptError):
                        continue
                    if isinstance(result, BaseException):
                        raise result
                    (outcome.applied if result == 1 else outcome.stale)[_key_type(write)] += 1
                if retry:
                    await self.load_scripts()
                todo = retry
        return outcome

    async def _run(self, writes: list[Write]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for write in writes:
            sha, args = self._args(write)
            pipe.evalsha(sha, 1, write.key, *args)
        return list(await pipe.execute(raise_on_error=False))
