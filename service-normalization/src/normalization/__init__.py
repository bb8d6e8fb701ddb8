"""The normalization service."""
