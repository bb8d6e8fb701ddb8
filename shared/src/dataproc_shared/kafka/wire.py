"""A minimal Kafka wire-protocol client for the few admin requests librdkafka does not expose.

confluent-kafka 2.16 has no `DescribeProducers` and no `abortTransaction` (KIP-664), which is what
resolving a hanging transaction needs (`dataproc_shared.kafka.hanging`). This module speaks just
those requests over a blocking stdlib socket (PLAINTEXT or SSL), in their flexible versions:

| request | api key | version |
| --- | --- | --- |
| `ApiVersions` (checked once per connection) | 18 | 3 |
| `DescribeProducers` | 61 | 0 |
| `ListTransactions` | 66 | 0 |
| `DescribeTransactions` | 65 | 0 |
| `WriteTxnMarkers` | 27 | 1 |
| `InitProducerId` (tests only: a producer id for a hand-made transaction) | 22 | 4 |
| `Produce` (tests only: a transactional batch without its coordinator) | 0 | 9 |

Encoding follows the protocol guide: request header v2 (client id as a nullable int16 string, then
tagged fields), response header v1 (correlation id, tagged fields; `ApiVersions` answers with
header v0), compact strings/arrays (unsigned varint length + 1) and an empty tagged-field section
after every struct. Only the fields the callers read are decoded; the rest are skipped in order.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from dataproc_shared.errors import DataProcError

API_PRODUCE = 0
API_INIT_PRODUCER_ID = 22
API_WRITE_TXN_MARKERS = 27
API_API_VERSIONS = 18
API_DESCRIBE_PRODUCERS = 61
API_LIST_TRANSACTIONS = 66
API_DESCRIBE_TRANSACTIONS = 65

#: (api key, version) this client sends.
VERSIONS = {
    API_PRODUCE: 9, API_INIT_PRODUCER_ID: 4, API_WRITE_TXN_MARKERS: 1, API_API_VERSIONS: 3,
    API_DESCRIBE_PRODUCERS: 0, API_LIST_TRANSACTIONS: 0, API_DESCRIBE_TRANSACTIONS: 0,
}


class WireError(DataProcError):
    """A request failed: connection, unsupported version or a broker error code."""


# --- encoding --------------------------------------------------------------------------------


def uvarint(value: int) -> bytes:
    """Unsigned varint (protocol `UNSIGNED_VARINT`)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint(value: int) -> bytes:
    """Zig-zag signed varint (record fields)."""
    return uvarint((value << 1) ^ (value >> 63))


def compact_str(value: str | None) -> bytes:
    """`COMPACT_NULLABLE_STRING` (also `COMPACT_STRING` when not None)."""
    if value is None:
        return uvarint(0)
    raw = value.encode()
    return uvarint(len(raw) + 1) + raw


def compact_bytes(value: bytes | None) -> bytes:
    """`COMPACT_NULLABLE_BYTES` / `COMPACT_RECORDS`."""
    if value is None:
        return uvarint(0)
    return uvarint(len(value) + 1) + value


def compact_array(items: list[bytes]) -> bytes:
    """`COMPACT_ARRAY` of already encoded items."""
    return uvarint(len(items) + 1) + b"".join(items)


TAGS = b"\x00"  # an empty tagged-field section


