"""Typed, frozen settings of every service, and the one place that turns them into librdkafka configs.

Sources, highest priority first:

1. keyword arguments given to the settings class (the code's own choices, e.g. `service`);
2. environment variables `DATA_PROC_...` (nested groups with `__`: `DATA_PROC_LOOP__BATCH_SIZE`);
3. the per-environment YAML file `dataproc_shared/environments/<env>.yaml`, `<env>` taken from
   `DATA_PROC_ENV` (default `local`), or the file named by `DATA_PROC_CONFIG_FILE`;
4. the defaults below.

The contract's variables are flat top-level fields (`DATA_PROC_KAFKA_BOOTSTRAP` is `kafka_bootstrap`,
`DATA_PROC_AUDIT_QUEUE_SIZE` is `audit_queue_size`); groups are nested models (`kafka`, `topics`,
`loop`, `http`, `*_tls`). A service adds its own group by subclassing `Settings`::

    class AggregationSettings(Settings):
        aggregation: AggregationOptions = AggregationOptions()

which is read from the YAML section `aggregation:` and from `DATA_PROC_AGGREGATION__...`. Sections of
other services in the YAML file are ignored; any other unknown key is an error.

`load_settings` raises `ConfigError` whose message names the variable to fix; services exit non-zero
with it at start (`load_settings_or_exit`).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dataproc_shared.errors import ConfigError
from dataproc_shared.masking import MASK, mask_mapping, mask_text

ENV_PREFIX = "DATA_PROC_"
NESTED_DELIMITER = "__"
ENVIRONMENTS_DIR = Path(__file__).parent / "environments"

Environment = Literal["local", "dev", "staging", "prod"]
Guarantee = Literal["at-least-once", "exactly-once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
AuditSink = Literal["clickhouse", "kafka"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

#: HTTP port (health + metrics) of each service, from the contract.
SERVICE_PORTS: dict[str, int] = {
    "normalization": 8080,
    "enrichment": 8081,
    "aggregation": 8082,
    "projection": 8083,
}
#: Section names that belong to services: ignored in the YAML file by settings classes lacking them.
SERVICE_SECTIONS: frozenset[str] = frozenset(SERVICE_PORTS)
#: Environments where plaintext transports and missing passwords are refused.
STRICT_ENVIRONMENTS: frozenset[str] = frozenset({"staging", "prod"})

_frozen = ConfigDict(frozen=True, extra="forbid")


class KafkaOptions(BaseModel):
    """Kafka client security and tuning (`DATA_PROC_KAFKA__...`). The bootstrap is `kafka_bootstrap`."""

    model_config = _frozen

    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_endpoint_identification_algorithm: Literal["https", "none"] = "https"
    group_id: str | None = Field(default=None, description="Consumer group; default `dataproc-<service>`.")
    #: librdkafka properties applied to every client, e.g. {"socket.keepalive.enable": "true"}.
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: librdkafka properties applied to consumers only.
    consumer_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: librdkafka properties applied to producers only.
    producer_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)


class RetentionOptions(BaseModel):
    """Retention per contract topic in milliseconds (`-1` keeps forever)."""

    model_config = _frozen

    raw: int = 7 * 24 * 3600 * 1000
    normalized: int = 7 * 24 * 3600 * 1000
    enriched: int = 7 * 24 * 3600 * 1000
    bars: int = 30 * 24 * 3600 * 1000
    deadletter: int = 30 * 24 * 3600 * 1000
    audit: int = 30 * 24 * 3600 * 1000


#: Room in a dead letter for everything but the payload: JSON field names and values, the detail
#: (at most 2 000 characters, up to 6 bytes each when escaped), key, headers and batch framing.
DEADLETTER_ENVELOPE_BYTES = 64 * 1024


def deadletter_limit_for(raw_max_message_bytes: int) -> int:
    """A dead-letter message size limit that holds any raw record up to `raw_max_message_bytes`.

    The payload travels base64-encoded (4 bytes per 3, rounded up), plus `DEADLETTER_ENVELOPE_BYTES`.
    """
    return 4 * -(-raw_max_message_bytes // 3) + DEADLETTER_ENVELOPE_BYTES


class TopicOptions(BaseModel):
    """Topic names (contract defaults), partitioning and retention (`DATA_PROC_TOPICS__...`).

    The audit topic's name is the contract's flat `DATA_PROC_AUDIT_KAFKA_TOPIC`
    (`Settings.audit_kafka_topic`).
    """

    model_config = _frozen

    raw: str = "ingestion.market.raw.v1"
    normalized: str = "normalized.market.ticks.v1"
    enriched: str = "enriched.market.ticks.v1"
    bars: str = "aggregated.market.bars.v1"
    deadletter: str = "deadletter.market.v1"
    #: Partition count of every chain topic (raw, normalized, enriched, bars) and of the changelogs.
    partitions: int = Field(default=6, ge=1, le=10_000)
    #: Partition count of the dead-letter and audit topics.
    side_partitions: int = Field(default=3, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=15)
    min_insync_replicas: int = Field(default=1, ge=1, le=15)
    retention_ms: RetentionOptions = RetentionOptions()
    normalization_dedup_changelog: str = "normalization.dedup.changelog.v1"
    aggregation_windows_changelog: str = "aggregation.windows.changelog.v1"
    #: `max.message.bytes` of the raw topic: the largest raw record a producer can write (Kafka's
    #: default), and so the largest payload a dead letter has to carry.
    raw_max_message_bytes: int = Field(default=1_048_588, ge=1_024, le=100_000_000)
    #: `max.message.bytes` of the dead-letter topic and `message.max.bytes` of the services'
    #: producers. Default: room for a raw record of `raw_max_message_bytes`, base64-encoded, plus the
    #: dead letter's JSON fields (`deadletter_message_limit`).
    deadletter_max_message_bytes: int | None = Field(default=None, ge=4_096, le=100_000_000)

    @property
    def deadletter_message_limit(self) -> int:
        """The dead-letter topic's message size limit: configured, or derived from the raw topic's."""
        if self.deadletter_max_message_bytes is not None:
            return self.deadletter_max_message_bytes
        return deadletter_limit_for(self.raw_max_message_bytes)

    def changelog(self, service: str, store: str) -> str:
        """Name of the compacted changelog topic of `service`'s state store `store`."""
        configured = getattr(self, f"{service}_{store}_changelog", None)
        return configured if isinstance(configured, str) else f"{service}.{store}.changelog.v1"


