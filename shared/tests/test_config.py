from __future__ import annotations

from pathlib import Path

import pytest
from dataproc_shared.config import (
    ENVIRONMENTS_DIR,
    Settings,
    consumer_config,
    env_name,
    kafka_common_config,
    load_settings,
    load_settings_or_exit,
    producer_config,
)
from dataproc_shared.errors import ConfigError
from pydantic import BaseModel, ConfigDict, SecretStr


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from an environment without any DATA_PROC_ variable (the stack's env is sourced in CI)."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("DATA_PROC_"):
            monkeypatch.delenv(name)


def write_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("DATA_PROC_CONFIG_FILE", str(path))
    return path


class AggregationOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    intervals: tuple[str, ...] = ("1m", "5m", "1h")
    allowed_lateness_ms: int = 5000


class AggregationSettings(Settings):
    aggregation: AggregationOptions = AggregationOptions()


def test_defaults_are_contract_values() -> None:
    s = load_settings(service="normalization")
    assert s.env == "local"
    assert s.topics.raw == "ingestion.market.raw.v1"
    assert s.topics.normalized == "normalized.market.ticks.v1"
    assert s.topics.enriched == "enriched.market.ticks.v1"
    assert s.topics.bars == "aggregated.market.bars.v1"
    assert s.topics.deadletter == "deadletter.market.v1"
    assert s.audit_kafka_topic == "audit.events.v1"
    assert s.clickhouse_database == "market_data"
    assert s.loop.guarantee == "exactly-once"
    assert s.instance_id


@pytest.mark.parametrize(
    ("service", "port"),
    [("normalization", 8080), ("enrichment", 8081), ("aggregation", 8082), ("projection", 8083)],
)
def test_default_port_per_service(service: str, port: int) -> None:
    assert load_settings(service=service).http.port == port


def test_port_from_env_wins_over_service_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_HTTP__PORT", "9999")
    assert load_settings(service="enrichment").http.port == 9999


def test_precedence_defaults_file_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_file(tmp_path, monkeypatch, "loop:\n  batch_size: 42\n  batch_timeout_ms: 7\n"
               "audit_queue_size: 11\n")
    s = load_settings(service="normalization")
    assert s.loop.batch_size == 42  # file over default
    assert s.loop.tick_interval_ms == 1000  # default kept for keys the file does not set
    assert s.audit_queue_size == 11
    monkeypatch.setenv("DATA_PROC_LOOP__BATCH_SIZE", "99")
    monkeypatch.setenv("DATA_PROC_AUDIT_QUEUE_SIZE", "12")
    s = load_settings(service="normalization")
    assert s.loop.batch_size == 99  # env over file
    assert s.loop.batch_timeout_ms == 7  # nested merge keeps the file's sibling key
    assert s.audit_queue_size == 12


def test_env_selects_packaged_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_ENV", "dev")
    s = load_settings(service="projection")
    assert s.env == "dev"
    assert s.clickhouse_url.startswith("http://clickhouse")
    assert set(s.audit_sinks) == {"clickhouse", "kafka"}


def test_every_packaged_environment_file_loads_with_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(p.stem for p in ENVIRONMENTS_DIR.glob("*.yaml")) == ["dev", "local", "prod", "staging"]
    monkeypatch.setenv("DATA_PROC_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("DATA_PROC_KAFKA__SASL_PASSWORD", "kpw")
    monkeypatch.setenv("DATA_PROC_CLICKHOUSE_PASSWORD", "cpw")
    for env in ("local", "dev", "staging", "prod"):
        monkeypatch.setenv("DATA_PROC_ENV", env)
        assert load_settings(service="aggregation").env == env


def test_contract_flat_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_KAFKA_BOOTSTRAP", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("DATA_PROC_CLICKHOUSE_URL", "chdb:///tmp/x")
    monkeypatch.setenv("DATA_PROC_POSTGRES_DSN", "postgresql://dataproc:pgpw@db:5432/reference_data")
    monkeypatch.setenv("DATA_PROC_REDIS_URL", "redis://:rpw@cache:6379/0")
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "true")
    monkeypatch.setenv("DATA_PROC_PROJECTION_AUDIT_ENABLED", "false")
    monkeypatch.setenv("DATA_PROC_AUDIT_KAFKA_TOPIC", "audit.test")
    monkeypatch.setenv("DATA_PROC_AUDIT_QUEUE_SIZE", "77")
    monkeypatch.setenv("DATA_PROC_AUDIT_FLUSH_INTERVAL_MS", "250")
    monkeypatch.setenv("DATA_PROC_AUDIT_SINKS", "kafka, clickhouse")
    s = load_settings(service="projection")
    assert s.kafka_bootstrap == "broker-1:9092,broker-2:9092"
    assert s.clickhouse_embedded
    assert s.clickhouse_path == "/tmp/x"
    assert isinstance(s.postgres_dsn, SecretStr)
    assert s.postgres_dsn.get_secret_value().endswith("/reference_data")
    assert s.redis_url is not None
    assert "rpw" in s.redis_url.get_secret_value()
    assert not s.audit_enabled_for()
    assert s.audit_enabled_for("normalization")
    assert s.audit_kafka_topic == "audit.test"
    assert s.all_topics()["audit"] == "audit.test"
    assert (s.audit_queue_size, s.audit_flush_interval_ms) == (77, 250)
    assert s.audit_sinks == ("kafka", "clickhouse")
    monkeypatch.setenv("DATA_PROC_AUDIT_ENABLED", "false")
    assert not load_settings(service="normalization").audit_enabled_for()


def test_settings_are_frozen() -> None:
    s = load_settings(service="normalization")
    with pytest.raises(Exception, match="frozen"):
        s.log_level = "DEBUG"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        s.loop.batch_size = 3  # type: ignore[misc]


def test_service_section_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_file(
        tmp_path,
        monkeypatch,
        "aggregation:\n  intervals: [1m]\n  allowed_lateness_ms: 100\n"
        "projection:\n  max_bars: 10\n",  # another service's section: ignored
    )
    monkeypatch.setenv("DATA_PROC_AGGREGATION__ALLOWED_LATENESS_MS", "250")
    s = load_settings(AggregationSettings, service="aggregation")
    assert isinstance(s, AggregationSettings)
    assert s.aggregation.intervals == ("1m",)
    assert s.aggregation.allowed_lateness_ms == 250
    # The base class ignores the aggregation section too.
    assert load_settings(service="normalization").loop.batch_size == 2000


def test_unknown_key_in_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_file(tmp_path, monkeypatch, "loop:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="DATA_PROC_LOOP__BATCH_SISE: unknown setting"):
        load_settings(service="normalization")


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("DATA_PROC_LOOP__BATCH_SIZE", "abc", "DATA_PROC_LOOP__BATCH_SIZE"),
        ("DATA_PROC_LOOP__BATCH_SIZE", "0", "DATA_PROC_LOOP__BATCH_SIZE"),
        ("DATA_PROC_LOOP__GUARANTEE", "at-most-once", "DATA_PROC_LOOP__GUARANTEE"),
        ("DATA_PROC_ENV", "qa", "DATA_PROC_ENV"),
        ("DATA_PROC_AUDIT_SINKS", "kafka,s3", "DATA_PROC_AUDIT_SINKS"),
        ("DATA_PROC_KAFKA__SECURITY_PROTOCOL", "TLS", "DATA_PROC_KAFKA__SECURITY_PROTOCOL"),
        ("DATA_PROC_LOOP__RESUME_RECORDS", "999999", "DATA_PROC_LOOP"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings(service="normalization")
    assert any(p.startswith(named) for p in info.value.problems), info.value.problems


def test_prod_refuses_plaintext_and_missing_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_ENV", "prod")
    monkeypatch.setenv("DATA_PROC_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT")
    monkeypatch.setenv("DATA_PROC_CLICKHOUSE_URL", "http://ch:8123")
    monkeypatch.setenv("DATA_PROC_POSTGRES_DSN", "postgresql://dataproc@db/reference_data")
    monkeypatch.setenv("DATA_PROC_REDIS_URL", "redis://cache:6379/0")
    with pytest.raises(ConfigError) as info:
        load_settings(service="enrichment")
    text = str(info.value)
    for var in (
        "DATA_PROC_KAFKA__SECURITY_PROTOCOL: PLAINTEXT is not allowed in prod",
        "DATA_PROC_CLICKHOUSE_PASSWORD",
        "DATA_PROC_CLICKHOUSE_URL",
        "DATA_PROC_POSTGRES_DSN",
        "DATA_PROC_REDIS_URL",
    ):
        assert var in text


def test_staging_refuses_sasl_plaintext_and_requires_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_ENV", "staging")
    monkeypatch.setenv("DATA_PROC_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("DATA_PROC_CLICKHOUSE_PASSWORD", "x")
    with pytest.raises(ConfigError) as info:
        load_settings(service="enrichment")
    assert {p.split(":")[0] for p in info.value.problems} == {
        "DATA_PROC_KAFKA__SECURITY_PROTOCOL",
        "DATA_PROC_KAFKA__SASL_USERNAME",
        "DATA_PROC_KAFKA__SASL_PASSWORD",
    }


def test_local_allows_plaintext() -> None:
    assert load_settings(service="normalization").kafka.security_protocol == "PLAINTEXT"


def test_load_settings_or_exit_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATA_PROC_LOOP__BATCH_SIZE", "-1")
    with pytest.raises(SystemExit) as info:
        load_settings_or_exit(service="normalization")
    assert info.value.code == 2
    assert "DATA_PROC_LOOP__BATCH_SIZE" in capsys.readouterr().err


def test_masked_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_POSTGRES_DSN", "postgresql://dataproc:pg-secret-1@db:5432/reference_data")
    monkeypatch.setenv("DATA_PROC_REDIS_URL", "redis://:redis-secret-2@cache:6379/0")
    monkeypatch.setenv("DATA_PROC_CLICKHOUSE_PASSWORD", "ch-secret-3")
    monkeypatch.setenv("DATA_PROC_CLICKHOUSE_URL", "https://user:ch-secret-4@ch:8443")
    monkeypatch.setenv("DATA_PROC_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("DATA_PROC_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("DATA_PROC_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("DATA_PROC_KAFKA__SASL_PASSWORD", "kafka-secret-5")
    monkeypatch.setenv("DATA_PROC_KAFKA__EXTRA", '{"sasl.oauthbearer.client.secret": "kafka-secret-6"}')
    s = load_settings(service="enrichment")
    masked = s.masked()
    text = repr(masked)
    for n in range(1, 7):
        assert f"secret-{n}" not in text
    assert masked["postgres_dsn"] == "postgresql://dataproc:***@db:5432/reference_data"
    assert masked["clickhouse_url"] == "https://user:***@ch:8443"
    assert masked["kafka"]["sasl_username"] == "svc"
    assert "kafka-secret-5" not in repr(s)
    assert "pg-secret-1" not in str(s)
    # ... while the real values still reach the client config
    assert kafka_common_config(s)["sasl.password"] == "kafka-secret-5"


def test_librdkafka_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_INSTANCE_ID", "pod-1")
    monkeypatch.setenv("DATA_PROC_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("DATA_PROC_KAFKA__SSL_CA_LOCATION", "/ca.pem")
    monkeypatch.setenv("DATA_PROC_KAFKA__EXTRA", '{"socket.keepalive.enable": true}')
    monkeypatch.setenv("DATA_PROC_KAFKA__CONSUMER_EXTRA", '{"fetch.min.bytes": 1024}')
    s = load_settings(service="aggregation")
    common = kafka_common_config(s)
    assert common["client.id"] == "aggregation-pod-1"
    assert common["security.protocol"] == "SSL"
    assert common["ssl.ca.location"] == "/ca.pem"
    assert common["socket.keepalive.enable"] is True
    c = consumer_config(s)
    assert c["group.id"] == "dataproc-aggregation"
    assert c["isolation.level"] == "read_committed"
    assert c["enable.auto.commit"] is False
    assert c["fetch.min.bytes"] == 1024
    p = producer_config(s, transactional_id=s.client_id)
    assert p["transactional.id"] == "aggregation-pod-1"
    assert p["enable.idempotence"] is True
    assert p["acks"] == "all"
    # short backoff for CONCURRENT_TRANSACTIONS between back-to-back transactions (hop latency)
    assert p["retry.backoff.ms"] == 10
    assert "fetch.min.bytes" not in p
    assert "transactional.id" not in producer_config(s)
    monkeypatch.setenv("DATA_PROC_LOOP__GUARANTEE", "at-least-once")
    assert consumer_config(load_settings(service="aggregation"))["isolation.level"] == "read_uncommitted"


def test_env_name() -> None:
    assert env_name("loop", "batch_size") == "DATA_PROC_LOOP__BATCH_SIZE"
    assert env_name("audit_sinks", 1) == "DATA_PROC_AUDIT_SINKS"


def test_changelog_names() -> None:
    t = load_settings(service="aggregation").topics
    assert t.changelog("aggregation", "windows") == "aggregation.windows.changelog.v1"
    assert t.changelog("projection", "x") == "projection.x.changelog.v1"
