from __future__ import annotations

import pytest
from dataproc_shared.config import load_settings
from dataproc_shared.errors import ConfigError
from projection.settings import ProjectionSettings


def test_defaults_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_ENV", "local")
    monkeypatch.setenv("DATA_PROC_PROJECTION__MAX_FINAL_BARS", "42")
    monkeypatch.setenv("DATA_PROC_REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0")
    settings = load_settings(ProjectionSettings, service="projection")
    assert settings.http.port == 8083
    assert settings.projection.max_final_bars == 42
    assert settings.projection.updates_channel == "md:updates"
    assert settings.redis_url_value() == "redis://:s3cret@127.0.0.1:6379/0"
    assert "s3cret" not in str(settings.masked())
    assert settings.redis_ssl_options() == {}


def test_tls_and_missing_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_ENV", "local")
    monkeypatch.delenv("DATA_PROC_REDIS_URL", raising=False)
    monkeypatch.setenv("DATA_PROC_REDIS_TLS__ENABLED", "true")
    monkeypatch.setenv("DATA_PROC_REDIS_TLS__CA_FILE", "/etc/ca.pem")
    settings = load_settings(ProjectionSettings, service="projection")
    with pytest.raises(ConfigError, match="DATA_PROC_REDIS_URL"):
        settings.redis_url_value()
    settings = load_settings(ProjectionSettings, service="projection", redis_url="redis://:pw@h:6380/1")
    assert settings.redis_url_value() == "rediss://:pw@h:6380/1"
    assert settings.redis_ssl_options() == {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
                                            "ssl_ca_certs": "/etc/ca.pem"}


def test_bad_option_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_PROC_PROJECTION__MAX_FINAL_BARS", "0")
    with pytest.raises(ConfigError, match="DATA_PROC_PROJECTION__MAX_FINAL_BARS"):
        load_settings(ProjectionSettings, service="projection")
