"""`python -m normalization`: raw ticks -> normalized ticks, on the shared runtime."""

from __future__ import annotations

import asyncio

from dataproc_shared.service import ServiceContext, run_service

from normalization.app import NormalizationProcessor, check_output_partitions
from normalization.settings import NormalizationSettings


async def make_processor(context: ServiceContext) -> NormalizationProcessor:
    """The processor, once the output topic is known to have the partition count it computes with."""
    settings = context.settings
    if not isinstance(settings, NormalizationSettings):  # pragma: no cover - run_service loads this class
        raise TypeError(f"expected NormalizationSettings, got {type(settings).__name__}")
    await asyncio.to_thread(check_output_partitions, settings)
    return NormalizationProcessor.from_settings(settings, context.metrics)


def main() -> int:
    """Run the service until SIGTERM/SIGINT; the process exit status."""
    return run_service(
        NormalizationSettings,
        make_processor,
        service="normalization",
        input_topics=lambda settings: [settings.topics.raw],
    )


if __name__ == "__main__":
    raise SystemExit(main())
