"""Operator tooling for the data-processing platform."""
