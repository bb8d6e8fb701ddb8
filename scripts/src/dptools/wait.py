"""Readiness waits for the local stack: return when a part really answers, or fail at a deadline.

`python -m dptools.wait kafka --bootstrap 127.0.0.1:9092 --timeout 60` retries a metadata request
until the broker answers it (a listening socket is not enough: the broker must have joined its
own KRaft quorum and be able to serve metadata).
"""

from __future__ import annotations

import argparse
import sys
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient


def kafka_ready(bootstrap: str, timeout_s: float) -> float:
    """Block until the broker at `bootstrap` answers a metadata request; return the seconds waited.

    Raises TimeoutError when it does not answer within `timeout_s`.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    # log_level 0: librdkafka's connection-refused chatter while the broker starts is expected.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    last_error = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f}s: {last_error}")
        try:
            metadata = admin.list_topics(timeout=min(2.0, remaining))
        except KafkaException as exc:
            last_error = str(exc)
            continue
        if metadata.brokers:
            return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", choices=["kafka"])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    try:
        waited = kafka_ready(args.bootstrap, args.timeout)
    except TimeoutError as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    print(f"kafka answers metadata requests at {args.bootstrap} (waited {waited:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
