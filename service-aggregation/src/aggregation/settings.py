"""Settings of the aggregation service: the shared settings plus the `aggregation` section."""

from __future__ import annotations

from typing import Annotated

from dataproc_shared.config import Settings
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from aggregation.transform import ChangelogFormat, Interval, WindowConfig

#: Update cadence (ms) of the open bars of these intervals while `update_intervals_ms` is unset: an
#: open 5-minute bar is at most 5 s old in Redis and ClickHouse, an open hourly bar at most 15 s
#: (plus the pipeline's latency); other intervals follow `update_interval_ms`. At 1 s the 5m and 1h
#: updates are two thirds of all updates; these cadences halve them (docs/benchmarks.md, round 5).
DEFAULT_UPDATE_INTERVALS_MS: dict[str, int] = {"5m": 5_000, "1h": 15_000}


class AggregationOptions(BaseModel):
    """Bars and the service's extra duties (`DATA_PROC_AGGREGATION__...`, YAML section `aggregation:`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Bar intervals, e.g. `1m,5m,1h` (units ms, s, m, h, d).
    intervals: Annotated[tuple[str, ...], NoDecode] = ("1m", "5m", "1h")
    #: A window stays open until the partition's watermark passes `window_end + allowed_lateness_ms`.
    allowed_lateness_ms: int = Field(default=5_000, ge=0, le=86_400_000)
    #: A partition that receives nothing for this long (wall clock) is idle: it closes the windows
    #: whose `window_end + allowed_lateness_ms` has passed on the wall clock, and each of the others
    #: once the wall clock passes its close (checked every `loop.tick_interval_ms`) while it stays
    #: idle; a window that has not ended is never closed by this. A partition with records still
    #: waiting (consumer lag > 0, refreshed every 10 s by the loop) is never idle, so keep this above
    #: that refresh interval.
    idle_timeout_ms: int = Field(default=30_000, ge=100, le=86_400_000)
    #: Changed open bars are emitted as updates (`is_final = false`) this often (all partitions
    #: together), hence at most this often per bar; 0 = every cycle.
    update_interval_ms: int = Field(default=1_000, ge=0, le=3_600_000)
    #: Per bar interval, another update cadence than `update_interval_ms` (ms), e.g.
    #: `{"1h": 15000}`; intervals not named use `update_interval_ms`. Unset: the cadences of
    #: `DEFAULT_UPDATE_INTERVALS_MS` for the configured intervals among them (never faster than
    #: `update_interval_ms`); `{}`: every interval at `update_interval_ms`.
    update_intervals_ms: dict[str, Annotated[int, Field(ge=0, le=3_600_000)]] | None = None
    #: How the open windows are written to the state changelog: `instrument` (one entry per
    #: instrument) or `window` (one per window, the format before; for a staged upgrade, see
    #: docs/runtime.md). Both are read whatever this says.
    changelog_format: ChangelogFormat = "instrument"
    #: Write bars (and late trades) to ClickHouse.
    clickhouse_enabled: bool = True
    #: Apply the ClickHouse migrations at start (the owner of the embedded engine does).
    migrate_clickhouse: bool = True
    #: Serve the read API (bars, latest bar, summary, audit events) on the HTTP port.
    read_api_enabled: bool = True
    #: Largest number of rows one read API request returns.
    read_api_max_rows: int = Field(default=10_000, ge=1, le=1_000_000)

    @field_validator("intervals", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.strip("[]").split(",") if p.strip())
        return value

    @field_validator("intervals")
    @classmethod
    def _valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one interval is required")
        for name in value:
            Interval.parse(name)
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate intervals: {list(value)}")
        return value

    @field_validator("update_intervals_ms")
    @classmethod
    def _update_intervals_known(cls, value: dict[str, int] | None, info: ValidationInfo
                                ) -> dict[str, int] | None:
        intervals = info.data.get("intervals")
        unknown = sorted(set(value or ()) - set(intervals or ()))
        if intervals is not None and unknown:
            raise ValueError(f"names {unknown}, which are not among the intervals {list(intervals)}")
        return value

    def update_cadences_ms(self) -> dict[str, int]:
        """The update cadence (ms) of every configured interval."""
        if self.update_intervals_ms is not None:
            named = self.update_intervals_ms
        else:
            named = {name: max(self.update_interval_ms, ms)
                     for name, ms in DEFAULT_UPDATE_INTERVALS_MS.items() if name in self.intervals}
        return {name: named.get(name, self.update_interval_ms) for name in self.intervals}

    def window_config(self) -> WindowConfig:
        """The windowing core's configuration."""
        return WindowConfig.from_names(self.intervals, self.allowed_lateness_ms, self.idle_timeout_ms,
                                       self.update_interval_ms, self.update_cadences_ms())


class AggregationSettings(Settings):
    """Settings of `python -m aggregation`."""

    aggregation: AggregationOptions = AggregationOptions()