class LoopOptions(BaseModel):
    """The Kafka loop (`DATA_PROC_LOOP__...`)."""

    model_config = _frozen

    guarantee: Guarantee = "exactly-once"
    #: Most records per cycle (one transaction). A cycle takes what is already fetched and never
    #: waits to fill, so this bound only matters with a backlog, where larger transactions spread
    #: the per-cycle costs (commit round trips, audit events, sink inserts) over more records.
    batch_size: int = Field(default=2_000, ge=1, le=100_000)
    #: Longest wait for the first record of a cycle (idle wake-up period; timers run between waits).
    batch_timeout_ms: int = Field(default=100, ge=1, le=60_000)
    tick_interval_ms: int = Field(default=1_000, ge=10, le=600_000)
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000, le=900_000)
    shutdown_timeout_s: float = Field(default=20.0, gt=0, le=600)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    session_timeout_ms: int = Field(default=45_000, ge=1_000)
    #: /live answers 503 when the loop has not ticked for this long.
    live_stall_timeout_s: float = Field(default=60.0, gt=0)
    #: Pause consumption when this many records wait for a slow sink; resume below `resume_records`.
    pause_records: int = Field(default=20_000, ge=1)
    resume_records: int = Field(default=5_000, ge=0)
    #: At start, an unreachable broker is retried with exponential backoff (from 0.5 s) up to this
    #: delay between attempts, for as long as it takes; the health server reports it meanwhile.
    startup_backoff_max_s: float = Field(default=10.0, gt=0, le=300)
    #: At start, how long a needed topic may be missing on a reachable broker (a topic job still
    #: running, a restarted broker still loading its metadata) before the service exits with status 1.
    startup_topic_wait_s: float = Field(default=30.0, ge=0, le=3_600)
    #: Event-time alignment (processors that report event times, e.g. normalization): an input
    #: partition more than this ahead in event time of the slowest partition with records waiting
    #: is paused until that one catches up. 0 turns it off. Keep it well below the aggregation's
    #: allowed lateness (5 s): a partition can overshoot it by how far one batch advances it.
    align_max_ahead_ms: int = Field(default=1_000, ge=0, le=3_600_000)
    #: Starvation guard: a hold this long during which the frontier advanced less than twice the wall
    #: time lets the partition through once.
    align_max_pause_ms: int = Field(default=500, ge=100, le=3_600_000)
    #: A held partition's records stay in the loop (no client pause, so nothing prefetched is purged
    #: and fetched again) up to these bounds per partition; past either, the partition is paused in
    #: the client until its held records are below half of both.
    align_hold_records: int = Field(default=10_000, ge=1, le=1_000_000)
    align_hold_bytes: int = Field(default=16 * 1024 * 1024, ge=1_024, le=1024**3)
    #: An open transaction on a needed partition (input, changelog) whose producer wrote nothing for
    #: this long is *hanging* and gets its missing marker (`dataproc_shared.kafka.hanging`). Unset:
    #: the brokers' `transaction.max.timeout.ms`, the longest any transaction may stay open. Set it
    #: lower only when no producer writing those topics uses a longer `transaction.timeout.ms`.
    hanging_transaction_timeout_ms: int | None = Field(default=None, ge=1_000)
    #: How often the assigned input partitions are checked for hanging transactions.
    hanging_check_interval_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _thresholds(self) -> LoopOptions:
        if self.resume_records >= self.pause_records:
            raise ValueError("resume_records must be lower than pause_records")
        return self


