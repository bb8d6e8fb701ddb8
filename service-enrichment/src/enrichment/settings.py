"""Settings of the enrichment service: the shared settings plus the `enrichment:` section."""

from __future__ import annotations

from dataproc_shared.config import Settings
from pydantic import BaseModel, ConfigDict, Field

from enrichment.refstore import StoreOptions


class EnrichmentOptions(BaseModel):
    """The `enrichment:` section (`DATA_PROC_ENRICHMENT__...`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Full reload of the reference tables as a safety net next to LISTEN/NOTIFY.
    refresh_interval_s: float = Field(default=60.0, gt=0, le=86_400)
    #: How often the idle reference connection is checked.
    ping_interval_s: float = Field(default=2.0, gt=0, le=600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    query_timeout_s: float = Field(default=10.0, gt=0, le=600)
    #: Reconnect backoff: doubles from `backoff_initial_s` up to `backoff_max_s` (with jitter).
    backoff_initial_s: float = Field(default=0.2, gt=0, le=600)
    backoff_max_s: float = Field(default=10.0, gt=0, le=3_600)
    #: While a batch is held for the reference database, how long to wait before handing control back
    #: to the loop (which then retries the batch); keeps the loop's liveness within its poll limits.
    hold_slice_s: float = Field(default=5.0, gt=0, le=600)

    def store_options(self) -> StoreOptions:
        """The reference store's timing."""
        return StoreOptions(
            refresh_interval_s=self.refresh_interval_s,
            ping_interval_s=self.ping_interval_s,
            connect_timeout_s=self.connect_timeout_s,
            query_timeout_s=self.query_timeout_s,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
        )


class EnrichmentSettings(Settings):
    """Settings of `python -m enrichment`."""

    service: str = "enrichment"
    enrichment: EnrichmentOptions = EnrichmentOptions()
