"""The project's Kafka topics: what should exist (from settings) and making it so, idempotently.

Every contract topic plus the compacted state changelogs. The chain topics (raw, normalized,
enriched, bars) and the changelogs share one partition count, because an instrument must sit on the
same partition number everywhere and a changelog partition holds the state of the same input
partition. A chain topic that already exists with another partition count is reported as a
mismatch and never altered (repartitioning would move instruments between partitions). Topic
settings (retention, cleanup policy, message size limits, ...) that differ from the configuration
are reported, and changed only when asked (`update_config=True`). The raw topic's `max.message.bytes`
is set explicitly, and the dead-letter topic's is large enough for the dead letter of any raw record
the raw topic accepts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported without __all__ entries
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from dataproc_shared.errors import DataProcError

if TYPE_CHECKING:
    from dataproc_shared.config import Settings

log = structlog.get_logger(__name__)

Role = Literal["chain", "changelog", "side"]
Action = Literal["created", "exists", "updated", "mismatch"]


class TopicError(DataProcError):
    """Topics cannot be made to match the configuration."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic as the configuration wants it."""

    name: str
    partitions: int
    replication_factor: int
    role: Role
    config: Mapping[str, str] = field(default_factory=dict)

    @property
    def fixed_partitions(self) -> bool:
        """Whether a different partition count on the broker is an error (chain topics, changelogs)."""
        return self.role in ("chain", "changelog")


@dataclass(frozen=True, slots=True)
class TopicStatus:
    """What `ensure_topics` found or did for one topic."""

    name: str
    action: Action
    partitions: int
    expected_partitions: int
    detail: str = ""


def plan_topics(settings: Settings) -> list[TopicSpec]:
    """The topics `settings` asks for: six contract topics and the two state changelogs."""
    t = settings.topics
    rf = t.replication_factor
    base = {"min.insync.replicas": str(t.min_insync_replicas)}

    def delete(retention_ms: int) -> dict[str, str]:
        return {**base, "cleanup.policy": "delete", "retention.ms": str(retention_ms)}

    compact = {**base, "cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "3600000"}
    r = t.retention_ms
    # The dead-letter topic takes any raw record's dead letter (base64 + JSON): its size limit
    # follows the raw topic's (`TopicOptions.deadletter_message_limit`).
    raw_size = {"max.message.bytes": str(t.raw_max_message_bytes)}
    deadletter_size = {"max.message.bytes": str(t.deadletter_message_limit)}
    return [
        TopicSpec(t.raw, t.partitions, rf, "chain", {**delete(r.raw), **raw_size}),
        TopicSpec(t.normalized, t.partitions, rf, "chain", delete(r.normalized)),
        TopicSpec(t.enriched, t.partitions, rf, "chain", delete(r.enriched)),
        TopicSpec(t.bars, t.partitions, rf, "chain", delete(r.bars)),
        TopicSpec(t.deadletter, t.side_partitions, rf, "side", {**delete(r.deadletter), **deadletter_size}),
        TopicSpec(settings.audit_kafka_topic, t.side_partitions, rf, "side", delete(r.audit)),
        TopicSpec(t.changelog("normalization", "dedup"), t.partitions, rf, "changelog", compact),
        TopicSpec(t.changelog("aggregation", "windows"), t.partitions, rf, "changelog", compact),
    ]


def compare(
    specs: Sequence[TopicSpec], existing: Mapping[str, int]
) -> tuple[list[TopicSpec], list[TopicStatus]]:
    """Split `specs` into topics to create and statuses of existing ones (`existing`: name -> partitions)."""
    chain_counts = {s.partitions for s in specs if s.fixed_partitions}
    if len(chain_counts) > 1:
        raise TopicError("chain topics and changelogs must share one partition count, "
                         f"got {sorted(chain_counts)}")
    missing: list[TopicSpec] = []
    statuses: list[TopicStatus] = []
    for spec in specs:
        have = existing.get(spec.name)
        if have is None:
            missing.append(spec)
        elif have != spec.partitions and spec.fixed_partitions:
            statuses.append(TopicStatus(spec.name, "mismatch", have, spec.partitions,
                                        f"{spec.role} topic has {have} partitions, configuration says "
                                        f"{spec.partitions}; instruments would not line up across topics"))
        elif have != spec.partitions:
            statuses.append(TopicStatus(spec.name, "exists", have, spec.partitions,
                                        f"has {have} partitions, configuration says {spec.partitions}"))
        else:
            statuses.append(TopicStatus(spec.name, "exists", have, spec.partitions))
    return missing, statuses


def config_differences(spec: TopicSpec, current: Mapping[str, str]) -> dict[str, tuple[str | None, str]]:
    """Settings of `spec` whose value on the broker (`current`) differs: key -> (have, want)."""
    return {k: (current.get(k), v) for k, v in spec.config.items() if current.get(k) != v}


def topic_configs(
    admin: AdminClient, names: Sequence[str], timeout_s: float = 30.0
) -> dict[str, dict[str, str]]:
    """Current settings of the topics `names` on the broker."""
    if not names:
        return {}
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names],
                                     request_timeout=timeout_s)
    return {resource.name: {k: str(e.value) for k, e in future.result().items()}
            for resource, future in futures.items()}