class HttpOptions(BaseModel):
    """The health/metrics HTTP server (`DATA_PROC_HTTP__...`). `port` defaults to the service's port."""

    model_config = _frozen

    host: str = "0.0.0.0"  # noqa: S104 - the probe endpoint must be reachable from the orchestrator
    port: int = Field(default=8080, ge=0, le=65_535)


class TlsOptions(BaseModel):
    """TLS to a server (PostgreSQL, Redis, ClickHouse). Off means the URL/DSN decides."""

    model_config = _frozen

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


def _split_list(value: Any) -> Any:
    """Accept `a,b` and JSON-style lists for list settings given as environment variables."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            text = text.strip("[]")
        return [p.strip().strip("'\"") for p in text.split(",") if p.strip().strip("'\"")]
    return value


class Settings(BaseSettings):
    """Settings shared by every service. Subclass to add a service's own section."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        case_sensitive=False,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    env: Environment = "local"
    service: str = Field(default="dataproc", pattern=r"^[a-z][a-z0-9_-]*$")
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1)
    version: str = "0.1.0"
    log_level: LogLevel = "INFO"

    kafka_bootstrap: str = "127.0.0.1:9092"
    clickhouse_url: str = "http://localhost:8123"
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr | None = None
    clickhouse_database: str = "market_data"
    postgres_dsn: SecretStr | None = None
    redis_url: SecretStr | None = None

    audit_enabled: bool = True
    normalization_audit_enabled: bool | None = None
    enrichment_audit_enabled: bool | None = None
    aggregation_audit_enabled: bool | None = None
    projection_audit_enabled: bool | None = None
    audit_kafka_topic: str = "audit.events.v1"
    audit_queue_size: int = Field(default=10_000, ge=1, le=10_000_000)
    audit_flush_interval_ms: int = Field(default=1_000, ge=10, le=600_000)
    audit_sinks: Annotated[tuple[AuditSink, ...], NoDecode] = ("clickhouse",)
    audit_ttl_days: int = Field(default=90, ge=1, le=36_500)

    kafka: KafkaOptions = KafkaOptions()
    topics: TopicOptions = TopicOptions()
    loop: LoopOptions = LoopOptions()
    http: HttpOptions = HttpOptions()
    postgres_tls: TlsOptions = TlsOptions()
    redis_tls: TlsOptions = TlsOptions()
    clickhouse_tls: TlsOptions = TlsOptions()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init kwargs > environment variables > the environment's YAML file > defaults."""
        return (init_settings, env_settings, EnvironmentFileSource(settings_cls))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("audit_sinks", mode="before")
    @classmethod
    def _sinks(cls, value: Any) -> Any:
        return _split_list(value)

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        """The HTTP port defaults to the contract's port of the service."""
        if isinstance(data, dict):
            port = SERVICE_PORTS.get(str(data.get("service", "")))
            http = data.get("http")
            if port is not None and (http is None or (isinstance(http, dict) and "port" not in http)):
                data = {**data, "http": {**(http or {}), "port": port}}
        return data

    @model_validator(mode="after")
    def _environment_rules(self) -> Settings:
        problems = self.environment_problems()
        if problems:
            raise ConfigError(problems)
        return self

    def environment_problems(self) -> list[str]:
        """Violations of the rules of `env` (strict in staging/prod), each naming its variable."""
        problems: list[str] = []
        k = self.kafka
        if k.security_protocol.startswith("SASL"):
            needed = f"required with {k.security_protocol}"
            if k.sasl_mechanism is None:
                problems.append(f"{env_name('kafka', 'sasl_mechanism')}: {needed}")
            if k.sasl_mechanism != "OAUTHBEARER":
                if not k.sasl_username:
                    problems.append(f"{env_name('kafka', 'sasl_username')}: {needed}")
                if not _has_secret(k.sasl_password):
                    problems.append(f"{env_name('kafka', 'sasl_password')}: {needed}")
        if self.env not in STRICT_ENVIRONMENTS:
            return problems
        where = f"not allowed in {self.env}"
        if k.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            problems.append(f"{env_name('kafka', 'security_protocol')}: {k.security_protocol} is {where}; "
                            "use SSL or SASL_SSL")
        if k.ssl_endpoint_identification_algorithm == "none":
            name = env_name("kafka", "ssl_endpoint_identification_algorithm")
            problems.append(f"{name}: 'none' is {where}")
        if not self.clickhouse_embedded and not _has_secret(self.clickhouse_password):
            problems.append(f"{env_name('clickhouse_password')}: a password is required in {self.env}")
        if self.clickhouse_url.startswith("http://"):
            problems.append(f"{env_name('clickhouse_url')}: plain http is {where}; use https://")
        if self.postgres_dsn is not None and not _dsn_has_password(self.postgres_dsn.get_secret_value()):
            problems.append(f"{env_name('postgres_dsn')}: the DSN carries no password ({where})")
        if self.redis_url is not None and not _url_has_password(self.redis_url.get_secret_value()):
            problems.append(f"{env_name('redis_url')}: the URL carries no password ({where})")
        for name, tls in (("postgres_tls", self.postgres_tls), ("redis_tls", self.redis_tls),
                          ("clickhouse_tls", self.clickhouse_tls)):
            if tls.enabled and not tls.verify:
                problems.append(f"{env_name(name, 'verify')}: certificate verification off is {where}")
        return problems

    # ---- derived values -------------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """`<service>-<instance_id>`: Kafka client id and transactional id of this instance."""
        return f"{self.service}-{self.instance_id}"

    @property
    def group_id(self) -> str:
        """Consumer group of the service."""
        return self.kafka.group_id or f"dataproc-{self.service}"

    @property
    def clickhouse_embedded(self) -> bool:
        """Whether `clickhouse_url` names the in-process engine (chDB) rather than a server."""
        return not self.clickhouse_url.startswith(("http://", "https://"))

    @property
    def clickhouse_path(self) -> str:
        """Folder of the embedded engine (`chdb://PATH` or a bare path)."""
        url = self.clickhouse_url
        return url[len("chdb://"):] if url.startswith("chdb://") else url

    def audit_enabled_for(self, service: str | None = None) -> bool:
        """Whether `service` (default: this one) emits audit events: global and per-service toggle."""
        own = getattr(self, f"{service or self.service}_audit_enabled", None)
        return self.audit_enabled and (own is None or bool(own))

    def all_topics(self) -> dict[str, str]:
        """Logical name -> topic name of the six contract topics."""
        t = self.topics
        return {"raw": t.raw, "normalized": t.normalized, "enriched": t.enriched, "bars": t.bars,
                "deadletter": t.deadletter, "audit": self.audit_kafka_topic}

    def masked(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict safe to log and serve: secrets and URL credentials masked."""
        data = self.model_dump(mode="json")
        for name in ("postgres_dsn", "redis_url"):
            secret: SecretStr | None = getattr(self, name)
            if secret is not None:
                raw = secret.get_secret_value()
                data[name] = mask_text(raw) if "://" in raw else MASK
        return mask_mapping(data)


class EnvironmentFileSource(PydanticBaseSettingsSource):
    """The per-environment YAML file, below environment variables in priority."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.path = environment_file()
        self._data = self._load()

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            raw = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{ENV_PREFIX}CONFIG_FILE: cannot read {self.path}: {exc}") from exc
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{ENV_PREFIX}CONFIG_FILE: {self.path} must hold a mapping")
        fields = self.settings_cls.model_fields
        # Another service's section is not this settings class's business.
        return {k: v for k, v in raw.items() if k in fields or k not in SERVICE_SECTIONS}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Value of one field from the file (unused: `__call__` returns the whole mapping)."""
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        """The file's settings, other services' sections removed."""
        return dict(self._data)


def environment_file() -> Path | None:
    """The YAML file for this process: `DATA_PROC_CONFIG_FILE`, else the packaged `<DATA_PROC_ENV>.yaml`."""
    explicit = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    if explicit:
        return Path(explicit)
    env = os.environ.get(f"{ENV_PREFIX}ENV", "local").strip().lower() or "local"
    path = ENVIRONMENTS_DIR / f"{env}.yaml"
    return path if path.is_file() else None


def env_name(*loc: str | int) -> str:
    """Environment variable of a settings location.

    `("loop", "batch_size")` -> `DATA_PROC_LOOP__BATCH_SIZE`.
    """
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) or not str(part) or str(part).startswith(("function-", "[")):
            break
        parts.append(str(part).upper())
    return ENV_PREFIX + NESTED_DELIMITER.join(parts)


S = TypeVar("S", bound=Settings)


def load_settings(cls: type[S] = Settings, service: str | None = None, **overrides: Any) -> S:  # type: ignore[assignment]
    """Build the settings of `service` from the environment; raise `ConfigError` naming bad variables."""
    kwargs: dict[str, Any] = dict(overrides)
    if service is not None:
        kwargs["service"] = service
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()]) from None
    except SettingsError as exc:
        raise ConfigError(mask_text(str(exc))) from None


def load_settings_or_exit(cls: type[S] = Settings, service: str | None = None) -> S:  # type: ignore[assignment]
    """`load_settings`, but print the problem and exit with status 2 on bad configuration."""
    try:
        return load_settings(cls, service=service)
    except ConfigError as exc:
        print(f"{service or 'dataproc'}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _describe(err: Any) -> str:
    loc = tuple(err.get("loc", ()))
    name = env_name(*loc) if loc else ENV_PREFIX + "*"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown setting"
    value = err.get("input")
    shown = "" if not isinstance(value, str | int | float) or _looks_secret(name) else f" (got {value!r})"
    return f"{name}: {msg}{mask_text(shown)}"


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(p in lowered for p in ("password", "secret", "token", "dsn", "url"))


def _has_secret(value: SecretStr | None) -> bool:
    return value is not None and bool(value.get_secret_value())


def _url_has_password(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return bool(parts.password) or (bool(parts.username) and parts.scheme.startswith("redis"))


def _dsn_has_password(dsn: str) -> bool:
    if "://" in dsn:
        return _url_has_password(dsn) or "password=" in dsn
    return any(p.startswith("password=") and len(p) > len("password=") for p in dsn.split())


# ---- librdkafka configuration: the only place settings become client properties ------------------------

KafkaConfig = dict[str, str | int | float | bool]


def kafka_common_config(settings: Settings) -> KafkaConfig:
    """Properties every client of this service uses: bootstrap, client id, security, `kafka.extra`."""
    k = settings.kafka
    conf: KafkaConfig = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": settings.client_id,
        "security.protocol": k.security_protocol,
    }
    if k.security_protocol.startswith("SASL"):
        if k.sasl_mechanism:
            conf["sasl.mechanism"] = k.sasl_mechanism
        if k.sasl_username:
            conf["sasl.username"] = k.sasl_username
        if k.sasl_password is not None:
            conf["sasl.password"] = k.sasl_password.get_secret_value()
    if k.security_protocol.endswith("SSL"):
        conf["ssl.endpoint.identification.algorithm"] = k.ssl_endpoint_identification_algorithm
        for prop, value in (("ssl.ca.location", k.ssl_ca_location),
                            ("ssl.certificate.location", k.ssl_certificate_location),
                            ("ssl.key.location", k.ssl_key_location)):
            if value:
                conf[prop] = value
        if k.ssl_key_password is not None:
            conf["ssl.key.password"] = k.ssl_key_password.get_secret_value()
    conf.update(k.extra)
    return conf


def consumer_config(settings: Settings, group_id: str | None = None, **overrides: str | int | float | bool
                    ) -> KafkaConfig:
    """Consumer properties: manual offsets, `read_committed` under exactly-once, loop timeouts."""
    loop = settings.loop
    conf = kafka_common_config(settings)
    conf.update({
        "group.id": group_id or settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed" if loop.guarantee == "exactly-once" else "read_uncommitted",
        "max.poll.interval.ms": loop.max_poll_interval_ms,
        "session.timeout.ms": loop.session_timeout_ms,
    })
    conf.update(settings.kafka.consumer_extra)
    conf.update(overrides)
    return conf


def producer_config(settings: Settings, transactional_id: str | None = None,
                    **overrides: str | int | float | bool) -> KafkaConfig:
    """Producer properties: idempotent, acks=all; transactional when `transactional_id` is given."""
    conf = kafka_common_config(settings)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # A transaction that starts while the coordinator still writes the previous one's markers
        # gets CONCURRENT_TRANSACTIONS on AddOffsetsToTxn/AddPartitionsToTxn and is retried after
        # this backoff: librdkafka's default of 100 ms added up to 100 ms to every hop whenever
        # cycles follow each other closely. Other retries back off exponentially from here up to
        # `retry.backoff.max.ms` (1 s).
        "retry.backoff.ms": 10,
        # A dead letter carries a whole raw record base64-encoded: room for the largest one the raw
        # topic accepts (librdkafka's default of 1 000 000 bytes is less than a 1 MB record's).
        "message.max.bytes": max(1_000_000, settings.topics.deadletter_message_limit),
    })
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = settings.loop.transaction_timeout_ms
    conf.update(settings.kafka.producer_extra)
    conf.update(overrides)
    return conf


def admin_config(settings: Settings) -> KafkaConfig:
    """Admin client properties (topic tooling)."""
    return kafka_common_config(settings)
