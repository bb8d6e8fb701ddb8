"""`python -m projection`: enriched ticks and bars -> Redis read models (HTTP port 8083)."""

from __future__ import annotations

from typing import cast

from dataproc_shared.service import ServiceContext, run_service

from projection.app import ProjectionProcessor, build_processor
from projection.settings import ProjectionSettings


async def make_processor(context: ServiceContext) -> ProjectionProcessor:
    """The processor, its Redis client (closed on exit) and the Redis health check."""
    settings = cast(ProjectionSettings, context.settings)
    health = context.health

    def report(up: bool, detail: str) -> None:
        health.report("redis", up, None if up else detail)

    processor = build_processor(settings, context.metrics, on_health=report)
    context.exit_stack.push_async_callback(processor.close)
    health.add_check("redis", processor.require_redis)
    await processor.start()
    return processor


def main() -> int:
    """Run the projection service until SIGTERM/SIGINT."""
    return run_service(ProjectionSettings, make_processor, service="projection",
                       input_topics=lambda s: [s.topics.enriched, s.topics.bars])


if __name__ == "__main__":
    raise SystemExit(main())