def _describe(diff: Mapping[str, tuple[str | None, str]]) -> str:
    return ", ".join(f"{k}={have} (configured {want})" for k, (have, want) in sorted(diff.items()))


def _alter(
    admin: AdminClient, name: str, diff: Mapping[str, tuple[str | None, str]], timeout_s: float
) -> None:
    entries = [ConfigEntry(k, want, incremental_operation=AlterConfigOpType.SET)
               for k, (_have, want) in diff.items()]
    resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource], request_timeout=timeout_s).values():
        future.result()


def existing_topics(admin: AdminClient, timeout_s: float = 10.0) -> dict[str, int]:
    """Name -> partition count of every topic on the cluster (internal ones included)."""
    metadata = admin.list_topics(timeout=timeout_s)
    return {name: len(meta.partitions) for name, meta in metadata.topics.items()}


def ensure_topics(
    admin: AdminClient, specs: Sequence[TopicSpec], timeout_s: float = 30.0, *, update_config: bool = False
) -> list[TopicStatus]:
    """Create the missing topics of `specs` and report every one.

    Partition counts of existing topics are never changed. Settings that differ from `spec.config`
    are reported in the status's detail, and set on the broker when `update_config` is true.
    """
    missing, statuses = compare(specs, existing_topics(admin, timeout_s))
    by_spec = {s.name: s for s in specs}
    current = topic_configs(admin, [st.name for st in statuses], timeout_s)
    for i, st in enumerate(statuses):
        diff = config_differences(by_spec[st.name], current.get(st.name, {}))
        if not diff:
            continue
        if update_config and st.action == "exists":
            _alter(admin, st.name, diff, timeout_s)
            log.info("topic settings updated", topic=st.name, settings=_describe(diff))
            statuses[i] = TopicStatus(st.name, "updated", st.partitions, st.expected_partitions,
                                      "set " + _describe(diff))
        else:
            detail = "; ".join(p for p in (st.detail, "settings differ: " + _describe(diff)) if p)
            statuses[i] = TopicStatus(st.name, st.action, st.partitions, st.expected_partitions, detail)
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                      config=dict(s.config)) for s in missing],
            operation_timeout=timeout_s, request_timeout=timeout_s,
        )
        by_name = {s.name: s for s in missing}
        for name, future in futures.items():
            spec = by_name[name]
            try:
                future.result()
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    # Created concurrently by another runner: report what it looks like now.
                    have = existing_topics(admin, timeout_s).get(name, spec.partitions)
                    statuses.extend(compare([spec], {name: have})[1])
                    continue
                raise TopicError(f"cannot create {name}: {exc}") from exc
            log.info("topic created", topic=name, partitions=spec.partitions, role=spec.role)
            statuses.append(TopicStatus(name, "created", spec.partitions, spec.partitions))
    order = {s.name: i for i, s in enumerate(specs)}
    return sorted(statuses, key=lambda st: order[st.name])
