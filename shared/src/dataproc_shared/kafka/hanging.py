"""Detect and resolve hanging Kafka transactions on the partitions a service needs.

A *hanging transaction* is an open transaction on a partition that no commit or abort marker will
ever close: the last stable offset (LSO) stays below it, so a `read_committed` consumer (the loop's
input, a changelog restore) never reads past it. Seen after broker restarts in the middle of a
commit (`docs/reliability.md`, finding 6): the coordinator completed the transaction but the marker
never reached one partition. Kafka's own remedy is an operator running
`kafka-transactions.sh find-hanging` and `abort` (KIP-664); this module does the same without one:

1. `DescribeProducers` on the partition's leader: producers with an open transaction
   (`current_txn_start_offset >= 0`) whose last write is older than `hanging_after_s`. The default is
   the brokers' `transaction.max.timeout.ms`, the longest a transaction can legitimately stay open
   (its coordinator aborts it after its own, shorter, timeout);
2. `ListTransactions` on every broker, filtered by those producer ids: what the coordinator knows.
   `Ongoing` / `Prepare*` means the coordinator is still working on it: left alone;
3. otherwise the partition gets the marker its transaction is missing, written to the leader with
   `WriteTxnMarkers` (the request KIP-664's `abortTransaction` sends). Which marker is what the
   coordinator decided for that transaction, read from its own log (`kafka.txnlog`,
   `__transaction_state`): the decision recorded after the last state of that producer epoch that
   listed the partition - **COMMIT** after `PrepareCommit`/`CompleteCommit` (the rest of the
   transaction, input offsets included, is committed: aborting these records would lose them),
   **ABORT** after `PrepareAbort`/`CompleteAbort`/`PrepareEpochFence` or when no state listed the
   partition (the coordinator never knew these records). Only when the log cannot be read, the
   coordinator's current state decides: `CompleteCommit` of the same producer epoch on a leader
   that verifies transactional writes (`transaction.partition.verification.enable`, KIP-890
   part 1) -> commit, anything else -> abort, as `kafka-transactions.sh abort` would.

A replacement producer (same transactional id, new epoch) must not write to a partition where an
older epoch of its producer id left a transaction open: its first marker there would close the old
records as well. `resolve_older_epochs` closes those first, with no age threshold (finding 8).

Every resolution is logged (`hanging transaction resolved`), counted in
`dp_hanging_transactions_total{action}` and kept in `last` for the health report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from dataproc_shared.config import Settings, kafka_common_config
from dataproc_shared.kafka import txnlog, wire

log = structlog.get_logger(__name__)

#: Coordinator states of a transaction that is still being finished by its coordinator.
_IN_PROGRESS = frozenset({"Ongoing", "PrepareCommit", "PrepareAbort", "PrepareEpochFence"})
#: The group coordinator's topic: a transaction's offset commit is a record there.
OFFSETS_TOPIC = "__consumer_offsets"
#: Used when the brokers' `transaction.max.timeout.ms` cannot be read (Kafka's default).
DEFAULT_MAX_TXN_TIMEOUT_S = 900.0

Action = Literal["commit", "abort", "left", "failed"]


@dataclass(frozen=True, slots=True)
class HangingTransaction:
    """An open transaction on one partition, older than the threshold, and what was done about it."""

    topic: str
    partition: int
    producer_id: int
    producer_epoch: int
    start_offset: int
    open_s: float
    coordinator_state: str | None
    action: Action
    error: str | None = None

    def describe(self) -> str:
        """One line for logs and health details."""
        state = self.coordinator_state or "unknown to every coordinator"
        return (f"{self.topic}[{self.partition}] producer {self.producer_id}/{self.producer_epoch} "
                f"open since offset {self.start_offset} for {self.open_s:.0f}s, coordinator: {state}, "
                f"action: {self.action}" + (f" ({self.error})" if self.error else ""))


def security_of(kafka_config: Mapping[str, Any]) -> wire.WireSecurity:
    """The wire client's security settings from librdkafka properties."""
    return wire.WireSecurity(
        protocol=str(kafka_config.get("security.protocol", "PLAINTEXT")).upper(),
        ca_file=kafka_config.get("ssl.ca.location"),
        cert_file=kafka_config.get("ssl.certificate.location"),
        key_file=kafka_config.get("ssl.key.location"),
        key_password=kafka_config.get("ssl.key.password"),
        check_hostname=kafka_config.get("ssl.endpoint.identification.algorithm", "https") != "none",
    )


