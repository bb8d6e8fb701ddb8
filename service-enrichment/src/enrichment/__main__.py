"""`python -m enrichment`: run the enrichment service."""

from __future__ import annotations

import sys

from dataproc_shared.service import run_service

from enrichment.app import build_processor
from enrichment.settings import EnrichmentSettings


def main() -> int:
    """Run until SIGTERM/SIGINT; the exit status of `run_service`."""
    return run_service(
        EnrichmentSettings,
        build_processor,
        service="enrichment",
        input_topics=lambda s: [s.topics.normalized],
    )


if __name__ == "__main__":
    sys.exit(main())
