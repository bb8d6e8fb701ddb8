"""The root exception of the shared runtime and its direct subclasses.

Bad *data* is never an exception (it becomes a dead letter); these are for bad configuration, bad
code or a broken environment.
"""

from __future__ import annotations


class DataProcError(Exception):
    """Root of every exception raised by `dataproc_shared`."""


class ConfigError(DataProcError):
    """Settings are invalid. The message names the environment variable(s) to fix."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class AvroError(DataProcError):
    """A message cannot be encoded or decoded (unknown schema, fingerprint or marker)."""
