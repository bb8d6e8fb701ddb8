"""`python -m dptools.relay INPUT OUTPUT`: one plain consume -> produce stage, no decoding.

The physical-limit baseline of the benchmarks: the shared Kafka loop (same guarantee, batching and
transactions as the services) around `PassthroughProcessor`, which copies every record's bytes to
`OUTPUT` on the same partition. Four of them in a row make the relay chain.
"""

from __future__ import annotations

import sys

from dataproc_shared.config import Settings
from dataproc_shared.kafka.passthrough import PassthroughProcessor
from dataproc_shared.service import run_service


def main(argv: list[str] | None = None) -> int:
    """Relay INPUT to OUTPUT until SIGTERM/SIGINT."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m dptools.relay INPUT_TOPIC OUTPUT_TOPIC", file=sys.stderr)
        return 2
    source, target = args
    return run_service(Settings, PassthroughProcessor(target), service="relay", input_topics=[source])


if __name__ == "__main__":
    raise SystemExit(main())
