"""The protocol a service implements to run inside the Kafka loop."""

from __future__ import annotations

from typing import Protocol

from dataproc_shared.records import BatchResult, InRecord


class Processor(Protocol):
    """A service's transform plus the hooks the loop calls around it.

    Order of calls the loop guarantees, per transaction in exactly-once mode:
    `process` (one or more batches) and `on_tick` -> produce outputs -> `before_commit` (flush
    external sinks such as ClickHouse or Redis; may return more records to put in the same
    transaction, e.g. a state changelog) -> `send_offsets_to_transaction` -> commit.
    When a transaction aborts, the loop calls `on_abort` and rewinds the consumer to the committed
    offsets; a stateful processor must drop whatever it changed since the last commit (reload
    from its changelog) so the replay starts from the committed state.
    """

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """Partitions (topic, partition) were assigned: restore their state before they are consumed."""

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Partitions are going away (after their last transaction committed or aborted)."""

    async def process(self, batch: list[InRecord]) -> BatchResult:
        """Transform one batch of consumed records (in partition order)."""
        ...

    async def on_tick(self) -> BatchResult:
        """Called about every `loop.tick_interval_ms` even when no input arrives (idle timers)."""
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        """Flush external sinks; returned records join the transaction. Raise to abort it."""
        return BatchResult()

    async def on_abort(self) -> None:
        """The current transaction was aborted: forget uncommitted changes."""


# Optional hook, called when the processor defines it (the loop looks it up with getattr):
#
#     async def on_lag(self, lags: dict[tuple[str, int], int]) -> None:
#         """Records still waiting per assigned (topic, partition), refreshed every few seconds."""
#
# Aggregation uses it so that a partition with a backlog is never taken for an idle one.
