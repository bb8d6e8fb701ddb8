"""Structured logging (structlog) and the correlation id that follows a record across services.

`configure_logging` is called once at start (by `run_service`): JSON lines outside `local`, a readable
console locally; every line carries `service` and `instance_id`; secret-looking values are masked
(keys named like *password*/*secret*/*token*/*dsn*, `password=...` pairs and credentials inside URLs).
Lines of the standard library's loggers (aiohttp, asyncio, ...) go through the same pipeline.

Processing code binds the record's coordinates::

    log = bind_record(logger, record)          # topic, partition, offset, correlation_id
    log.warning("dead_letter", reason="not_json")

or, for everything logged inside a block, `with record_context(record): ...`.
"""

from __future__ import annotations

import hashlib
import logging as std_logging
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from dataproc_shared.masking import mask_mapping
from dataproc_shared.records import CORRELATION_HEADER, INGEST_TIME_HEADER, Headers, InRecord

#: Longest correlation id accepted from a header.
MAX_CORRELATION_ID = 128
_CORRELATION_NAMESPACE = uuid.UUID("6f1d3c8e-3b7a-5f0e-9a52-1c4b8f0d2e77")

__all__ = [
    "bind_instrument",
    "bind_record",
    "configure_logging",
    "configure_logging_from_settings",
    "correlation_id_of",
    "ensure_correlation_id",
    "get_logger",
    "ingest_ns_of",
    "mask_secrets",
    "new_correlation_id",
    "propagated_headers",
    "record_context",
    "record_fields",
    "with_correlation_id",
]


def mask_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Mask secret-looking keys and credentials inside string values."""
    return mask_mapping(event_dict)


def _static_fields(fields: Mapping[str, str]) -> Processor:
    def add(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def _json_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    service: str,
    *,
    env: str = "local",
    level: str = "INFO",
    instance_id: str = "",
    stream: TextIO | None = None,
    json: bool | None = None,
) -> None:
    """Set up structlog and the standard library's logging for this process.

    `json` defaults to `env != "local"`. `stream` defaults to stderr (tests pass a buffer).
    """
    use_json = env != "local" if json is None else json
    static = {"service": service, "instance_id": instance_id} if instance_id else {"service": service}
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _static_fields(static),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if use_json else _keep_exc_info,
        structlog.processors.UnicodeDecoder(),
        mask_secrets,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_json_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = std_logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = std_logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # librdkafka and aiohttp's access log are chatty at INFO.
    std_logging.getLogger("aiohttp.access").setLevel(max(root.level, std_logging.WARNING))


def configure_logging_from_settings(settings: Any, stream: TextIO | None = None) -> None:
    """`configure_logging` with the service, environment, level and instance id of `Settings`."""
    configure_logging(
        settings.service,
        env=settings.env,
        level=settings.log_level,
        instance_id=settings.instance_id,
        stream=stream,
    )


def _keep_exc_info(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Console mode: leave `exc_info` for the console renderer's pretty tracebacks."""
    return event_dict


def get_logger(name: str | None = None, **fields: Any) -> Any:
    """A structlog logger, with `fields` bound."""
    logger = structlog.stdlib.get_logger(name)
    return logger.bind(**fields) if fields else logger


# ---- domain fields -----------------------------------------------------------------------------------------

def record_fields(record: InRecord) -> dict[str, Any]:
    """`topic`, `partition`, `offset` and (when present) `correlation_id` of a consumed record."""
    fields: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    cid = correlation_id_of(record)
    if cid:
        fields["correlation_id"] = cid
    return fields


def bind_record(logger: Any, record: InRecord, **extra: Any) -> Any:
    """`logger` with the record's coordinates (and correlation id) bound."""
    return logger.bind(**record_fields(record), **extra)


def bind_instrument(logger: Any, instrument_id: str) -> Any:
    """`logger` with `instrument_id` bound."""
    return logger.bind(instrument_id=instrument_id)


@contextmanager
def record_context(record: InRecord, **extra: Any) -> Iterator[None]:
    """Bind the record's fields to every line logged inside the block (contextvars)."""
    with structlog.contextvars.bound_contextvars(**record_fields(record), **extra):
        yield


# ---- correlation ids ---------------------------------------------------------------------------------------

def new_correlation_id() -> str:
    """A fresh correlation id (32 hex characters)."""
    return uuid.uuid4().hex


def correlation_id_of(record: InRecord) -> str | None:
    """The record's `dp-correlation-id` header, if present and sane (printable UTF-8, <= 128 chars)."""
    raw = record.header(CORRELATION_HEADER)
    if not raw:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text if text and text.isprintable() and len(text) <= MAX_CORRELATION_ID else None


def ensure_correlation_id(record: InRecord) -> str:
    """The record's correlation id; for a record without one, an id derived from its coordinates.

    The derived id is stable, so a replay after a crash produces the same output headers.
    """
    return correlation_id_of(record) or uuid5_str(f"{record.topic}:{record.partition}:{record.offset}")


_NAMESPACE_BYTES = _CORRELATION_NAMESPACE.bytes
#: SHA-1 state after the namespace; each id continues a copy of it.
_NAMESPACE_SHA1 = hashlib.sha1(_NAMESPACE_BYTES)  # noqa: S324 - RFC 4122 v5 names, not security
#: RFC 4122 variant: the top two bits of the 17th hex digit become `10`.
_VARIANT_DIGIT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def uuid5_str(name: str) -> str:
    """`str(uuid.uuid5(_CORRELATION_NAMESPACE, name))`, computed directly (a tenth of the time).

    The version (5) and variant bits are set on the hex digits of the SHA-1 digest.
    """
    sha = _NAMESPACE_SHA1.copy()
    sha.update(name.encode())
    h = sha.hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


def ingest_ns_of(record: InRecord) -> int | None:
    """The `dp-ingest-ns` header (decimal ASCII nanoseconds since the epoch), if present and valid."""
    raw = record.header(INGEST_TIME_HEADER)
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def with_correlation_id(headers: Headers, correlation_id: str) -> Headers:
    """`headers` with `dp-correlation-id` set to `correlation_id` (replacing any previous value)."""
    kept = tuple((k, v) for k, v in headers if k != CORRELATION_HEADER)
    return ((CORRELATION_HEADER, correlation_id.encode()), *kept)


def propagated_headers(record: InRecord, correlation_id: str | None = None,
                       ingest_ns: int | None = None) -> Headers:
    """Headers of an output derived from `record`: its correlation id and ingest time travel on.

    A record without a correlation id gets `correlation_id` or the id `ensure_correlation_id` derives;
    `ingest_ns` sets the ingest-time header when the input had none (normalization: the raw record's
    timestamp).
    """
    cid = correlation_id_of(record) or correlation_id or ensure_correlation_id(record)
    headers: list[tuple[str, bytes]] = [(CORRELATION_HEADER, cid.encode())]
    ingest = ingest_ns_of(record)
    if ingest is None:
        ingest = ingest_ns
    if ingest is not None:
        headers.append((INGEST_TIME_HEADER, str(ingest).encode("ascii")))
    return tuple(headers)

