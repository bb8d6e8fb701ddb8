"""The aggregation service."""
