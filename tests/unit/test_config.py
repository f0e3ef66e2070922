"""Unit tests of settings: defaults, env parsing, errors naming the variable, secret hygiene.

The environment is cleared of BURROW_* first so the machine's own settings cannot leak in.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import aiormq
import pytest
from pamqp import commands as spec

from service._amqp import shim
from service._amqp.transport import _describe, _tls_context, _tls_problem, _vhost_refusal
from service._protocol import config
from service._protocol.config import Settings, load_settings, redact_url, unknown_variables
from service._protocol.errors import ConfigError

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


@pytest.mark.parametrize("char", ["/", "#", "?", "@"])
def test_h6_unescaped_password_char_refused(monkeypatch: pytest.MonkeyPatch, char: str) -> None:
    """A password with an unescaped / # ? or @ is a ConfigError naming BURROW_AMQP_URL and
    saying to percent-encode, without any part of the password."""
    password = f"hun{char}ter2-very-secret"
    monkeypatch.setenv("BURROW_AMQP_URL", f"amqp://user:{password}@rabbit:5672/vh")
    with pytest.raises(ConfigError, match="BURROW_AMQP_URL") as info:
        load_settings()
    text = str(info.value)
    assert "percent-encode" in text
    assert "hun" not in text
    assert "ter2" not in text
    assert "rabbit" not in text  # the URL is not echoed at all


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:p@h/,amqp://user:se/cret@rabbit/",
        "amqp://user:se,cret@rabbit/",
        "amqps://user:a#b@rabbit:5671/",
        "amqp://user:p@rabbit/v@host",
    ],
    ids=["second-of-list", "comma", "amqps-hash", "vhost-at"],
)
def test_h6_misplaced_url_characters_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Any URL of the list that a special character would split is refused, never echoed."""
    monkeypatch.setenv("BURROW_AMQP_URL", url)
    with pytest.raises(ConfigError, match=r"BURROW_AMQP_URL: .*percent-encode") as info:
        load_settings()
    assert "cret" not in str(info.value)
    assert "rabbit" not in str(info.value)


def test_h6_percent_encoded_password_loads_and_redacts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A percent-encoded password with / # ? @ , loads; it is masked whole in redacted_urls."""
    monkeypatch.setenv("BURROW_AMQP_URL", "amqp://user:a%2Fb%23c%3Fd%40e%2Cf@rabbit:5672/v%40h")
    settings = load_settings()
    assert settings.redacted_urls() == ["amqp://user:***@rabbit:5672/v%40h"]


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://u:se/cr#et@rabbit:5672/", "amqp://u:***@rabbit:5672/"),
        ("amqp://u:se?cret@rabbit/", "amqp://u:***@rabbit/"),
        ("amqp://u:a@b/c@rabbit/", "amqp://u:***@rabbit/"),
        ("amqp://u:p1@a/,amqps://v:p2@b/", "amqp://u:***@a/,amqps://v:***@b/"),
        ("amqp://u:se,cret@rabbit/", "amqp://***,***@rabbit/"),
        ("cret@rabbit/", "***@rabbit/"),
        ("amqp://user@rabbit/", "amqp://user@rabbit/"),
    ],
    ids=["slash-hash", "question", "two-at", "list", "comma", "no-scheme", "user-only"],
)
def test_h6_redact_url_masks_unescaped_and_listed_passwords(url: str, redacted: str) -> None:
    """redact_url masks a password whatever it holds, in each URL of a comma-separated list."""
    assert redact_url(url) == redacted


def test_login_url_encodes_file_password_once(tmp_path: Path) -> None:
    """The password file's text is percent-encoded into the URL; an encoded user stays as given."""
    secret = tmp_path / "password"
    secret.write_text("a/b#c?d@e,f%\n")
    settings = load_settings(
        amqp_url="amqp://us%40er@rabbit:5672/vh", amqp_password_file=str(secret)
    )
    assert settings.login_url(settings.amqp_urls()[0]) == (
        "amqp://us%40er:a%2Fb%23c%3Fd%40e%2Cf%25@rabbit:5672/vh"
    )


