"""The Dockerfiles: multi-stage from the uv lock, non-root, HEALTHCHECK on /live, and a build stage that
really works: its COPY instructions (through .dockerignore) and `uv sync` commands are replayed here
into a scratch folder, since no container can run on these machines."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from dataproc_shared.config import SERVICE_PORTS

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(SERVICE_PORTS)
DOCKERFILES = {s: ROOT / f"service-{s}" / "Dockerfile" for s in SERVICES} | {
    "tools": ROOT / "deploy" / "docker" / "tools.Dockerfile"}


@dataclass(frozen=True)
class Instruction:
    stage: int
    op: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions (continuations joined, comments dropped), with their stage."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: list[Instruction] = []
    stage = -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        if op.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, op.upper(), " ".join(args.split())))
    return out


def dockerignore() -> list[tuple[bool, str]]:
    rules: list[tuple[bool, str]] = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def _matches(pattern: str, path: str) -> bool:
    if pattern == "**":
        return True
    if pattern.startswith("**/"):
        tail = pattern[3:]
        parts = path.split("/")
        width = tail.count("/") + 1
        return any(fnmatch.fnmatch("/".join(parts[i:i + width]), tail) for i in range(len(parts)))
    return fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")


def in_context(path: str) -> bool:
    """Whether `path` (relative to the root) is sent to the builder (last matching rule wins)."""
    included = True
    for negate, pattern in dockerignore():
        if _matches(pattern, path):
            included = negate
    return included


def context_copies(name: str) -> list[tuple[int, list[str], str]]:
    """(stage, sources, destination) of every COPY from the build context."""
    copies = []
    for ins in instructions(DOCKERFILES[name]):
        if ins.op == "COPY" and "--from=" not in ins.args:
            parts = [p for p in shlex.split(ins.args) if not p.startswith("--")]
            copies.append((ins.stage, parts[:-1], parts[-1]))
    return copies


@pytest.mark.parametrize("name", SERVICES)
def test_service_image_shape(name: str) -> None:
    ins = instructions(DOCKERFILES[name])
    stages = [i for i in ins if i.op == "FROM"]
    assert len(stages) >= 3  # uv, build, runtime
    last = stages[-1].stage
    runtime = [i for i in ins if i.stage == last]
    user = [i.args for i in runtime if i.op == "USER"]
    assert user, "the runtime stage must set a user"
    assert user[-1].split(":")[0] not in ("0", "root")
    (health,) = [i.args for i in runtime if i.op == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{SERVICE_PORTS[name]}/live" in health
    assert [i.args for i in runtime if i.op == "CMD"] == [f'["python", "-m", "{name}"]']
    assert [i.args for i in runtime if i.op == "EXPOSE"] == [str(SERVICE_PORTS[name])]
    runs = [i.args for i in ins if i.op == "RUN" and "uv sync" in i.args]
    # Dependencies first (their own layer, before the code is copied), then the workspace packages.
    assert len(runs) == 2
    assert all(f"--frozen --no-dev --package dataproc-{name}" in r for r in runs)
    assert "--no-install-workspace" in runs[0]
    first_code_copy = next(n for n, i in enumerate(ins) if i.op == "COPY" and "/src" in i.args)
    first_sync = next(n for n, i in enumerate(ins) if i.op == "RUN" and "uv sync" in i.args)
    assert first_sync < first_code_copy
    # The runtime stage carries the environment only, not the sources.
    assert not [c for c in context_copies(name) if c[0] == last]


def _template(name: str) -> str:
    """The Dockerfile of service `name` with its name and port replaced by placeholders.

    The lines copying every workspace member's pyproject.toml (the lock needs them all) stay as they are.
    """
    lines = []
    for line in DOCKERFILES[name].read_text().splitlines():
        if not re.fullmatch(r"COPY service-[a-z]+/pyproject\.toml service-[a-z]+/", line):
            line = line.replace(name, "{service}").replace(str(SERVICE_PORTS[name]), "{port}")
        lines.append(line)
    return "\n".join(lines)


def test_the_service_dockerfiles_are_one_template() -> None:
    """The four service Dockerfiles differ only in the service's name and port."""
    templates = {name: _template(name) for name in SERVICES}
    first = templates[SERVICES[0]]
    for name in SERVICES[1:]:
        assert templates[name] == first, f"service-{name}/Dockerfile drifted from the shared template"
    assert "{service}" in first
    assert "{port}" in first


