"""Settings of the projection service: the shared `Settings` plus the `projection:` section."""

from __future__ import annotations

from typing import Any

from dataproc_shared.config import Settings, env_name
from dataproc_shared.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field

from projection.transform import DEFAULT_MAX_FINAL_BARS, UPDATES_CHANNEL


class ProjectionOptions(BaseModel):
    """The `projection:` section (`DATA_PROC_PROJECTION__...`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Final bars kept per instrument and interval in `md:bars:{instrument_id}:{interval}`.
    max_final_bars: int = Field(default=DEFAULT_MAX_FINAL_BARS, ge=1, le=1_000_000)
    #: Channel announcing every applied change.
    updates_channel: str = Field(default=UPDATES_CHANNEL, min_length=1)
    #: Writes per script call (one batch's calls go in one pipelined round trip).
    pipeline_chunk: int = Field(default=500, ge=1, le=10_000)
    #: Socket connect/read timeout of the Redis client.
    socket_timeout_s: float = Field(default=5.0, gt=0, le=300)
    #: First and longest wait between attempts while Redis is unavailable.
    retry_initial_ms: int = Field(default=100, ge=1, le=60_000)
    retry_max_ms: int = Field(default=5_000, ge=1, le=600_000)
    #: How long one flush keeps retrying before the batch's transaction is aborted (and replayed);
    #: stays well below `loop.transaction_timeout_ms`.
    flush_deadline_s: float = Field(default=30.0, gt=0, le=3_600)


class ProjectionSettings(Settings):
    """Settings of `python -m projection`."""

    projection: ProjectionOptions = ProjectionOptions()

    def redis_url_value(self) -> str:
        """The Redis URL (a secret: never log it); raises `ConfigError` when it is not set."""
        if self.redis_url is None or not self.redis_url.get_secret_value():
            raise ConfigError(f"{env_name('redis_url')}: required by the projection service")
        url = self.redis_url.get_secret_value()
        if self.redis_tls.enabled and url.startswith("redis://"):
            url = "rediss://" + url.removeprefix("redis://")
        return url

    def redis_ssl_options(self) -> dict[str, Any]:
        """redis-py TLS keyword arguments from `redis_tls` (empty when TLS is off)."""
        tls = self.redis_tls
        if not tls.enabled:
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": "required" if tls.verify else "none",
                                   "ssl_check_hostname": tls.verify}
        if tls.ca_file:
            options["ssl_ca_certs"] = tls.ca_file
        if tls.cert_file:
            options["ssl_certfile"] = tls.cert_file
        if tls.key_file:
            options["ssl_keyfile"] = tls.key_file
        return options