def test_idempotency_url_not_in_repr() -> None:
    """A Redis URL (which may hold a password) is kept out of the settings' repr."""
    settings = load_settings(idempotency_url=f"redis://:{PASSWORD}@redis:6379/0")
    assert PASSWORD not in repr(settings)


def test_overrides_win_and_settings_are_frozen() -> None:
    """load_settings(**overrides) sets values; the result cannot be mutated."""
    settings = load_settings(prefetch=5)
    assert settings.prefetch == 5
    with pytest.raises(ValueError, match="frozen"):
        settings.prefetch = 6  # type: ignore[misc]
    assert isinstance(settings, Settings)


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    """Files standing in for a CA bundle, client certificate and key (existence is checked at
    load time; their content only when connecting)."""
    files = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN NOTHING-----\n")
        files[name] = str(path)
    return files


def test_tls_files_read_from_environment(
    monkeypatch: pytest.MonkeyPatch, pem_files: dict[str, str]
) -> None:
    """BURROW_TLS_CA_FILE / _CERT_FILE / _KEY_FILE / _REQUIRED set the TLS settings."""
    monkeypatch.setenv("BURROW_AMQP_URL", "amqps://u:p@rabbit:5671/")
    monkeypatch.setenv("BURROW_TLS_CA_FILE", pem_files["ca"])
    monkeypatch.setenv("BURROW_TLS_CERT_FILE", pem_files["cert"])
    monkeypatch.setenv("BURROW_TLS_KEY_FILE", pem_files["key"])
    monkeypatch.setenv("BURROW_TLS_REQUIRED", "true")
    settings = load_settings()
    assert (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file) == (
        pem_files["ca"],
        pem_files["cert"],
        pem_files["key"],
    )
    assert settings.tls_required


def test_tls_defaults_are_off() -> None:
    """With no TLS variable: system CAs, no client certificate, plain URLs allowed."""
    settings = load_settings()
    assert (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file) == (None,) * 3
    assert not settings.tls_required


