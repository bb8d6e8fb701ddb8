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
from dptools.depaudit import audit_lock, render
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
    """Every registry pin of uv.lock against PyPI's vulnerability data (`dptools.depaudit`).

    A known vulnerability of a pinned version fails the test, and so does one of the latest release of
    a package pinned behind it ("possibly affected"). A pin without data for its own version is
    "not audited" with the reason, never clean; `DP_AUDIT_REQUIRE_DB=1` makes that a failure too.
    """
    report = audit_lock(REPO / "uv.lock", timeout_s=10, deadline_s=90)
    print(render(report))
    assert len(report.pins) > 50
    findings = [f"{p.name} {p.version} {p.verdict}: {[v.id for v in p.vulnerabilities]} {p.reason}"
                for p in report.findings]
    assert findings == [], "known vulnerabilities:\n" + "\n".join(findings)
    assert report.audited, "no vulnerability data reached:\n" + render(report)
    if os.environ.get("DP_AUDIT_REQUIRE_DB") == "1":
        assert report.not_audited == [], f"{len(report.not_audited)} pins not audited"


def test_dependency_audit_fails_on_a_known_vulnerability(tmp_path: Path) -> None:
    """The same audit, on a lock pinning pycrypto (abandoned; its last release has unfixed advisories)."""
    lock = tmp_path / "uv.lock"
    entry = ('[[package]]\nname = "pycrypto"\nversion = "{}"\n'
             'source = {{ registry = "https://pypi.org/simple" }}\n')
    lock.write_text("version = 1\n" + entry.format("2.6.1") + entry.format("2.6"))
    result = subprocess.run([sys.executable, "-m", "dptools.depaudit", "--lock", str(lock), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(result.stdout)
    verdicts = {r["version"]: r for r in report["results"]}
    assert result.returncode == 1, result.stdout + result.stderr
    assert verdicts["2.6.1"]["verdict"] == "vulnerable"
    assert "PYSEC-2017-94" in {v["id"] for v in verdicts["2.6.1"]["vulnerabilities"]}
    assert verdicts["2.6"]["verdict"] == "possibly affected"
    assert (report["audited"], report["not_audited"], report["findings"]) == (1, 1, 2)


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
            # every /health names postgres; wait until it says why (the first answers say "connecting")
            if status and status != 200 and re.search(rb"password|authentication", health, re.I):
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