@pytest.mark.parametrize("name", [*SERVICES, "tools"])
def test_every_copied_path_exists_and_is_in_the_build_context(name: str) -> None:
    copies = context_copies(name)
    assert copies
    for _, sources, _ in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
            assert in_context(src), f"{src} is excluded by .dockerignore"
            if (ROOT / src).is_dir():
                files = [p for p in (ROOT / src).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert files
                assert all(in_context(str(p.relative_to(ROOT))) for p in files)


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    for path in (".stack/env", ".git/config", ".venv/bin/python", "helm/values.yaml",
                 "service-normalization/tests/test_x.py", "shared/src/dataproc_shared/__pycache__/x.pyc",
                 "bench-results/run.json", "docs/architecture.md"):
        assert not in_context(path), path
    for path in ("uv.lock", "shared/src/dataproc_shared/config.py", "migrations/postgres/001.sql"):
        assert in_context(path), path


def replay_build_stage(name: str, dest: Path) -> Path:
    """Run the build stage's COPY and `uv sync` steps in `dest`; return the virtual environment."""
    ins = instructions(DOCKERFILES[name])
    build_stage = next(i.stage for i in ins if i.op == "RUN" and "uv sync" in i.args)
    venv = dest / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never",
           "UV_LINK_MODE": "hardlink", "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1"}
    env.pop("VIRTUAL_ENV", None)
    workdir = dest
    for i in ins:
        if i.stage != build_stage:
            continue
        if i.op == "WORKDIR":
            workdir = dest / i.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif i.op == "COPY" and "--from=" not in i.args:
            *sources, target = [p for p in shlex.split(i.args) if not p.startswith("--")]
            to = dest / target.lstrip("/") if target.startswith("/") else workdir / target
            for src in sources:
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, to, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                elif target.endswith("/"):
                    to.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / src, to / Path(src).name)
                else:
                    shutil.copy(ROOT / src, to)
        elif i.op == "RUN":
            command = re.sub(r"--mount=\S+\s*", "", i.args)
            proc = subprocess.run(shlex.split(command), cwd=workdir, env=env, capture_output=True,
                                  text=True, timeout=300, check=False)
            assert proc.returncode == 0, f"{command}: {proc.stderr[-2000:]}"
    return venv


MODULES = {"dataproc-shared": "dataproc_shared", "dataproc-tools": "dptools"} | {
    f"dataproc-{s}": s for s in SERVICES}


@pytest.mark.parametrize("name", [*SERVICES, "tools"])
def test_build_stage_replayed_installs_an_importable_package(name: str, tmp_path: Path) -> None:
    try:
        check_replayed_build(name, replay_build_stage(name, tmp_path))
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def check_replayed_build(name: str, venv: Path) -> None:
    installed = {p.name.split("-")[0].replace("_", "-")
                 for p in venv.glob("lib/python*/site-packages/*.dist-info")}
    workspace = installed & set(MODULES)
    own = "dataproc-tools" if name == "tools" else f"dataproc-{name}"
    assert {"dataproc-shared", own} <= workspace
    if name != "tools":
        assert workspace == {"dataproc-shared", own}  # a service image carries no other service
    # Every workspace package in the image imports, from the environment (not an editable link).
    modules = sorted(MODULES[w] for w in workspace)
    if name == "tools":
        modules += ["dptools.topics", "dptools.migrate"]
    proc = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import importlib, sys\n"
                           "for m in sys.argv[1:]: print(importlib.import_module(m).__file__)", *modules],
                          cwd="/", capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith(str(venv)) for line in proc.stdout.splitlines()), proc.stdout
    # No dev tooling in an image.
    assert not (venv / "bin" / "pytest").exists()