@pytest.mark.parametrize("name", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
def test_missing_tls_file_names_the_variable(name: str, pem_files: dict[str, str]) -> None:
    """A TLS file that does not exist is a ConfigError naming its variable and the path."""
    values = {"tls_cert_file": pem_files["cert"], "tls_key_file": pem_files["key"]}
    values[name] = "/nonexistent/tls.pem"
    with pytest.raises(ConfigError, match=f"BURROW_{name.upper()}") as caught:
        load_settings(**values)
    assert "/nonexistent/tls.pem" in str(caught.value)


@pytest.mark.parametrize("given", ["cert", "key"])
def test_client_cert_and_key_go_together(given: str, pem_files: dict[str, str]) -> None:
    """A client certificate without its key (or a key without a certificate) is refused."""
    with pytest.raises(ConfigError, match=r"BURROW_TLS_KEY_FILE: .*go together"):
        load_settings(**{f"tls_{given}_file": pem_files[given]})


@pytest.mark.parametrize("option", ["no_verify_ssl=1", "cafile=/ca.pem", "certfile=/c.pem"])
def test_tls_options_in_url_refused(monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    """TLS options in the URL query (which would be ignored, or turn verification off) are a
    ConfigError pointing at the BURROW_TLS_* variables, without the password."""
    monkeypatch.setenv("BURROW_AMQP_URL", f"amqps://u:{PASSWORD}@rabbit:5671/?{option}")
    with pytest.raises(ConfigError, match=r"BURROW_AMQP_URL: .*BURROW_TLS_CA_FILE") as caught:
        load_settings()
    assert PASSWORD not in str(caught.value)


def test_tls_required_refuses_plain_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """BURROW_TLS_REQUIRED with any amqp:// URL in the list is a ConfigError (never a silent
    plaintext connection), shown redacted; an all-amqps:// list loads."""
    monkeypatch.setenv("BURROW_TLS_REQUIRED", "1")
    monkeypatch.setenv("BURROW_AMQP_URL", f"amqps://u:{PASSWORD}@a/,amqp://u:{PASSWORD}@b/")
    with pytest.raises(ConfigError, match="BURROW_TLS_REQUIRED") as caught:
        load_settings()
    assert "amqp://u:***@b/" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    monkeypatch.setenv("BURROW_AMQP_URL", f"amqps://u:{PASSWORD}@a/,amqps://u:{PASSWORD}@b/")
    assert load_settings().tls_required


def test_tls_context_always_verifies() -> None:
    """The amqps:// context requires the broker's certificate and checks its hostname."""
    context = _tls_context(load_settings(amqp_url="amqps://rabbit/"))
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_unloadable_tls_files_name_the_variable(pem_files: dict[str, str]) -> None:
    """A CA bundle or client certificate that exists but cannot be loaded is a ConfigError
    naming the variable (raised at connect time: files may be replaced after start)."""
    with pytest.raises(ConfigError, match="BURROW_TLS_CA_FILE"):
        _tls_context(load_settings(tls_ca_file=pem_files["ca"]))
    with pytest.raises(ConfigError, match="BURROW_TLS_CERT_FILE"):
        _tls_context(load_settings(tls_cert_file=pem_files["cert"], tls_key_file=pem_files["key"]))


def test_tls_failures_described_and_transient_ones_not() -> None:
    """A certificate or handshake error (as aiormq wraps it) reads as a TLS problem naming
    the cause; a connection cut mid-handshake is not one (it is retried like any loss)."""
    unknown_ca = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unknown_ca.verify_message, unknown_ca.verify_code = "unable to get local issuer certificate", 20
    wrapped = ConnectionError("connect failed")
    wrapped.__cause__ = unknown_ca
    assert _tls_problem(wrapped) == (
        "TLS verification failed: unable to get local issuer certificate; "
        "is BURROW_TLS_CA_FILE the CA that signed the broker's certificate?"
    )
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message, mismatch.verify_code = "Hostname mismatch", 62
    assert "connect by a name the broker's certificate holds" in str(_tls_problem(mismatch))
    plain_port = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert _tls_problem(plain_port) == "TLS handshake failed: wrong version number"
    assert _tls_problem(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")) is None
    assert _tls_problem(ConnectionResetError(104, "reset")) is None


def test_unknown_variable_names_the_closest_setting() -> None:
    """A typo'd BURROW_* variable is reported with the setting it most resembles."""
    found = unknown_variables({"BURROW_PREFECH": "10", "BURROW_AMQP_ULR": "amqp://x"})
    assert found == {"BURROW_AMQP_ULR": "BURROW_AMQP_URL", "BURROW_PREFECH": "BURROW_PREFETCH"}


def test_unknown_variable_without_a_close_setting() -> None:
    """A BURROW_* variable resembling no setting is reported without a suggestion."""
    assert unknown_variables({"BURROW_ZZZQQ": "1"}) == {"BURROW_ZZZQQ": None}


def test_variables_burrow_reads_are_not_unknown() -> None:
    """Settings (in any case), the test suite's BURROW_TEST_* and the local broker script's
    BURROW_AMQP_HOST/PORT are known; other prefixes are not looked at."""
    environ = {
        "BURROW_PREFETCH": "1",
        "burrow_namespace": "x",
        "BURROW_TEST_AMQP_URL": "amqp://x",
        "BURROW_TEST_ANYTHING_NEW": "1",
        "BURROW_AMQP_HOST": "127.0.0.1",
        "BURROW_AMQP_PORT": "5672",
        "PATH": "/bin",
        "XBURROW_PREFECH": "1",
    }
    assert unknown_variables(environ) == {}


def test_load_settings_warns_once_per_unknown_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """load_settings logs one warning per unknown variable per process, naming the closest."""
    monkeypatch.setattr(config, "_warned", set())
    monkeypatch.setenv("BURROW_PREFECH", "10")
    with caplog.at_level(logging.WARNING, logger="burrow.config"):
        settings = load_settings()
        load_settings()
    assert settings.prefetch == 64  # ignored, as the warning says
    messages = [record.getMessage() for record in caplog.records if record.name == "burrow.config"]
    assert len(messages) == 1
    assert "BURROW_PREFECH" in messages[0]
    assert "did you mean BURROW_PREFETCH?" in messages[0]


def test_unknown_settings_argument_names_the_closest_field() -> None:
    """`load_settings(namspace=…)` and `Settings(namspace=…)` refuse the argument instead of
    dropping it; load_settings names the closest field."""
    with pytest.raises(
        ConfigError, match="'namspace' is not a Burrow setting; did you mean namespace"
    ):
        load_settings(namspace="orders")
    with pytest.raises(ConfigError, match="'zzzqq' is not a Burrow setting; the README lists"):
        load_settings(zzzqq=1)
    with pytest.raises(ValueError, match="namspace"):
        Settings(namspace="orders")  # type: ignore[call-arg]


def test_unknown_variable_is_still_only_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown BURROW_* variable keeps being warned about, never an error."""
    monkeypatch.setattr(config, "_warned", set())
    monkeypatch.setenv("BURROW_NAMSPACE", "orders")
    assert load_settings().namespace == "burrow"


def test_settings_from_applies_overrides_over_settings() -> None:
    """settings_from: the environment when no settings, the settings as they are without
    overrides, and overrides validated over the settings (a bad value names its variable)."""
    base = Settings(prefetch=3)
    assert config.settings_from(base, {}) is base
    merged = config.settings_from(base, {"namespace": "orders"})
    assert (merged.namespace, merged.prefetch) == ("orders", 3)
    assert config.settings_from(None, {"prefetch": 9}).prefetch == 9
    with pytest.raises(ConfigError, match="BURROW_PREFETCH"):
        config.settings_from(base, {"prefetch": 0})
    with pytest.raises(ConfigError, match="did you mean outbound"):
        config.settings_from(base, {"outbond": []}, arguments=("outbound",))


def test_gateway_forward_headers_are_header_names() -> None:
    """BURROW_GATEWAY_FORWARD_HEADERS is comma-separated header names, case-insensitive; a
    name that is no HTTP token names the variable."""
    settings = load_settings(gateway_forward_headers=" X-Service-Token, x-tenant,,x-SERVICE-token")
    assert config.header_list(settings.gateway_forward_headers) == ["x-service-token", "x-tenant"]
    assert config.header_list(load_settings().gateway_forward_headers) == []
    with pytest.raises(ConfigError, match="BURROW_GATEWAY_FORWARD_HEADERS: 'x token'"):
        load_settings(gateway_forward_headers="x token")


def _open_refused(reply_code: int, reply_text: str) -> aiormq.exceptions.InvalidFrameError:
    """The error a Burrow connection raises when the broker answers Connection.Open with a
    close: aiormq's InvalidFrameError, keeping the frame (`shim.HandshakeRefused`)."""
    frame = spec.Connection.Close(reply_code, reply_text)
    return shim.HandshakeRefused(f"Expected one of ['Connection.OpenOk'], got {frame!r}", frame)


def test_refused_vhost_reads_the_brokers_reason() -> None:
    """A vhost the broker refuses (530 NOT_ALLOWED) yields its reason text; so does the
    description of the failed connect."""
    refused = _open_refused(530, "NOT_ALLOWED - vhost shop not found")
    assert _vhost_refusal(refused) == "NOT_ALLOWED - vhost shop not found"
    assert _describe(refused).endswith("530 NOT_ALLOWED - vhost shop not found")


def test_vhost_connection_limit_is_not_a_refused_vhost() -> None:
    """A connection limit (also 530) and other errors are not treated as a refused vhost:
    they are retried."""
    limit = (
        "NOT_ALLOWED - access to vhost '/' refused for user 'u': connection limit (5) is reached"
    )
    assert _vhost_refusal(_open_refused(530, limit)) is None
    assert _vhost_refusal(_open_refused(541, "INTERNAL_ERROR - vhost '/' is down")) is None
    assert _vhost_refusal(ConnectionRefusedError(111, "Connection refused")) is None
