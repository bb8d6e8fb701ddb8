"""The simplest processor: consume -> produce the same bytes, no decoding.

An example of the `Processor` protocol and the "relay" baseline of the benchmarks: every record is
copied to `output_topic` with its key, value and headers, on the same partition number.
"""

from __future__ import annotations

from dataproc_shared.records import BatchResult, InRecord, OutRecord


class PassthroughProcessor:
    """Copies every input record to `output_topic`, same partition, same key, value and headers."""

    def __init__(self, output_topic: str) -> None:
        self.output_topic = output_topic

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        """Stateless: nothing to restore."""

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Stateless: nothing to drop."""

    async def process(self, batch: list[InRecord]) -> BatchResult:
        """One output per input, bytes untouched."""
        return BatchResult(
            outputs=[
                OutRecord(topic=self.output_topic, key=r.key, value=r.value, partition=r.partition,
                          headers=r.headers, source=r)
                for r in batch
            ]
        )

    async def on_tick(self) -> BatchResult:
        """No timers."""
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        """No external sinks."""
        return BatchResult()

    async def on_abort(self) -> None:
        """Stateless: nothing to forget."""