class Reader:
    """Sequential decoder of a response body."""

    def __init__(self, data: bytes) -> None:
        """Decode `data` from its first byte."""
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise WireError("truncated response")
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def raw(self, n: int) -> bytes:
        """The next `n` bytes."""
        return self._take(n)

    def int8(self) -> int:
        """INT8 (also BOOLEAN)."""
        return int(struct.unpack(">b", self._take(1))[0])

    def int16(self) -> int:
        """INT16."""
        return int(struct.unpack(">h", self._take(2))[0])

    def int32(self) -> int:
        """INT32."""
        return int(struct.unpack(">i", self._take(4))[0])

    def int64(self) -> int:
        """INT64."""
        return int(struct.unpack(">q", self._take(8))[0])

    def uvarint(self) -> int:
        """UNSIGNED_VARINT."""
        shift = result = 0
        while True:
            byte = self._take(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    def compact_str(self) -> str | None:
        """COMPACT_NULLABLE_STRING."""
        n = self.uvarint()
        return None if n == 0 else self._take(n - 1).decode()

    def compact_len(self) -> int:
        """Length of a COMPACT_ARRAY (-1 for null)."""
        return self.uvarint() - 1

    def skip_tags(self) -> None:
        """Skip a tagged-field section."""
        for _ in range(self.uvarint()):
            self.uvarint()
            self._take(self.uvarint())


# --- CRC-32C (record batches) --------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of record batch v2."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def record_batch(values: list[tuple[bytes | None, bytes]], *, producer_id: int, producer_epoch: int,
                 base_sequence: int, transactional: bool, timestamp_ms: int) -> bytes:
    """An uncompressed record batch (magic 2) of `(key, value)` records."""
    records = bytearray()
    for delta, (key, value) in enumerate(values):
        body = (b"\x00" + varint(0) + varint(delta)
                + (varint(-1) if key is None else varint(len(key)) + key)
                + varint(len(value)) + value + varint(0))
        records += varint(len(body)) + body
    attributes = 0x10 if transactional else 0
    after_crc = (struct.pack(">hiqqqhii", attributes, len(values) - 1, timestamp_ms, timestamp_ms,
                             producer_id, producer_epoch, base_sequence, len(values)) + bytes(records))
    # baseOffset, batchLength, partitionLeaderEpoch, magic, crc, then the checksummed part
    header_rest = struct.pack(">ib", -1, 2) + struct.pack(">I", crc32c(after_crc))
    body = header_rest + after_crc
    return struct.pack(">qi", 0, len(body)) + body


# --- connection ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireSecurity:
    """How to reach the brokers: PLAINTEXT or SSL (SASL is not spoken by this client)."""

    protocol: str = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = None
    check_hostname: bool = True

    @property
    def supported(self) -> bool:
        """Whether this client can connect with these settings."""
        return self.protocol in ("PLAINTEXT", "SSL")


