"""Wiring of the aggregation service into the shared runtime (`python -m aggregation`)."""

from __future__ import annotations

import asyncio

import structlog
from dataproc_shared.config import kafka_common_config
from dataproc_shared.kafka.hanging import HangingTransactionResolver
from dataproc_shared.migrate import clickhouse_values, migrate_clickhouse
from dataproc_shared.service import ServiceContext, run_service
from dataproc_shared.state import ChangelogStore

from aggregation.api import ReadApi
from aggregation.app import AggregationProcessor
from aggregation.settings import AggregationSettings
from aggregation.sink import BarSink

log = structlog.get_logger(__name__)

SERVICE = "aggregation"


async def build_processor(context: ServiceContext) -> AggregationProcessor:
    """The processor, after the ClickHouse migrations; the read API joins the health server's routes."""
    settings = context.settings
    assert isinstance(settings, AggregationSettings)  # noqa: S101 - run_service loads this class
    opts = settings.aggregation
    client = context.clickhouse
    sink = None
    if client is not None:
        if opts.migrate_clickhouse:
            report = await asyncio.to_thread(
                migrate_clickhouse, client, values=clickhouse_values(audit_ttl_days=settings.audit_ttl_days))
            log.info("clickhouse migrated", summary=report.summary())
        if opts.clickhouse_enabled:
            sink = BarSink(client, context.metrics)
        if opts.read_api_enabled:
            context.health.add_routes(ReadApi(client, opts.read_api_max_rows).routes())
    store = ChangelogStore(
        topic=settings.topics.changelog(SERVICE, "windows"),
        kafka_config=kafka_common_config(settings),
        codec="bytes",
        hanging=HangingTransactionResolver.from_settings(settings, context.metrics),
    )
    return AggregationProcessor(
        config=opts.window_config(),
        input_topic=settings.topics.enriched,
        bars_topic=settings.topics.bars,
        store=store,
        sink=sink,
        metrics=context.metrics,
        changelog_format=opts.changelog_format,
    )


def main() -> int:
    """Run the service until SIGTERM/SIGINT; the exit status."""
    return run_service(AggregationSettings, build_processor, service=SERVICE,
                       input_topics=lambda s: [s.topics.enriched], clickhouse_owner=True)
