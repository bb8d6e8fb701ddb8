"""Create and list the project's Kafka topics: `python -m dptools.topics create|list`.

Partition counts, replication and retention come from the settings of the environment
(`DATA_PROC_ENV`, `DATA_PROC_TOPICS__PARTITIONS`, ...). `create` is idempotent: it creates what is
missing and reports every topic; it exits 1 when a chain topic or changelog exists with another
partition count (it never repartitions), and flags settings such as retention that differ
(`--update-config` sets them). `list` shows the configured topics and what the broker has.
"""

from __future__ import annotations

import argparse
import sys

from confluent_kafka.admin import AdminClient
from dataproc_shared.config import Settings, admin_config, load_settings
from dataproc_shared.errors import DataProcError
from dataproc_shared.logging import configure_logging
from dataproc_shared.topics import TopicStatus, ensure_topics, existing_topics, plan_topics


def create(settings: Settings, update_config: bool = False) -> list[TopicStatus]:
    """Create the missing topics of `settings`; return the status of each."""
    admin = AdminClient(admin_config(settings))
    return ensure_topics(admin, plan_topics(settings), update_config=update_config)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.topics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["create", "list"])
    parser.add_argument("--update-config", action="store_true",
                        help="create: also set retention and other settings that differ on existing topics")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(Settings, service="topics")
        configure_logging("topics", env=settings.env, level=settings.log_level)
        specs = plan_topics(settings)
        if args.command == "create":
            statuses = create(settings, update_config=args.update_config)
            for st in statuses:
                note = f"  ({st.detail})" if st.detail else ""
                print(f"{st.action:<9} {st.name:<40} partitions={st.partitions}{note}")
            if any(st.action == "mismatch" for st in statuses):
                print("topics: partition counts differ from the configuration", file=sys.stderr)
                return 1
            return 0
        have = existing_topics(AdminClient(admin_config(settings)))
        print(f"{'topic':<40} {'role':<9} {'want':>4} {'have':>4}")
        for spec in specs:
            got = have.get(spec.name)
            print(f"{spec.name:<40} {spec.role:<9} {spec.partitions:>4} {'-' if got is None else got:>4}")
        others = sorted(n for n in have if n not in {s.name for s in specs} and not n.startswith("__"))
        if others:
            print(f"other topics on the broker: {len(others)}")
    except DataProcError as exc:
        print(f"topics: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
