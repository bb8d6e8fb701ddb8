"""Topic tooling: the plan from settings, the comparison, and idempotent creation on the real broker."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient
from dataproc_shared.config import RetentionOptions, Settings, TopicOptions, load_settings, producer_config
from dataproc_shared.topics import (
    TopicError,
    TopicSpec,
    compare,
    config_differences,
    ensure_topics,
    existing_topics,
    plan_topics,
    topic_configs,
)


def _settings(partitions: int = 4, suffix: str = "", raw_retention_ms: int = 3_600_000) -> Settings:
    topics = TopicOptions(
        raw=f"raw{suffix}", normalized=f"normalized{suffix}", enriched=f"enriched{suffix}",
        bars=f"bars{suffix}",
        deadletter=f"deadletter{suffix}", partitions=partitions, side_partitions=1,
        retention_ms=RetentionOptions(raw=raw_retention_ms),
        normalization_dedup_changelog=f"dedup-changelog{suffix}",
        aggregation_windows_changelog=f"windows-changelog{suffix}",
    )
    return load_settings(Settings, topics=topics, audit_kafka_topic=f"audit{suffix}")


def test_plan_covers_contract_topics_and_changelogs() -> None:
    specs = {s.name: s for s in plan_topics(_settings(4))}
    assert set(specs) == {"raw", "normalized", "enriched", "bars", "deadletter", "audit",
                          "dedup-changelog", "windows-changelog"}
    assert {specs[n].partitions for n in ("raw", "normalized", "enriched", "bars",
                                           "dedup-changelog", "windows-changelog")} == {4}
    assert specs["deadletter"].partitions == 1
    assert specs["raw"].config["retention.ms"] == "3600000"
    assert specs["raw"].config["cleanup.policy"] == "delete"
    assert specs["windows-changelog"].config["cleanup.policy"] == "compact"
    assert specs["raw"].fixed_partitions
    assert not specs["audit"].fixed_partitions
    # a raw record of the raw topic's size limit fits the dead-letter topic base64-encoded
    raw_limit = int(specs["raw"].config["max.message.bytes"])
    assert raw_limit == 1_048_588
    assert int(specs["deadletter"].config["max.message.bytes"]) >= raw_limit * 4 / 3 + 60_000


def test_the_dead_letter_limit_follows_the_raw_topic_and_bounds_the_producer() -> None:
    settings = load_settings(Settings, topics=TopicOptions(raw_max_message_bytes=3_000_000))
    dlq = {s.name: s for s in plan_topics(settings)}[settings.topics.deadletter]
    assert int(dlq.config["max.message.bytes"]) == 4_000_000 + 65_536
    assert producer_config(settings)["message.max.bytes"] == 4_000_000 + 65_536
    fixed = load_settings(Settings, topics=TopicOptions(deadletter_max_message_bytes=500_000))
    assert fixed.topics.deadletter_message_limit == 500_000
    assert producer_config(fixed)["message.max.bytes"] == 1_000_000


def test_default_settings_use_contract_names() -> None:
    names = [s.name for s in plan_topics(load_settings(Settings))]
    assert names[:6] == ["ingestion.market.raw.v1", "normalized.market.ticks.v1", "enriched.market.ticks.v1",
                         "aggregated.market.bars.v1", "deadletter.market.v1", "audit.events.v1"]
    assert "normalization.dedup.changelog.v1" in names
    assert "aggregation.windows.changelog.v1" in names


def test_compare_reports_missing_existing_and_mismatch() -> None:
    specs = [TopicSpec("a", 4, 1, "chain"), TopicSpec("b", 4, 1, "changelog"), TopicSpec("c", 1, 1, "side"),
             TopicSpec("d", 1, 1, "side")]
    missing, statuses = compare(specs, {"a": 4, "b": 6, "c": 3})
    assert [m.name for m in missing] == ["d"]
    by_name = {s.name: s for s in statuses}
    assert by_name["a"].action == "exists"
    assert by_name["b"].action == "mismatch"
    assert by_name["c"].action == "exists"
    assert "3 partitions" in by_name["c"].detail


def test_config_differences() -> None:
    spec = TopicSpec("a", 1, 1, "side", {"retention.ms": "10", "cleanup.policy": "delete"})
    assert config_differences(spec, {"retention.ms": "10", "cleanup.policy": "delete"}) == {}
    assert config_differences(spec, {"retention.ms": "20"}) == {"retention.ms": ("20", "10"),
                                                                "cleanup.policy": (None, "delete")}


def test_chain_topics_must_share_one_partition_count() -> None:
    with pytest.raises(TopicError, match="one partition count"):
        compare([TopicSpec("a", 4, 1, "chain"), TopicSpec("b", 6, 1, "chain")], {})


@pytest.mark.integration
def test_ensure_topics_is_idempotent(kafka_bootstrap: str) -> None:
    suffix = "-" + uuid.uuid4().hex[:10]
    specs = plan_topics(_settings(3, suffix))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:
        first = ensure_topics(admin, specs)
        assert [s.action for s in first] == ["created"] * len(specs)
        second = ensure_topics(admin, specs)
        assert [s.action for s in second] == ["exists"] * len(specs)
        have = existing_topics(admin)
        assert {s.name: have[s.name] for s in specs} == {s.name: s.partitions for s in specs}
        # The same chain topics configured with another partition count: flagged, never altered.
        third = ensure_topics(admin, plan_topics(_settings(5, suffix)))
        assert {s.action for s in third if s.name in (f"raw{suffix}", f"bars{suffix}")} == {"mismatch"}
        assert existing_topics(admin)[f"raw{suffix}"] == 3
        # Retention changed in the configuration: flagged, then set with update_config.
        longer = _settings(3, suffix, raw_retention_ms=7_200_000)
        flagged = {s.name: s for s in ensure_topics(admin, plan_topics(longer))}[f"raw{suffix}"]
        assert flagged.action == "exists"
        assert "retention.ms=3600000 (configured 7200000)" in flagged.detail
        updated = {s.name: s for s in ensure_topics(admin, plan_topics(longer), update_config=True)}
        assert updated[f"raw{suffix}"].action == "updated"
        assert updated[f"bars{suffix}"].action == "exists"
        # The broker applies altered settings asynchronously: wait for them with a deadline.
        deadline = time.monotonic() + 15
        while topic_configs(admin, [f"raw{suffix}"])[f"raw{suffix}"]["retention.ms"] != "7200000":
            assert time.monotonic() < deadline, "retention.ms was not updated"
            time.sleep(0.1)
        assert [s.detail for s in ensure_topics(admin, plan_topics(longer))] == [""] * len(specs)
    finally:
        for future in admin.delete_topics([s.name for s in specs], operation_timeout=30).values():
            future.result()
