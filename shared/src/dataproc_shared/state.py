"""Per-partition key/value state backed by a compacted Kafka changelog topic.

A stateful processor (normalization's dedup window, aggregation's open windows) keeps its state in a
`ChangelogStore`: one dictionary per *input partition*. Every `put`/`delete` is also recorded as a
pending changelog record (key = store key, value = encoded state or a tombstone) on changelog
partition p for input partition p. The processor returns `pending_changes()` from `before_commit`,
so the changes ride in the same Kafka transaction as the outputs and the input offsets: state and
offsets are committed together or not at all.

Life cycle, driven by the processor's hooks:

- `on_assign` -> `await store.restore(partitions)`: read each changelog partition from the beginning
  to its end (read_committed, end = partition EOF) before any input of that partition is processed;
- `before_commit` -> `store.pending_changes()`;
- `on_abort` -> `await store.reload()`: forget uncommitted changes, re-read the owned partitions;
- `on_revoke` -> `store.drop(partitions)`.

A partition whose end is held back by an open transaction (read up to its last stable offset, the
high watermark beyond) waits for the transaction's outcome. When it stays there for
`hanging_check_after_s`, the store asks its `HangingTransactionResolver`
(`dataproc_shared.kafka.hanging`) every few seconds: a transaction open longer than the brokers'
maximum transaction timeout and not in progress at its coordinator is *hanging* (a broker restart
lost its marker) and gets the missing marker; the restore then reads on. The restore timeout is
extended by that threshold while it waits on an open transaction, so a legitimately long
transaction is waited for, not mistaken for a failure.

Values are JSON (`codec="json"`, any orjson-serialisable value) or raw bytes (`codec="bytes"`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import orjson
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from dataproc_shared.errors import DataProcError
from dataproc_shared.kafka.hanging import HangingTransactionResolver
from dataproc_shared.records import OutRecord

#: Broker errors that pass once leadership settles (e.g. right after a broker restart).
_TRANSIENT = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.NOT_COORDINATOR, KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
})

Codec = Literal["json", "bytes"]

log = structlog.get_logger(__name__)


class StateRestoreError(DataProcError):
    """A changelog partition could not be read to its end."""


class ChangelogStore:
    """Key/value state per input partition, written through a compacted changelog topic."""

    def __init__(
        self,
        *,
        topic: str,
        kafka_config: Mapping[str, Any],
        codec: Codec = "json",
        restore_timeout_s: float = 120.0,
        hanging: HangingTransactionResolver | None = None,
        hanging_check_after_s: float = 5.0,
    ) -> None:
        """`kafka_config` holds the librdkafka connection settings (bootstrap servers, security).

        `hanging` resolves hanging transactions on the changelog (default: one built from
        `kafka_config`, threshold = the brokers' `transaction.max.timeout.ms`).
        """
        self._topic = topic
        self._kafka_config = dict(kafka_config)
        self._codec: Codec = codec
        self._restore_timeout_s = restore_timeout_s
        self._hanging = hanging
        self._hanging_check_after_s = hanging_check_after_s
        self._data: dict[int, dict[str, Any]] = {}
        # Pending changes since the last `pending_changes()`: (partition, key) -> value or None.
        self._pending: dict[tuple[int, str], Any | None] = {}

    @property
    def topic(self) -> str:
        """The changelog topic."""
        return self._topic

    @property
    def hanging(self) -> HangingTransactionResolver:
        """The resolver of hanging transactions on the changelog."""
        if self._hanging is None:
            self._hanging = HangingTransactionResolver(self._kafka_config)
        return self._hanging

    @property
    def partitions(self) -> frozenset[int]:
        """The partitions whose state is held (restored and not dropped)."""
        return frozenset(self._data)

    # --- reading and writing -------------------------------------------------------------------

    def get(self, partition: int, key: str, default: Any = None) -> Any:
        """Value of `key` in the state of input partition `partition`, else `default`."""
        return self._data.get(partition, {}).get(key, default)

    def put(self, partition: int, key: str, value: Any) -> None:
        """Set `key` to `value` (recorded as a pending changelog record)."""
        if self._codec == "bytes" and not isinstance(value, bytes | bytearray):
            raise TypeError(f"store {self._topic} holds bytes, got {type(value).__name__}")
        self._data.setdefault(partition, {})[key] = value
        self._pending[(partition, key)] = value

    def delete(self, partition: int, key: str) -> None:
        """Remove `key` (recorded as a tombstone); no-op when absent."""
        part = self._data.get(partition)
        if part is not None and key in part:
            del part[key]
            self._pending[(partition, key)] = None

    def items(self, partition: int) -> Iterator[tuple[str, Any]]:
        """(key, value) pairs of one partition's state; safe to mutate the store while iterating."""
        return iter(list(self._data.get(partition, {}).items()))

    def __len__(self) -> int:
        return sum(len(part) for part in self._data.values())

    def pending_changes(self) -> list[OutRecord]:
        """Changelog records for every change since the last call (last write per key wins).

        Return them from `Processor.before_commit` so they join the current transaction.
        """
        records = [
            OutRecord(
                topic=self._topic,
                key=key.encode(),
                value=None if value is None else self._encode(value),
                partition=partition,
            )
            for (partition, key), value in self._pending.items()
        ]
        self._pending.clear()
        return records

    # --- life cycle ----------------------------------------------------------------------------

    async def restore(self, partitions: Iterable[int]) -> None:
        """Load the state of `partitions` from the changelog (blocking reads run in a thread)."""
        wanted = sorted(set(partitions))
        if not wanted:
            return
        started = time.monotonic()
        loaded = await asyncio.to_thread(self._read_changelog, wanted)
        for partition in wanted:
            self._data[partition] = loaded.get(partition, {})
            for key in [k for k in self._pending if k[0] == partition]:
                del self._pending[key]
        log.info(
            "state restored",
            changelog=self._topic,
            partitions=wanted,
            keys=sum(len(v) for v in loaded.values()),
            seconds=round(time.monotonic() - started, 3),
        )

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state of `partitions` (they were revoked)."""
        for partition in set(partitions):
            self._data.pop(partition, None)
            for key in [k for k in self._pending if k[0] == partition]:
                del self._pending[key]

    async def reload(self) -> None:
        """Forget uncommitted changes and re-read every held partition (after an aborted transaction)."""
        self._pending.clear()
        owned = sorted(self._data)
        self._data.clear()
        await self.restore(owned)

    # --- internals -----------------------------------------------------------------------------

    def _encode(self, value: Any) -> bytes:
        if self._codec == "bytes":
            return bytes(value)
        return orjson.dumps(value)

    def _decode(self, raw: bytes) -> Any:
        if self._codec == "bytes":
            return raw
        return orjson.loads(raw)

    def apply(self, target: dict[int, dict[str, Any]], partition: int, key: bytes,
              value: bytes | None) -> None:
        """Apply one changelog record to `target` (a tombstone deletes the key)."""
        part = target.setdefault(partition, {})
        name = key.decode()
        if value is None:
            part.pop(name, None)
        else:
            part[name] = self._decode(value)

    def _read_changelog(self, partitions: list[int]) -> dict[int, dict[str, Any]]:
        consumer = Consumer(
            {
                **self._kafka_config,
                "group.id": f"dp-restore-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        out: dict[int, dict[str, Any]] = {p: {} for p in partitions}
        try:
            to_read: list[TopicPartition] = []
            for partition in partitions:
                low, high = self._watermarks(consumer, partition)
                if high > low:
                    to_read.append(TopicPartition(self._topic, partition, OFFSET_BEGINNING))
            remaining = {tp.partition for tp in to_read}
            if not remaining:
                return out
            consumer.assign(to_read)
            deadline = time.monotonic() + self._restore_timeout_s
            # Partitions read up to their last stable offset; the end counts only once no open
            # transaction lies beyond it (its records may still be committed: wait for the outcome).
            at_stable_end: dict[int, float] = {}
            next_check = 0.0
            while remaining:
                now = time.monotonic()
                if now > deadline:
                    raise StateRestoreError(
                        f"changelog {self._topic} partitions {sorted(remaining)} not read to the end "
                        f"within {self._restore_timeout_s}s"
                    )
                for msg in consumer.consume(1000, 0.1):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            at_stable_end.setdefault(msg.partition() or 0, time.monotonic())
                            continue
                        raise StateRestoreError(f"reading changelog {self._topic}: {err}")
                    key, part = msg.key(), msg.partition()
                    if key is None or part is None:
                        continue
                    at_stable_end.pop(part, None)
                    self.apply(out, part, key, msg.value())
                for part in sorted(at_stable_end):
                    if self._settled(consumer, part):
                        del at_stable_end[part]
                        remaining.discard(part)
                waiting = [p for p, since in at_stable_end.items()
                           if now - since >= self._hanging_check_after_s]
                if waiting and now >= next_check:
                    next_check = now + self._hanging_check_after_s
                    deadline = max(deadline, self._check_hanging(waiting))
        except KafkaException as exc:
            raise StateRestoreError(f"reading changelog {self._topic}: {exc}") from exc
        finally:
            consumer.close()
        return out

    def _check_hanging(self, partitions: list[int]) -> float:
        """Resolve hanging transactions on `partitions`; returns how long the restore may wait for them."""
        resolver = self.hanging
        log.info("changelog restore waits for an open transaction", changelog=self._topic,
                 partitions=partitions)
        try:
            resolver.resolve(self._topic, partitions)
            threshold = resolver.threshold_s(-1) if resolver.supported else 0.0
        except Exception as exc:
            log.warning("hanging transaction check failed", changelog=self._topic, error=str(exc))
            return 0.0
        return time.monotonic() + threshold + self._restore_timeout_s

    def _settled(self, consumer: Consumer, partition: int) -> bool:
        """Whether the position reached the high watermark (no open transaction beyond it)."""
        tp = TopicPartition(self._topic, partition)
        position = consumer.position([tp])[0].offset
        cached = consumer.get_watermark_offsets(tp, cached=True)
        return cached is None or cached[1] < 0 or position >= cached[1]

    def _watermarks(self, consumer: Consumer, partition: int) -> tuple[int, int]:
        """Low and high offsets of a changelog partition.

        Transient broker errors (a leader moving after a broker restart) are retried until the restore
        timeout.
        """
        deadline = time.monotonic() + self._restore_timeout_s
        while True:
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(self._topic, partition), timeout=10)
                return int(low), int(high)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                transient = isinstance(err, KafkaError) and (err.retriable() or err.code() in _TRANSIENT)
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
