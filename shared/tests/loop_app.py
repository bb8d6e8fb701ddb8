"""A test service run as a subprocess by the loop tests: upper-cases values and counts per key.

Output value: `<UPPER>|<n>` where n is how many records of that key the service has seen (kept in a
`ChangelogStore`, so a wrong restore shows as wrong counts). `POISON` becomes a `bad_field` dead
letter; `CRASH` makes `process` raise (-> `processing_error` dead letter). Configured by environment:
APP_INPUT, APP_OUTPUT, APP_CHANGELOG, APP_SLEEP_S (per batch), plus the usual DATA_PROC_* settings.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from dataproc_shared.config import kafka_common_config, load_settings
from dataproc_shared.kafka.loop import KafkaLoop, LoopFatalError
from dataproc_shared.metrics import ServiceMetrics
from dataproc_shared.records import BatchResult, DeadLetter, DeadLetterReason, InRecord, OutRecord
from dataproc_shared.state import ChangelogStore


class UpperProcessor:
    def __init__(self, output: str, store: ChangelogStore, sleep_s: float) -> None:
        self.output = output
        self.store = store
        self.sleep_s = sleep_s

    async def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        await self.store.restore(p for _, p in partitions)

    async def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.store.drop(p for _, p in partitions)

    async def process(self, batch: list[InRecord]) -> BatchResult:
        result = BatchResult()
        for rec in batch:
            value = rec.value or b""
            if value == b"POISON":
                result.dead_letters.append(DeadLetter(rec, DeadLetterReason.BAD_FIELD, "poison"))
                continue
            if value == b"CRASH":
                raise RuntimeError("crash record")
            key = (rec.key or b"").decode()
            n = int(self.store.get(rec.partition, key, 0)) + 1
            self.store.put(rec.partition, key, n)
            result.outputs.append(OutRecord(self.output, rec.key, value.upper() + b"|%d" % n,
                                            partition=rec.partition))
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        return result

    async def on_tick(self) -> BatchResult:
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        return BatchResult(outputs=self.store.pending_changes())

    async def on_abort(self) -> None:
        await self.store.reload()


async def main() -> int:
    settings = load_settings(service="loopapp")
    store = ChangelogStore(topic=os.environ["APP_CHANGELOG"], kafka_config=kafka_common_config(settings))
    processor = UpperProcessor(os.environ["APP_OUTPUT"], store, float(os.environ.get("APP_SLEEP_S", "0")))
    loop = KafkaLoop(settings, processor, input_topics=[os.environ["APP_INPUT"]],
                     metrics=ServiceMetrics(settings.service))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await loop.run(stop)
    except LoopFatalError as exc:
        print(f"fatal: {exc}", file=sys.stderr)
        return 1
    print(f"committed_cycles={loop.committed_cycles}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
