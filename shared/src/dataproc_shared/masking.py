"""Masking of secret-looking values, shared by settings display, logging and the health endpoint."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

#: Key names whose values are always masked (case-insensitive substring match).
SECRET_KEY_PARTS: tuple[str, ...] = ("password", "passwd", "secret", "token", "credential", "api_key",
                                     "apikey", "private_key", "dsn", "authorization")

# scheme://user:password@host  -> scheme://user:***@host ; scheme://token@host -> scheme://***@host
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*)(?::[^@/\s]*)?@")
# password=xyz / password: xyz / "password": "xyz" in libpq DSNs, librdkafka strings, messages
_KEY_VALUE = re.compile(
    r"(?P<key>\b[\w.\-]*(?:password|passwd|secret|token|api[_\-]?key)[\w.\-]*\"?\s*[=:]\s*\"?)"
    r"(?P<value>[^\s\"',;&}]+)",
    re.IGNORECASE,
)


def mask_text(text: str) -> str:
    """Mask credentials inside URLs/DSNs and `password=...`-style pairs within free text."""

    def _url(match: re.Match[str]) -> str:
        user = match.group("user")
        whole = match.group(0)
        if ":" in whole[len(match.group("scheme")):]:
            return f"{match.group('scheme')}{user}:{MASK}@"
        # A lone userinfo part (redis://token@host) is a credential too.
        return f"{match.group('scheme')}{MASK}@" if user else whole

    return _KEY_VALUE.sub(lambda m: f"{m.group('key')}{MASK}", _URL_CREDENTIALS.sub(_url, text))


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret (its value is masked whatever it is)."""
    lowered = key.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


def mask_value(value: Any) -> Any:
    """Mask a value recursively: strings are scanned, mappings masked by key, sequences item by item."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return mask_mapping(value)
    if isinstance(value, list | tuple):
        return type(value)(mask_value(v) for v in value)
    return value


def mask_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of `data` with values under secret-looking keys replaced and strings scanned."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if is_secret_key(str(key)) and value not in (None, "", MASK):
            # A URL/DSN under a secret key keeps scheme, host and path; its user info is hidden.
            out[key] = mask_text(value) if isinstance(value, str) and "://" in value else MASK
        else:
            out[key] = mask_value(value)
    return out

