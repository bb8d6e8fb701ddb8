from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from dataproc_shared.logging import (
    bind_instrument,
    bind_record,
    configure_logging,
    configure_logging_from_settings,
    correlation_id_of,
    ensure_correlation_id,
    get_logger,
    ingest_ns_of,
    new_correlation_id,
    propagated_headers,
    record_context,
    with_correlation_id,
)
from dataproc_shared.masking import mask_text
from dataproc_shared.records import CORRELATION_HEADER, INGEST_TIME_HEADER, InRecord
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("normalization", env="prod", level="DEBUG", instance_id="pod-7", stream=buf)
    yield buf
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


RECORD = InRecord(
    topic="ingestion.market.raw.v1", partition=3, offset=41, key=b"XNYM:CLZ6", value=b"{}",
    timestamp_ms=1, headers=((CORRELATION_HEADER, b"abc-123"), (INGEST_TIME_HEADER, b"1700000000000000000")),
)


def test_json_lines_carry_service_and_record_fields(stream: io.StringIO) -> None:
    log = bind_instrument(bind_record(get_logger("test"), RECORD), "CL.Z26")
    log.info("tick_rejected", reason="crossed_quote")
    (line,) = lines(stream)
    assert line["event"] == "tick_rejected"
    assert line["service"] == "normalization"
    assert line["instance_id"] == "pod-7"
    assert line["level"] == "info"
    assert (line["topic"], line["partition"], line["offset"]) == ("ingestion.market.raw.v1", 3, 41)
    assert line["correlation_id"] == "abc-123"
    assert line["instrument_id"] == "CL.Z26"
    assert str(line["timestamp"]).endswith("Z")


def test_record_context_binds_every_line(stream: io.StringIO) -> None:
    log = get_logger("test")
    with record_context(RECORD):
        log.info("inside")
    log.info("outside")
    inside, outside = lines(stream)
    assert inside["offset"] == 41
    assert "offset" not in outside


def test_secrets_are_masked(stream: io.StringIO) -> None:
    log = get_logger("test")
    log.info(
        "connecting",
        dsn="postgresql://dataproc:hunter2@db:5432/reference_data",
        redis_url="redis://:s3cr3t-redis@cache:6379/0",
        sasl_password="kafka-pass",  # noqa: S106 - fake value under test
        api_token="tok-123",  # noqa: S106 - fake value under test
        detail="login failed with password=letmein for user x",
        nested={"client_secret": "cs-1", "ok": "visible"},
    )
    text = stream.getvalue()
    for secret in ("hunter2", "s3cr3t-redis", "kafka-pass", "tok-123", "letmein", "cs-1"):
        assert secret not in text
    (line,) = lines(stream)
    assert line["redis_url"] == "redis://:***@cache:6379/0"
    assert line["nested"] == {"client_secret": "***", "ok": "visible"}
    assert "db:5432" in str(line["dsn"])


def test_stdlib_loggers_share_the_pipeline(stream: io.StringIO) -> None:
    logging.getLogger("aiohttp.server").error("boom password=abc123")
    (line,) = lines(stream)
    assert line["service"] == "normalization"
    assert line["event"] == "boom password=***"


def test_level_filtering(stream: io.StringIO) -> None:
    configure_logging("enrichment", env="dev", level="WARNING", stream=stream)
    get_logger().info("hidden")
    get_logger().warning("shown")
    assert [line["event"] for line in lines(stream)] == ["shown"]


def test_console_renderer_in_local() -> None:
    buf = io.StringIO()
    configure_logging("projection", env="local", stream=buf)
    try:
        get_logger().info("hello", password="pw-visible?")  # noqa: S106 - fake value under test
        text = buf.getvalue()
        assert "hello" in text
        assert "service=projection" in text
        assert "pw-visible?" not in text
        assert not text.lstrip().startswith("{")
    finally:
        structlog.reset_defaults()
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)


def test_mask_text_patterns() -> None:
    assert mask_text("host=db user=x password=pw1 dbname=y") == "host=db user=x password=*** dbname=y"
    assert mask_text("amqp://u:p@h/v") == "amqp://u:***@h/v"
    assert mask_text("redis://tok@h:6379") == "redis://***@h:6379"
    assert mask_text("http://h:8123/?x=1") == "http://h:8123/?x=1"
    assert mask_text('{"password": "x1"}') == '{"password": "***"}'


def test_correlation_helpers() -> None:
    cid = new_correlation_id()
    assert len(cid) == 32
    assert cid != new_correlation_id()
    assert correlation_id_of(RECORD) == "abc-123"
    bare = InRecord(topic="t", partition=1, offset=9, key=None, value=None, timestamp_ms=0)
    assert correlation_id_of(bare) is None
    derived = ensure_correlation_id(bare)
    assert derived == ensure_correlation_id(bare)  # stable on replay
    assert derived != ensure_correlation_id(InRecord("t", 1, 10, None, None, 0))
    junk = InRecord("t", 0, 0, None, None, 0, headers=((CORRELATION_HEADER, b"\xff\xfe"),))
    assert correlation_id_of(junk) is None
    headers = with_correlation_id(((CORRELATION_HEADER, b"old"), ("x", b"1")), "new")
    assert headers == ((CORRELATION_HEADER, b"new"), ("x", b"1"))
    assert ingest_ns_of(RECORD) == 1_700_000_000_000_000_000
    assert propagated_headers(RECORD) == (
        (CORRELATION_HEADER, b"abc-123"), (INGEST_TIME_HEADER, b"1700000000000000000"),
    )
    assert propagated_headers(bare, ingest_ns=5) == (
        (CORRELATION_HEADER, derived.encode()), (INGEST_TIME_HEADER, b"5"),
    )


def test_configure_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataproc_shared.config import load_settings

    monkeypatch.setenv("DATA_PROC_ENV", "dev")
    monkeypatch.setenv("DATA_PROC_INSTANCE_ID", "pod-3")
    buf = io.StringIO()
    configure_logging_from_settings(load_settings(service="aggregation"), stream=buf)
    try:
        get_logger().info("started")
        (line,) = lines(buf)
        assert (line["service"], line["instance_id"], line["event"]) == ("aggregation", "pod-3", "started")
    finally:
        structlog.reset_defaults()
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)


def test_derived_correlation_id_is_uuid5_of_the_coordinates() -> None:
    import uuid

    from dataproc_shared.logging import _CORRELATION_NAMESPACE, uuid5_str

    for name in ["", "t:0:0", "raw.v1:5:123456789", "ünïcode:1:2", "x" * 500]:
        assert uuid5_str(name) == str(uuid.uuid5(_CORRELATION_NAMESPACE, name))
    rec = InRecord(topic="raw", partition=3, offset=42, key=None, value=b"", timestamp_ms=0, headers=())
    assert ensure_correlation_id(rec) == str(uuid.uuid5(_CORRELATION_NAMESPACE, "raw:3:42"))


@given(st.text(max_size=300))
def test_derived_correlation_id_matches_uuid5_for_any_name(name: str) -> None:
    import uuid

    from dataproc_shared.logging import _CORRELATION_NAMESPACE, uuid5_str

    assert uuid5_str(name) == str(uuid.uuid5(_CORRELATION_NAMESPACE, name))
    assert uuid5_str(name) == uuid5_str(name)  # the namespace state is copied, never consumed
