"""Settings of the normalization service: the shared settings plus the `normalization:` section."""

from __future__ import annotations

from dataproc_shared.config import Settings
from pydantic import BaseModel, ConfigDict, Field


class NormalizationOptions(BaseModel):
    """The `normalization:` section (`DATA_PROC_NORMALIZATION__...`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: A tick whose event time is more than this after the moment it is read is rejected.
    max_future_skew_s: float = Field(default=300.0, ge=0, le=86_400)
    #: A trade repeating the `venue` + `trade_id` of one accepted within this event-time distance is dropped.
    dedup_window_s: float = Field(default=600.0, ge=0, le=7 * 86_400)
    #: Hard cap on remembered trades per input partition; the oldest are evicted first.
    dedup_max_entries: int = Field(default=200_000, ge=1, le=50_000_000)
    #: Partition count of the output topic; 0 means "ask the broker at start".
    output_partitions: int = Field(default=0, ge=0, le=10_000)


class NormalizationSettings(Settings):
    """Settings of `python -m normalization`."""

    service: str = "normalization"
    normalization: NormalizationOptions = NormalizationOptions()
