"""`run_service` start-up without a broker: bad settings stop the process with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dataproc_shared.config import load_settings
from dataproc_shared.service import audit_sink_names

APP = Path(__file__).with_name("loop_app.py")


def test_bad_setting_exits_2_naming_the_variable() -> None:
    env = {**os.environ, "APP_INPUT": "x", "DATA_PROC_LOOP__BATCH_SIZE": "0"}
    proc = subprocess.run([sys.executable, str(APP)], env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert b"DATA_PROC_LOOP__BATCH_SIZE" in proc.stderr


def test_embedded_clickhouse_non_owner_sends_audit_to_kafka() -> None:
    embedded = load_settings(service="enrichment", clickhouse_url="/tmp/chdb-x", audit_sinks=["clickhouse"])
    assert audit_sink_names(embedded, owner=False) == ["kafka"]
    assert audit_sink_names(embedded, owner=True) == ["clickhouse"]
    server = load_settings(service="enrichment", clickhouse_url="http://ch:8123",
                           audit_sinks=["clickhouse", "kafka"])
    assert audit_sink_names(server, owner=False) == ["clickhouse", "kafka"]
