"""Kafka's default partitioner, so an instrument lands on the partition any Java client would pick.

`partition_for(key, n) == toPositive(murmur2(key)) % n`, bit for bit as in
`org.apache.kafka.common.utils.Utils.murmur2` (and librdkafka's `murmur2` partitioner).
"""

from __future__ import annotations

from functools import lru_cache

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK32 = 0xFFFFFFFF


def murmur2(key: bytes) -> int:
    """Kafka's 32-bit murmur2 hash of `key`, as a signed Java int."""
    length = len(key)
    h = (_SEED ^ length) & _MASK32
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(key[i:i + 4], "little")
        k = (k * _M) & _MASK32
        k ^= k >> 24
        k = (k * _M) & _MASK32
        h = ((h * _M) & _MASK32) ^ k
    rest = length & 3
    if rest == 3:
        h ^= key[tail + 2] << 16
    if rest >= 2:
        h ^= key[tail + 1] << 8
    if rest >= 1:
        h ^= key[tail]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(value: int) -> int:
    """Java's `Utils.toPositive`: clear the sign bit."""
    return value & 0x7FFFFFFF


@lru_cache(maxsize=65_536)
def partition_for(key: bytes, partitions: int) -> int:
    """Partition of `key` among `partitions`, identical to Kafka's default (murmur2) partitioner."""
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    return to_positive(murmur2(key)) % partitions


def instrument_key(venue: str, symbol: str) -> bytes:
    """The canonical message key `VENUE:SYMBOL` (UTF-8) of every chain topic."""
    return f"{venue}:{symbol}".encode()