class HangingTransactionResolver:
    """Finds hanging transactions on given partitions and writes their missing markers."""

    def __init__(
        self,
        kafka_config: Mapping[str, Any],
        *,
        hanging_after_s: float | None = None,
        metrics: Any | None = None,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 10.0,
    ) -> None:
        """Build a resolver; nothing is contacted before the first `resolve`.

        `kafka_config`: librdkafka connection properties. `hanging_after_s`: age (since the
        producer's last write) from which an open transaction counts as hanging; None = the
        brokers' `transaction.max.timeout.ms`. `metrics`: a `ServiceMetrics` (optional).
        """
        self._config = {k: v for k, v in kafka_config.items()
                        if k in ("bootstrap.servers", "client.id", "security.protocol")
                        or k.startswith(("sasl.", "ssl."))}
        self._security = security_of(kafka_config)
        self._hanging_after_s = hanging_after_s
        self._metrics = metrics
        self._clock = clock
        self._timeout_s = timeout_s
        self._admin: AdminClient | None = None
        #: the transactions found by the last `resolve` that were older than the threshold
        self.last: list[HangingTransaction] = []

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Any | None = None) -> HangingTransactionResolver:
        """The resolver of a service: its Kafka connection, `loop.hanging_transaction_timeout_ms`."""
        timeout_ms = settings.loop.hanging_transaction_timeout_ms
        return cls(kafka_common_config(settings), metrics=metrics,
                   hanging_after_s=None if timeout_ms is None else timeout_ms / 1000)

    @property
    def supported(self) -> bool:
        """Whether the wire client can reach the brokers (PLAINTEXT or SSL; not SASL)."""
        return self._security.supported

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(dict(self._config))
        return self._admin

    def _broker_config(self, broker_id: int, name: str) -> str | None:
        try:
            resource = ConfigResource(ConfigResource.Type.BROKER, str(broker_id))
            future = self._admin_client().describe_configs([resource])[resource]
            entry = future.result(timeout=self._timeout_s).get(name)
            return None if entry is None or entry.value is None else str(entry.value)
        except Exception as exc:
            log.info("broker config not readable", config=name, broker=broker_id, error=str(exc))
            return None

    def threshold_s(self, broker_id: int) -> float:
        """The age from which an open transaction counts as hanging."""
        if self._hanging_after_s is not None:
            return self._hanging_after_s
        value = self._broker_config(broker_id, "transaction.max.timeout.ms")
        if value is None:
            return DEFAULT_MAX_TXN_TIMEOUT_S
        self._hanging_after_s = int(value) / 1000
        return self._hanging_after_s

    def _verifies(self, broker_id: int) -> bool:
        """Whether the leader rejects transactional writes its coordinator does not know (KIP-890).

        Only then can an open transaction of a completed producer epoch not be a late write.
        """
        return self._broker_config(broker_id, "transaction.partition.verification.enable") == "true"

    def _brokers(self, topic: str) -> tuple[dict[int, tuple[str, int]], dict[int, int]]:
        """Broker addresses and the leader of each partition of `topic`."""
        md = self._admin_client().list_topics(topic, timeout=self._timeout_s)
        brokers = {b.id: (str(b.host), int(b.port)) for b in md.brokers.values()}
        meta = md.topics.get(topic)
        leaders = {p: pm.leader for p, pm in (meta.partitions.items() if meta is not None else [])}
        return brokers, leaders

    def _connect(self, address: tuple[str, int]) -> wire.Connection:
        return wire.Connection(address[0], address[1], security=self._security, timeout_s=self._timeout_s,
                               client_id=str(self._config.get("client.id", "dataproc-wire")))

    def resolve(self, topic: str, partitions: list[int], *, dry_run: bool = False
                ) -> list[HangingTransaction]:
        """Resolve the hanging transactions on `topic`'s `partitions`; returns what was found.

        Blocking (run it in a thread). Transactions younger than the threshold are not returned.
        """
        if not self.supported or not partitions:
            return []
        brokers, leaders = self._brokers(topic)
        by_leader: dict[int, list[int]] = {}
        for p in partitions:
            leader = leaders.get(p, -1)
            if leader >= 0:
                by_leader.setdefault(leader, []).append(p)
        now_ms = self._clock() * 1000
        candidates: list[tuple[int, int, wire.ActiveProducer, float]] = []
        for leader, parts in by_leader.items():
            threshold = self.threshold_s(leader)
            with self._connect(brokers[leader]) as conn:
                for p, producers in wire.describe_producers(conn, topic, parts).items():
                    for prod in producers:
                        age_s = (now_ms - prod.last_timestamp_ms) / 1000
                        if prod.current_txn_start_offset >= 0 and age_s > threshold:
                            candidates.append((leader, p, prod, age_s))
        if not candidates:
            self.last = []
            return []
        known = self._coordinator_states(brokers, sorted({c[2].producer_id for c in candidates}))
        found = []
        for leader, p, prod, age_s in candidates:
            listing = known.get(prod.producer_id)
            state = listing.state if listing is not None else None
            action: Action
            if state in _IN_PROGRESS:
                action = "left"
            else:
                action = self._outcome(brokers, leader, listing, topic, p, prod)
            error = None
            if action in ("commit", "abort") and not dry_run:
                try:
                    with self._connect(brokers[leader]) as conn:
                        wire.write_marker(conn, topic, p, prod, commit=action == "commit")
                except (OSError, wire.WireError) as exc:
                    action, error = "failed", str(exc)
            txn = HangingTransaction(topic, p, prod.producer_id, prod.producer_epoch,
                                     prod.current_txn_start_offset, round(age_s, 1), state, action, error)
            found.append(txn)
            log.warning("hanging transaction resolved" if action in ("commit", "abort")
                        else "hanging transaction found", topic=topic, partition=p,
                        producer_id=prod.producer_id, producer_epoch=prod.producer_epoch,
                        offset=prod.current_txn_start_offset, open_s=round(age_s, 1),
                        coordinator_state=state or "unknown", action=action, error=error, dry_run=dry_run)
            if self._metrics is not None and not dry_run:
                self._metrics.record_hanging_transaction(action)
        self.last = found
        return found

    def _outcome(self, brokers: dict[int, tuple[str, int]], leader: int,
                 listing: wire.TransactionListing | None, topic: str, partition: int,
                 prod: wire.ActiveProducer) -> Action:
        """Commit or abort: what the coordinator decided for the transaction that wrote these records.

        The coordinator's own log (`__transaction_state`) tells: the last state of the producer's
        transactional id that listed this partition, and the decision recorded after it. Without
        that record (unreadable), the coordinator's current state decides: `CompleteCommit` of the
        same producer epoch on a verifying leader -> commit, anything else -> abort.
        """
        if listing is not None:
            try:
                decided = txnlog.decision(self._admin_client(), self._config, listing.transactional_id,
                                          prod.producer_id, prod.producer_epoch, topic, partition,
                                          timeout_s=self._timeout_s)
            except Exception as exc:
                log.info("transaction log not readable", transactional_id=listing.transactional_id,
                         error=str(exc))
                decided = None
            if decided is not None:
                return decided
            if (listing.state == "CompleteCommit" and self._same_epoch(brokers, listing, prod)
                    and self._verifies(leader)):
                return "commit"
        return "abort"

    def resolve_group(self, group_id: str) -> list[HangingTransaction]:
        """Resolve hanging transactions on the `__consumer_offsets` partition of `group_id`.

        A transaction's offset commit lives there; left open, it blocks every read of the group's
        committed offsets (`UNSTABLE_OFFSET_COMMIT` until the client's timeout).
        """
        md = self._admin_client().list_topics(OFFSETS_TOPIC, timeout=self._timeout_s)
        meta = md.topics.get(OFFSETS_TOPIC)
        if meta is None or not meta.partitions:
            return []
        return self.resolve(OFFSETS_TOPIC, [txnlog.partition_for(group_id, len(meta.partitions))])

    def resolve_older_epochs(self, transactional_id: str, topics: Collection[str]
                             ) -> list[HangingTransaction]:
        """Close open transactions of older epochs of `transactional_id`'s producer on `topics`.

        Called right after `init_transactions` of a (replacement) producer, before it produces:
        a transaction of an older epoch of the same producer id can no longer complete, and the
        first marker the new epoch writes to such a partition would close the old records with
        it - as committed, whatever the coordinator had decided for them (`docs/reliability.md`,
        finding 8). Every partition of the existing `topics` is checked, with no age threshold:
        one `DescribeTransactions` (the producer id and current epoch, from the coordinator) and
        one `DescribeProducers` per leader broker; the marker is the one the coordinator's log
        decided for that epoch (`kafka.txnlog`: COMMIT if it had completed the epoch's commit,
        ABORT otherwise, also when the log cannot tell). Blocking (run it in a thread).
        """
        if not self.supported or not topics:
            return []
        started = time.monotonic()
        md = self._admin_client().list_topics(timeout=self._timeout_s)
        brokers = {b.id: (str(b.host), int(b.port)) for b in md.brokers.values()}
        by_leader: dict[int, dict[str, list[int]]] = {}
        for topic in sorted(set(topics)):
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            for p, pm in meta.partitions.items():
                if pm.leader >= 0 and pm.leader in brokers:
                    by_leader.setdefault(pm.leader, {}).setdefault(topic, []).append(p)
        current = None
        for address in brokers.values():
            with self._connect(address) as conn:
                current = wire.describe_transaction(conn, transactional_id)
            if current is not None:
                break
        if current is None:
            log.info("older producer epochs not checked: transactional id unknown to the coordinators",
                     transactional_id=transactional_id)
            return []
        producer_id, epoch = current
        candidates: list[tuple[int, str, int, wire.ActiveProducer]] = []
        for leader, parts in by_leader.items():
            with self._connect(brokers[leader]) as conn:
                found, errors = wire.describe_producers_many(conn, parts)
            for (topic, p), (code, message) in errors.items():
                log.info("older producer epochs not checked on a partition", topic=topic, partition=p,
                         error_code=code, error=message)
            for (topic, p), producers in found.items():
                candidates.extend((leader, topic, p, prod) for prod in producers
                                  if prod.producer_id == producer_id and prod.producer_epoch < epoch
                                  and prod.current_txn_start_offset >= 0)
        log.info("older producer epochs checked", transactional_id=transactional_id,
                 producer_id=producer_id, producer_epoch=epoch,
                 partitions=sum(len(ps) for parts in by_leader.values() for ps in parts.values()),
                 open=len(candidates), ms=round((time.monotonic() - started) * 1000, 1))
        if not candidates:
            return []
        try:
            states = txnlog.history(self._admin_client(), self._config, transactional_id,
                                    timeout_s=self._timeout_s)
        except Exception as exc:
            log.info("transaction log not readable", transactional_id=transactional_id, error=str(exc))
            states = []
        now_ms = self._clock() * 1000
        resolved = []
        for leader, topic, p, prod in candidates:
            decided = (txnlog.decide(states, prod.producer_id, prod.producer_epoch, topic, p)
                       if states else None)
            action: Action = "commit" if decided == "commit" else "abort"
            error = None
            try:
                with self._connect(brokers[leader]) as conn:
                    wire.write_marker(conn, topic, p, prod, commit=action == "commit")
            except (OSError, wire.WireError) as exc:
                action, error = "failed", str(exc)
            age_s = round((now_ms - prod.last_timestamp_ms) / 1000, 1)
            txn = HangingTransaction(topic, p, prod.producer_id, prod.producer_epoch,
                                     prod.current_txn_start_offset, age_s,
                                     f"epoch {epoch} initialised", action, error)
            resolved.append(txn)
            log.warning("older producer epoch's transaction resolved" if error is None
                        else "older producer epoch's transaction not resolved",
                        transactional_id=transactional_id, topic=topic, partition=p,
                        producer_id=prod.producer_id, producer_epoch=prod.producer_epoch,
                        current_epoch=epoch, offset=prod.current_txn_start_offset, open_s=age_s,
                        logged_decision=decided or "none", action=action, error=error)
            if self._metrics is not None:
                self._metrics.record_hanging_transaction(action)
        return resolved

    def _coordinator_states(self, brokers: dict[int, tuple[str, int]], producer_ids: list[int]
                            ) -> dict[int, wire.TransactionListing]:
        """What the transaction coordinators (every broker) know about `producer_ids`."""
        known: dict[int, wire.TransactionListing] = {}
        for address in brokers.values():
            with self._connect(address) as conn:
                for listing in wire.list_transactions(conn, producer_ids):
                    known[listing.producer_id] = listing
        return known

    def _same_epoch(self, brokers: dict[int, tuple[str, int]], listing: wire.TransactionListing | None,
                    prod: wire.ActiveProducer) -> bool:
        """Whether the coordinator's current epoch of the transactional id is the producer's."""
        if listing is None:
            return False
        for address in brokers.values():
            with self._connect(address) as conn:
                described = wire.describe_transaction(conn, listing.transactional_id)
            if described is not None:
                return described == (prod.producer_id, prod.producer_epoch)
        return False
