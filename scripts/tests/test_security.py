"""Security checks: static security lint, dependency audit, fail-closed configuration and credentials.

No secret in logs, health responses or metrics of the running chain is checked by the fault-injection
run (`test_faults.py`: every log line, /health, /ready and /metrics of every service, with the stack's
generated PostgreSQL and Redis passwords and a Kafka SASL password set).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from dataproc_shared.testing import ContractTopics
from dptools.pipeline import REPO, Pipeline, http_get

SOURCE_FOLDERS = ["shared/src", "service-normalization/src", "service-enrichment/src",
                  "service-aggregation/src", "service-projection/src", "scripts/src"]
_NOQA = re.compile(r"#\s*noqa:([^#\n]*)")


def _reviewed(path: Path, line: int, test_id: str) -> bool:
    """A bandit finding counts as reviewed when ruff's same rule (B310 -> S310) is waived on its line."""
    text = path.read_text().splitlines()
    for candidate in text[max(0, line - 2): line + 1]:
        match = _NOQA.search(candidate)
        if match and f"S{test_id[1:]}" in match.group(1):
            return True
    return False


def test_bandit_finds_nothing_unreviewed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-q", "-r", *SOURCE_FOLDERS, "-ll", "-f", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    report = json.loads(result.stdout)
    assert report["metrics"]["_totals"]["loc"] > 5_000, "bandit scanned (almost) nothing"
    unreviewed = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
                  for r in report["results"]
                  if not _reviewed(REPO / r["filename"], r["line_number"], r["test_id"])]
    assert unreviewed == [], "\n".join(unreviewed)


def test_dependency_audit_of_the_lock() -> None:
    """pip-audit over every package pinned in uv.lock, against PyPI's vulnerability data.

    A known vulnerability fails the test. A package whose data cannot be fetched (no route to the
    PyPI JSON API, as in a sandbox that only reaches the package index) is not a finding: it is
    reported as "not audited". With `DP_AUDIT_REQUIRE_DB=1` (CI with internet) that fails too.
    """
    exported = subprocess.run(
        ["uv", "export", "--frozen", "--format", "requirements-txt", "--no-hashes",
         "--no-emit-workspace", "--all-packages"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    pinned = [line for line in exported.splitlines() if re.match(r"^[A-Za-z0-9_.-]+==", line)]
    assert len(pinned) > 50
    req = REPO / ".stack" / "audit-requirements.txt"
    req.parent.mkdir(parents=True, exist_ok=True)
    req.write_text("\n".join(pinned) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip_audit", "-r", str(req), "--no-deps", "--disable-pip",
         "--progress-spinner", "off", "-f", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    report = json.loads(result.stdout)
    deps = report["dependencies"]
    unconditional = [line for line in pinned if ";" not in line]
    assert len(deps) >= len(unconditional)  # environment markers may exclude a few
    findings = [f"{d['name']} {d['version']}: {[v['id'] for v in d['vulns']]}"
                for d in deps if d.get("vulns")]
    assert findings == [], "known vulnerabilities:\n" + "\n".join(findings)
    not_audited = [d["name"] for d in deps if "skip_reason" in d]
    # anything skipped must be skipped for lack of data, never silently for another reason
    for d in deps:
        if "skip_reason" in d:
            assert "could not be audited" in d["skip_reason"], d
    print(f"dependency audit: {len(deps) - len(not_audited)} audited, no finding; "
          f"{len(not_audited)} not audited (vulnerability data unreachable)")
    if os.environ.get("DP_AUDIT_REQUIRE_DB") == "1":
        assert not_audited == [], f"vulnerability data unreachable for {len(not_audited)} packages"


@pytest.mark.parametrize("service", ["normalization", "enrichment", "aggregation", "projection"])
def test_prod_service_refuses_plaintext_kafka(service: str) -> None:
    secret = "sasl-" + os.urandom(8).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
    env.update({
        "DATA_PROC_ENV": "prod", "DATA_PROC_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT",
        "DATA_PROC_KAFKA__SASL_PASSWORD": secret, "DATA_PROC_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "DATA_PROC_POSTGRES_DSN": f"postgresql://dataproc:{secret}@db/reference_data",
        "DATA_PROC_REDIS_URL": f"redis://:{secret}@cache:6379/0",
    })
    result = subprocess.run([sys.executable, "-m", service], env=env, capture_output=True,
                            text=True, timeout=120, check=False, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DATA_PROC_KAFKA__SECURITY_PROTOCOL" in output
    assert "PLAINTEXT is not allowed in prod" in output
    assert secret not in output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_wrong_postgres_password_fails_closed(pg_database: str, kafka_bootstrap: str, tmp_path: Path,
                                              contract_topics: Callable[..., ContractTopics]) -> None:
    wrong = "wrong-" + os.urandom(8).hex()
    parts = urllib.parse.urlsplit(pg_database)
    netloc = f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}"
    dsn = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_PROC_")}
    env.update({"DATA_PROC_ENV": "local", "DATA_PROC_KAFKA_BOOTSTRAP": kafka_bootstrap,
                "DATA_PROC_POSTGRES_DSN": dsn, "DATA_PROC_LOG_LEVEL": "INFO",
                "DATA_PROC_KAFKA__GROUP_ID": "wrongpw-" + wrong, "DATA_PROC_INSTANCE_ID": "wrongpw",
                **contract_topics(1).env()})
    pipe = Pipeline(env=env, ports={"enrichment": _free_port()}, run_dir=tmp_path / "run",
                    log_dir=tmp_path / "logs", services=("enrichment",))
    pipe.start("enrichment")
    try:
        proc = pipe.procs["enrichment"]
        health = b""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            status, health = http_get(pipe.url("enrichment", "/health"))
            if status and b"postgres" in health.lower() and status != 200:
                break
            assert http_get(pipe.url("enrichment", "/ready"))[0] != 200, "ready with a wrong password"
            time.sleep(0.5)
        log = (tmp_path / "logs" / "enrichment.log").read_text(errors="replace")
        exited = proc.poll() is not None
        assert (exited and proc.returncode != 0) or (b"postgres" in health.lower()), log[-3000:]
        evidence = log if exited else log + health.decode(errors="replace")
        assert "postgres" in evidence.lower()
        assert re.search(r"password|authentication", evidence, re.I), evidence[-3000:]
        assert wrong not in evidence
    finally:
        pipe.stop_all()
