"""Shared runtime of the data-processing services."""
