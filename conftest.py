"""Root conftest: the local stack's connection settings and the shared test fixtures.

`.stack/env` (written by `make up`) holds `export DATA_PROC_...=...` lines; they are loaded into the
environment unless a variable is already set (CI or a developer may point tests elsewhere).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

STACK_ENV = Path(__file__).parent / ".stack" / "env"


def _load_stack_env(path: Path) -> None:
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if sep and name.startswith("DATA_PROC_"):
            parsed = shlex.split(value)
            os.environ.setdefault(name, parsed[0] if parsed else "")


_load_stack_env(STACK_ENV)

pytest_plugins = ["dataproc_shared.testing"]
