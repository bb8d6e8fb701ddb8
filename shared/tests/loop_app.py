"""A test service run as a subprocess by the loop tests: upper-cases values and counts per key.

Output value: `<UPPER>|<n>` where n is how many records of that key the service has seen (kept in a
`ChangelogStore`, so a wrong restore shows as wrong counts). `POISON` becomes a `bad_field` dead
letter; `CRASH` makes `process` raise (-> `processing_error` dead letter). Configured by environment:
APP_INPUT, APP_OUTPUT, APP_CHANGELOG, APP_SLEEP_S (per batch), APP_HOLD_FILE (`process` waits while
that file exists: a cycle held in progress), plus the usual DATA_PROC_* settings.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from dataproc_shared.config import Settings, kafka_common_config
from dataproc_shared.records import BatchResult, DeadLetter, DeadLetterReason, InRecord, OutRecord
from dataproc_shared.service import ServiceContext, run_service
from dataproc_shared.state import ChangelogStore


class UpperProcessor:
    def __init__(self, output: str, store: ChangelogStore, sleep_s: float, hold: Path | None = None) -> None:
        self.output = output
        self.store = store
        self.sleep_s = sleep_s
        self.hold = hold

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
        while self.hold is not None and self.hold.exists():
            await asyncio.sleep(0.05)
        return result

    async def on_tick(self) -> BatchResult:
        return BatchResult()

    async def before_commit(self) -> BatchResult:
        return BatchResult(outputs=self.store.pending_changes())

    async def on_abort(self) -> None:
        await self.store.reload()


def make_processor(ctx: ServiceContext) -> UpperProcessor:
    store = ChangelogStore(topic=os.environ["APP_CHANGELOG"], kafka_config=kafka_common_config(ctx.settings))
    hold = os.environ.get("APP_HOLD_FILE")
    return UpperProcessor(os.environ["APP_OUTPUT"], store, float(os.environ.get("APP_SLEEP_S", "0")),
                          Path(hold) if hold else None)


if __name__ == "__main__":
    code = run_service(Settings, make_processor, service="loopapp", input_topics=[os.environ["APP_INPUT"]])
    print(f"exit={code}", flush=True)
    sys.exit(code)