class Connection:
    """One blocking connection to one broker."""

    def __init__(self, host: str, port: int, *, security: WireSecurity | None = None,
                 timeout_s: float = 10.0, client_id: str = "dataproc-wire") -> None:
        """Connect to `host:port` and check that the broker accepts the versions in `VERSIONS`."""
        sec = security or WireSecurity()
        if not sec.supported:
            raise WireError(f"security protocol {sec.protocol} is not supported by the wire client")
        self._client_id = client_id
        self._correlation = 0
        raw = socket.create_connection((host, port), timeout=timeout_s)
        if sec.protocol == "SSL":
            ctx = ssl.create_default_context(cafile=sec.ca_file)
            ctx.check_hostname = sec.check_hostname
            if sec.cert_file:
                ctx.load_cert_chain(sec.cert_file, sec.key_file, sec.key_password)
            self._sock: socket.socket = ctx.wrap_socket(raw, server_hostname=host)
        else:
            self._sock = raw
        self._sock.settimeout(timeout_s)
        try:
            self._check_versions()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, api_key: int, body: bytes) -> Reader:
        """Send one request (header v2) and return a reader positioned at the response body."""
        version = VERSIONS[api_key]
        self._correlation += 1
        cid = self._client_id.encode()
        header = struct.pack(">hhih", api_key, version, self._correlation, len(cid)) + cid + TAGS
        payload = header + body
        self._sock.sendall(struct.pack(">i", len(payload)) + payload)
        size = struct.unpack(">i", self._recv(4))[0]
        reader = Reader(self._recv(size))
        if reader.int32() != self._correlation:
            raise WireError("response correlation id does not match")
        if api_key != API_API_VERSIONS:  # ApiVersions answers with response header v0
            reader.skip_tags()
        return reader

    def _recv(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self._sock.recv(n - len(chunks))
            if not chunk:
                raise WireError("connection closed by the broker")
            chunks += chunk
        return bytes(chunks)

    def _check_versions(self) -> None:
        body = compact_str("dataproc-wire") + compact_str("1") + TAGS
        r = self.request(API_API_VERSIONS, body)
        error = r.int16()
        if error:
            raise WireError(f"ApiVersions failed with error code {error}")
        supported: dict[int, tuple[int, int]] = {}
        for _ in range(r.compact_len()):
            key, low, high = r.int16(), r.int16(), r.int16()
            r.skip_tags()
            supported[key] = (low, high)
        for key, version in VERSIONS.items():
            low, high = supported.get(key, (1, 0))
            if not low <= version <= high:
                raise WireError(f"broker does not accept api {key} version {version} (range {low}..{high})")


# --- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveProducer:
    """One producer's state on a partition (`DescribeProducers`)."""

    producer_id: int
    producer_epoch: int
    last_sequence: int
    last_timestamp_ms: int
    coordinator_epoch: int
    #: first offset of the producer's open transaction on the partition, -1 when none is open
    current_txn_start_offset: int


def describe_producers(conn: Connection, topic: str, partitions: list[int]
                       ) -> dict[int, list[ActiveProducer]]:
    """Active producers per partition of `topic` (the connection must be to the partitions' leader)."""
    found, errors = describe_producers_many(conn, {topic: partitions})
    if errors:
        (t, partition), (error, message) = next(iter(errors.items()))
        raise WireError(f"DescribeProducers {t}[{partition}]: error code {error} {message or ''}")
    return {p: producers for (_t, p), producers in found.items()}


def describe_producers_many(conn: Connection, partitions: Mapping[str, list[int]]
                            ) -> tuple[dict[tuple[str, int], list[ActiveProducer]],
                                       dict[tuple[str, int], tuple[int, str | None]]]:
    """Active producers of several topics' partitions in one request (all led by `conn`'s broker).

    Returns the producers per (topic, partition) and, apart, the partitions the broker answered
    with an error (error code, message).
    """
    topic_reqs = [compact_str(topic) + compact_array([struct.pack(">i", p) for p in parts]) + TAGS
                  for topic, parts in partitions.items() if parts]
    r = conn.request(API_DESCRIBE_PRODUCERS, compact_array(topic_reqs) + TAGS)
    r.int32()  # throttle
    out: dict[tuple[str, int], list[ActiveProducer]] = {}
    errors: dict[tuple[str, int], tuple[int, str | None]] = {}
    for _ in range(r.compact_len()):
        topic = r.compact_str() or ""
        for _ in range(r.compact_len()):
            partition, error = r.int32(), r.int16()
            message = r.compact_str()
            producers = []
            for _ in range(r.compact_len()):
                producers.append(ActiveProducer(
                    producer_id=r.int64(), producer_epoch=r.int32(), last_sequence=r.int32(),
                    last_timestamp_ms=r.int64(), coordinator_epoch=r.int32(),
                    current_txn_start_offset=r.int64()))
                r.skip_tags()
            r.skip_tags()
            if error:
                errors[(topic, partition)] = (error, message)
            else:
                out[(topic, partition)] = producers
        r.skip_tags()
    return out, errors


@dataclass(frozen=True, slots=True)
class TransactionListing:
    """A transaction the coordinator knows (`ListTransactions`)."""

    transactional_id: str
    producer_id: int
    state: str


def list_transactions(conn: Connection, producer_ids: list[int]) -> list[TransactionListing]:
    """Transactions of `producer_ids` that this broker coordinates (ask every broker for all)."""
    body = compact_array([]) + compact_array([struct.pack(">q", p) for p in producer_ids]) + TAGS
    r = conn.request(API_LIST_TRANSACTIONS, body)
    r.int32()
    error = r.int16()
    if error:
        raise WireError(f"ListTransactions: error code {error}")
    for _ in range(r.compact_len()):
        r.compact_str()
    out = []
    for _ in range(r.compact_len()):
        tid, pid, state = r.compact_str() or "", r.int64(), r.compact_str() or ""
        r.skip_tags()
        out.append(TransactionListing(tid, pid, state))
    return out


def describe_transaction(conn: Connection, transactional_id: str) -> tuple[int, int] | None:
    """(producer id, epoch) of `transactional_id` from its coordinator; None when this broker is not it."""
    r = conn.request(API_DESCRIBE_TRANSACTIONS, compact_array([compact_str(transactional_id)]) + TAGS)
    r.int32()
    result = None
    for _ in range(r.compact_len()):
        error = r.int16()
        r.compact_str()
        r.compact_str()
        r.int32()
        r.int64()
        pid, epoch = r.int64(), r.int16()
        for _ in range(r.compact_len()):
            r.compact_str()
            for _ in range(r.compact_len()):
                r.int32()
            r.skip_tags()
        r.skip_tags()
        if error == 0:
            result = (pid, epoch)
    return result


def write_marker(conn: Connection, topic: str, partition: int, producer: ActiveProducer, *,
                 commit: bool = False) -> None:
    """Write a COMMIT or ABORT marker for `producer`'s open transaction on `topic[partition]`.

    Sent to the partition's leader; what Kafka's admin `abortTransaction` (KIP-664) sends: the
    producer id and epoch and the coordinator epoch from `DescribeProducers`.
    """
    topic_req = compact_str(topic) + compact_array([struct.pack(">i", partition)]) + TAGS
    marker = (struct.pack(">qh?", producer.producer_id, producer.producer_epoch, commit)
              + compact_array([topic_req]) + struct.pack(">i", producer.coordinator_epoch) + TAGS)
    r = conn.request(API_WRITE_TXN_MARKERS, compact_array([marker]) + TAGS)
    for _ in range(r.compact_len()):
        r.int64()
        for _ in range(r.compact_len()):
            r.compact_str()
            for _ in range(r.compact_len()):
                part, error = r.int32(), r.int16()
                r.skip_tags()
                if error:
                    raise WireError(f"WriteTxnMarkers {topic}[{part}]: error code {error}")
            r.skip_tags()
        r.skip_tags()


def init_producer_id(conn: Connection, transactional_id: str | None = None,
                     transaction_timeout_ms: int = 60_000) -> tuple[int, int]:
    """A producer id and epoch (`InitProducerId`); without a transactional id an idempotent one."""
    body = compact_str(transactional_id) + struct.pack(">iqh", transaction_timeout_ms, -1, -1) + TAGS
    deadline = time.monotonic() + 30
    while True:
        r = conn.request(API_INIT_PRODUCER_ID, body)
        r.int32()
        error, pid, epoch = r.int16(), r.int64(), r.int16()
        if error == 0:
            return pid, epoch
        # COORDINATOR_LOAD_IN_PROGRESS (14), NOT_COORDINATOR (16), CONCURRENT_TRANSACTIONS (51)
        if error not in (14, 16, 51) or time.monotonic() > deadline:
            raise WireError(f"InitProducerId: error code {error}")
        time.sleep(0.2)


def produce(conn: Connection, topic: str, partition: int, batch: bytes,
            transactional_id: str | None = None) -> int:
    """Produce one record batch with acks=all; returns its base offset."""
    part = struct.pack(">i", partition) + compact_bytes(batch) + TAGS
    topic_data = compact_str(topic) + compact_array([part]) + TAGS
    body = compact_str(transactional_id) + struct.pack(">hi", -1, 10_000) + compact_array([topic_data]) + TAGS
    r = conn.request(API_PRODUCE, body)
    r.compact_len()
    r.compact_str()
    r.compact_len()
    r.int32()
    error, base_offset = r.int16(), r.int64()
    if error:
        raise WireError(f"Produce {topic}[{partition}]: error code {error}")
    return base_offset
