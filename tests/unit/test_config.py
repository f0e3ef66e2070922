"""Unit tests of settings: defaults, env parsing, errors naming the variable, secret hygiene.

The environment is cleared of BURROW_* first so the machine's own settings cannot leak in.
"""

from __future__ import annotations

import os

import pytest

from service.config import Settings, load_settings, redact_url
from service.errors import ConfigError

__all__: list[str] = []

PASSWORD = "hunter2-very-secret"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BURROW_* variable from the outer environment reaches these tests."""
    for name in list(os.environ):
        if name.startswith("BURROW_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    """With no environment, the documented defaults apply."""
    settings = load_settings()
    assert settings.amqp_urls() == ["amqp://guest:guest@127.0.0.1:5672/"]
    assert settings.namespace == "burrow"
    assert settings.prefetch == 64
    assert settings.default_deadline == 30.0
    assert settings.max_body_bytes == 1_048_576
    assert settings.queue_type == "quorum"
    assert settings.max_queue_length is None
    assert settings.http_port == 8000


def test_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """BURROW_<NAME> variables set the matching settings."""
    monkeypatch.setenv("BURROW_PREFETCH", "10")
    monkeypatch.setenv("BURROW_NAMESPACE", "shop")
    monkeypatch.setenv("BURROW_MAX_BODY_BYTES", "4096")
    settings = load_settings()
    assert (settings.prefetch, settings.namespace, settings.max_body_bytes) == (10, "shop", 4096)


@pytest.mark.parametrize("value", ["0", "-1", "lots", "70000"])
def test_bad_prefetch_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An invalid BURROW_PREFETCH raises ConfigError whose text names BURROW_PREFETCH."""
    monkeypatch.setenv("BURROW_PREFETCH", value)
    with pytest.raises(ConfigError, match="BURROW_PREFETCH"):
        load_settings()


def test_bad_namespace_names_the_variable() -> None:
    """A namespace that cannot prefix AMQP names is refused, naming BURROW_NAMESPACE."""
    with pytest.raises(ConfigError, match="BURROW_NAMESPACE"):
        load_settings(namespace="Has Spaces")


def test_password_never_in_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejected URL list is reported without the password of any URL in it."""
    monkeypatch.setenv(
        "BURROW_AMQP_URL",
        f"amqp://user:{PASSWORD}@host-a:5672/,http://user:{PASSWORD}@host-b/",
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "BURROW_AMQP_URL" in text
    assert PASSWORD not in text
    assert PASSWORD not in repr(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_password_never_in_redacted_urls_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """redacted_urls and the settings' repr mask the password; amqp_urls keep it for connecting."""
    monkeypatch.setenv("BURROW_AMQP_URL", f"amqp://user:{PASSWORD}@rabbit:5672/vh")
    settings = load_settings()
    assert settings.redacted_urls() == ["amqp://user:***@rabbit:5672/vh"]
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())
    assert settings.amqp_urls() == [f"amqp://user:{PASSWORD}@rabbit:5672/vh"]


def test_comma_separated_urls_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A comma-separated list gives each URL, trimmed, in order; empty items are skipped."""
    monkeypatch.setenv(
        "BURROW_AMQP_URL",
        f" amqp://u:{PASSWORD}@a:5672/ , amqps://u:{PASSWORD}@b:5671/,, amqp://c/ ",
    )
    settings = load_settings()
    assert settings.amqp_urls() == [
        f"amqp://u:{PASSWORD}@a:5672/",
        f"amqps://u:{PASSWORD}@b:5671/",
        "amqp://c/",
    ]
    assert settings.redacted_urls() == [
        "amqp://u:***@a:5672/",
        "amqps://u:***@b:5671/",
        "amqp://c/",
    ]


@pytest.mark.parametrize("value", ["", " , ", "http://host/", "amqp://"])
def test_bad_url_list_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An empty list, a non-AMQP scheme or a URL without host is a ConfigError."""
    monkeypatch.setenv("BURROW_AMQP_URL", value)
    with pytest.raises(ConfigError, match="BURROW_AMQP_URL"):
        load_settings()


def test_redact_url_leaves_passwordless_url_alone() -> None:
    """A URL without a password is returned unchanged; one with '@' in the password is masked."""
    assert redact_url("amqp://rabbit:5672/") == "amqp://rabbit:5672/"
    assert redact_url("amqp://u:p@ss@rabbit/") == "amqp://u:***@rabbit/"


def test_overrides_win_and_settings_are_frozen() -> None:
    """load_settings(**overrides) sets values; the result cannot be mutated."""
    settings = load_settings(prefetch=5)
    assert settings.prefetch == 5
    with pytest.raises(ValueError, match="frozen"):
        settings.prefetch = 6  # type: ignore[misc]
    assert isinstance(settings, Settings)
