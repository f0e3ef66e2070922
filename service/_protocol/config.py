"""Settings from `BURROW_*` environment variables, validated once at start.

The AMQP URL holds a password: it is kept as a secret and only ever shown redacted. TLS files
must exist at start; amqps:// always verifies the broker's certificate and hostname. A
`BURROW_*` variable that is no setting (a typo) is warned about, naming the closest one; a
settings argument that is no setting (`Client(namspace=…)`) is an error naming the closest one.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service._protocol.errors import ConfigError

_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class Settings(BaseSettings):
    """Every knob Burrow reads, each from `BURROW_<NAME>`."""

    # extra="forbid": an argument that is no setting is refused, never dropped; the environment
    # is read field by field, so an unknown variable is only warned about (load_settings).
    model_config = SettingsConfigDict(env_prefix="BURROW_", extra="forbid", frozen=True)

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="One or more AMQP URLs, comma-separated, tried in turn (cluster failover).",
    )
    namespace: str = Field(default="burrow", pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    prefetch: int = Field(default=64, ge=1, le=65535)
    default_deadline: float = Field(default=30.0, gt=0, le=86400)
    handler_timeout: float = Field(
        default=600.0, gt=0, description="Upper bound on one handler run; below consumer timeout."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=128 * 1_048_576)
    publish_timeout: float = Field(default=10.0, gt=0)
    ack_delay: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="Seconds an ack may wait to share one basic.ack(multiple) with later ones.",
    )
    heartbeat: int = Field(default=10, ge=0, le=600)
    connect_timeout: float = Field(default=5.0, gt=0)
    reconnect_min_delay: float = Field(default=0.2, gt=0)
    reconnect_max_delay: float = Field(default=10.0, gt=0)
    queue_type: Literal["quorum", "classic"] = "quorum"
    max_queue_length: int | None = Field(default=None, ge=1)
    shutdown_grace: float = Field(default=30.0, ge=0)
    max_retries: int = Field(
        default=5, ge=0, le=50, description="Retries of a retryable failure before dead-lettering."
    )
    retry_base_delay: float = Field(
        default=1.0, gt=0, le=3600, description="First retry delay; doubles per attempt."
    )
    retry_levels: int = Field(default=6, ge=1, le=20, description="Holding queues (delays).")
    idempotency_url: str = Field(
        default="memory://",
        description="memory:// (one process) or redis://host:port/db.",
        repr=False,  # may hold a Redis password
    )
    idempotency_ttl: float = Field(default=86400.0, gt=0, description="Seconds a key is kept.")
    job_result_ttl: float = Field(
        default=86400.0, ge=1, description="Seconds a job's result is kept after it finished."
    )
    job_store_url: str = Field(
        default="sqlite://",
        description=(
            "Where job results are kept: sqlite:// (a file shared by the processes of one "
            "machine; sqlite:///path to choose it), redis://host:port/db (every machine), "
            "memory:// (one process)."
        ),
        repr=False,  # may hold a Redis password
    )
    outbox_dsn: SecretStr | None = Field(
        default=None,
        description=(
            "PostgreSQL URL of the transactional outbox and inbox (postgresql://user:pw@host/db); "
            "set, `burrow run` also runs the outbox relay."
        ),
    )
    outbox_schema: str = Field(
        default="burrow",
        pattern=r"^[a-z_][a-z0-9_]{0,47}$",
        description="Schema of the outbox and inbox tables (`burrow outbox init` creates them).",
    )
    outbox_poll_interval: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Seconds between the relay's scans when no NOTIFY woke it.",
    )
    outbox_batch_size: int = Field(
        default=500, ge=1, le=100_000, description="Outbox rows read and published per batch."
    )
    outbox_retention: float = Field(
        default=604800.0, gt=0, description="Seconds sent outbox rows and inbox ids are kept."
    )
    outbox_max_attempts: int = Field(
        default=10, ge=1, le=1000, description="Broker refusals of a row before it is parked."
    )
    amqp_password_file: str | None = Field(
        default=None,
        description="File holding the AMQP password (a mounted secret); re-read at every connect.",
    )
    tls_ca_file: str | None = Field(
        default=None,
        description="PEM CA bundle that signed the broker's certificate (unset: system CAs).",
    )
    tls_cert_file: str | None = Field(
        default=None, description="PEM client certificate for amqps:// (with tls_key_file)."
    )
    tls_key_file: str | None = Field(
        default=None,
        validate_default=True,  # so a certificate without its key is caught
        description="PEM private key of tls_cert_file.",
    )
    tls_required: bool = Field(
        default=False, description="Refuse plain amqp:// URLs: every connection must be TLS."
    )
    startup_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Exit 1 if not ready this many seconds after start (unset: keep trying).",
    )
    passive_topology: bool = Field(
        default=False,
        description="Only check that exchanges/queues exist (least privilege; pre-provisioned).",
    )
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8000, ge=0, le=65535)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(
        default=8080, ge=0, le=65535, description="`burrow gateway`'s HTTP API port."
    )
    gateway_auth: Literal["api-key", "none"] = Field(
        default="api-key",
        description=(
            "api-key: every API request needs `Authorization: Bearer <key>` or `X-API-Key`; "
            "none: no check (only when said)."
        ),
    )
    gateway_api_keys: SecretStr = Field(
        default=SecretStr(""), description="Accepted API keys or bearer tokens, comma-separated."
    )
    gateway_api_keys_file: str | None = Field(
        default=None, description="File of accepted keys, one per line (a mounted secret)."
    )
    gateway_cors_origins: str = Field(
        default="", description="Origins allowed by CORS, comma-separated (empty: no CORS)."
    )
    gateway_max_wait: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="Longest a request is held, seconds (caps `Prefer: wait=N` and deadlines).",
    )
    gateway_callback_hosts: str = Field(
        default="",
        description=(
            "Hosts a callback URL may name, comma-separated; `*.example.com` for subdomains "
            "(empty: callbacks refused)."
        ),
    )
    gateway_webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Standard Webhooks signing secret (`whsec_<base64>`); needed for callbacks.",
    )
    gateway_webhook_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Seconds one webhook POST may take."
    )
    gateway_forward_headers: str = Field(
        default="",
        description=(
            "HTTP request headers the gateway passes on to the service as message headers "
            "(lower-cased name, the value as text), comma-separated, case-insensitive (empty: "
            "none). Its own key headers, hop-by-hop and framing headers, Prefer, the callback "
            "header and Burrow's protocol headers are refused at start."
        ),
    )

    @field_validator("gateway_forward_headers")
    @classmethod
    def _check_forward_headers(cls, value: str) -> str:
        for name in header_list(value):
            if _HTTP_TOKEN.fullmatch(name) is None:
                raise ValueError(f"{name[:64]!r} is not an HTTP header name")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_urls(cls, value: SecretStr) -> SecretStr:
        urls = _split(value.get_secret_value())
        if not urls:
            raise ValueError("no URL given")
        for number, url in enumerate(urls, 1):
            # Never echo the URL: a misplaced character leaves the password where redaction
            # cannot find it.
            where = f"URL {number} of {len(urls)}" if len(urls) > 1 else "the URL"
            problem = _url_problem(url)
            if problem is not None:
                raise ValueError(f"{where} {problem}")
            tls_options = sorted(
                _URL_TLS_OPTIONS.intersection(k for k, _ in parse_qsl(urlsplit(url).query))
            )
            if tls_options:
                # Our SSL context overrides them; refusing beats silently ignoring no_verify_ssl.
                raise ValueError(
                    f"TLS options in the URL ({', '.join(tls_options)}) are not used: "
                    "set BURROW_TLS_CA_FILE / BURROW_TLS_CERT_FILE / BURROW_TLS_KEY_FILE"
                )
        return value

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _check_tls_files(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not os.path.isfile(value):
            raise ValueError(f"no such file: {value}")
        # A tls_cert_file that failed is missing from info.data (and already reported).
        if (
            info.field_name == "tls_key_file"
            and "tls_cert_file" in info.data
            and (info.data["tls_cert_file"] is None) != (value is None)
        ):
            raise ValueError(
                "BURROW_TLS_CERT_FILE and BURROW_TLS_KEY_FILE go together: set both or neither"
            )
        return value

    @field_validator("tls_required")
    @classmethod
    def _check_tls_required(cls, value: bool, info: ValidationInfo) -> bool:
        urls: SecretStr | None = info.data.get("amqp_url")
        if value and urls is not None:
            for url in _split(urls.get_secret_value()):
                if urlsplit(url).scheme != "amqps":
                    raise ValueError(
                        f"TLS is required but BURROW_AMQP_URL has a plain URL: {redact_url(url)}"
                    )
        return value

    def amqp_urls(self) -> list[str]:
        """The URLs to try, in order, with secrets."""
        return _split(self.amqp_url.get_secret_value())

    def login_url(self, url: str) -> str:
        """`url` with the password from `amqp_password_file`, read now (secrets rotate)."""
        if self.amqp_password_file is None:
            return url
        try:
            with open(self.amqp_password_file, encoding="utf-8") as secret:
                password = secret.read().strip()
        except OSError as exc:
            raise ConfigError(
                f"BURROW_AMQP_PASSWORD_FILE: cannot read {self.amqp_password_file}: {exc.strerror}"
            ) from None
        parts = urlsplit(url)
        user = unquote(parts.username or "guest")  # as given: percent-encoded
        host = parts.netloc.rsplit("@", 1)[-1]
        login = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return urlunsplit(parts._replace(netloc=f"{login}@{host}"))

    def redacted_urls(self) -> list[str]:
        """The URLs with passwords masked, for logs and errors."""
        return [redact_url(url) for url in self.amqp_urls()]


# An HTTP field name (RFC 9110 §5.1: a token).
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_list(value: str) -> list[str]:
    """The header names of a comma-separated setting, lower-cased, in order, each once."""
    names = (name.strip().lower() for name in value.split(","))
    return list(dict.fromkeys(name for name in names if name))


# What aiormq would read from an amqps:// URL's query; Burrow's own SSL context replaces them.
_URL_TLS_OPTIONS = frozenset({"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"})


def _split(urls: str) -> list[str]:
    return [url.strip() for url in urls.split(",") if url.strip()]


_URL_HINT = (
    "percent-encode special characters of the user name and password "
    "(/ as %2F, ? as %3F, # as %23, @ as %40, and ',' as %2C: a comma separates URLs)"
)


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be used safely, in words that never hold its user name or password."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("amqp", "amqps"):
        return f"is not an amqp:// or amqps:// URL; {_URL_HINT}"
    userinfo, at, _ = rest.rpartition("@")
    # The user name and password end at the first '/', '?' or '#': one of them (or a second
    # '@') in the password moves it into the host, port or path, where it would be logged.
    if rest.count("@") > 1 or (at and any(char in userinfo for char in "/?#")):
        return f"has an unescaped '/', '?', '#' or '@' in its credentials or vhost; {_URL_HINT}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:  # its text may quote the URL: not shown
        return f"has an invalid host or port; {_URL_HINT}"
    if not parts.hostname:
        return "has no host"
    return None


def redact_url(url: str) -> str:
    """Mask the password in an AMQP URL, or in each URL of a comma-separated list.

    Whatever precedes the last '@' is treated as credentials, so a password holding an
    unescaped '/', '?', '#' or '@' is masked too (the host shown may then be wrong, never the
    password).
    """
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"***@{url.rpartition('@')[2]}" if "@" in url else url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        try:
            urlsplit(url).port  # noqa: B018
        except ValueError:  # "amqp://user:pass" cut at a comma inside the password
            return f"{scheme}://***"
        return url
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url  # a user name without a password
    return f"{scheme}://{user}:***@{host}"


_log = logging.getLogger("burrow.config")

# BURROW_* variables Burrow reads outside `Settings`: the test suite's (BURROW_TEST_AMQP_URL…)
# and deploy/local/ensure-rabbitmq.sh's (where `make run` looks for a local broker).
_OTHER_PREFIXES = ("BURROW_TEST_",)
_OTHER_VARIABLES = frozenset({"BURROW_AMQP_HOST", "BURROW_AMQP_PORT"})
_warned: set[str] = set()  # each unknown variable is warned about once per process


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The `BURROW_*` variables of `environ` (default: the process's) that no setting reads,
    each with the closest known variable (None when nothing is close)."""
    known = {f"BURROW_{name.upper()}" for name in Settings.model_fields} | _OTHER_VARIABLES
    unknown: dict[str, str | None] = {}
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()  # pydantic-settings reads the variables case-insensitively
        if not upper.startswith("BURROW_") or upper.startswith(_OTHER_PREFIXES) or upper in known:
            continue
        unknown[name] = _closest(upper, known)
    return unknown


def _closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name` (a typo of it), or None when none is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def check_setting_names(names: Iterable[str], arguments: Iterable[str] = ()) -> None:
    """Refuse settings arguments that are no setting (`namspace=`), naming the closest field
    (or the closest of `arguments`, the other keyword arguments of the caller: `outbound`).

    Raises:
        ConfigError: one of `names` is not a `Settings` field.
    """
    unknown = [name for name in names if name not in Settings.model_fields]
    if not unknown:
        return
    candidates = {*Settings.model_fields, *arguments}
    what = "a Burrow setting or argument" if arguments else "a Burrow setting"
    problems = []
    for name in unknown:
        closest = _closest(name, candidates)
        hint = f"did you mean {closest}?" if closest else "the README lists the settings"
        problems.append(f"{name!r} is not {what}; {hint}")
    raise ConfigError("; ".join(problems))


def _warn_unknown_variables() -> None:
    for name, closest in unknown_variables().items():
        if name not in _warned:
            _warned.add(name)
            hint = f"did you mean {closest}?" if closest else "the README lists the settings"
            _log.warning("%s is not a Burrow setting and is ignored; %s", name, hint)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; a bad value raises `ConfigError` naming the variable.

    `overrides` (`namespace="orders"`) win over the environment; one that is no setting raises
    `ConfigError` naming the closest. An unknown `BURROW_*` variable is logged as a warning
    (once per process), with the closest known name.
    """
    check_setting_names(overrides)
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"BURROW_{str(err['loc'][0]).upper()}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    _warn_unknown_variables()
    return settings


def settings_from(
    settings: Settings | None, overrides: Mapping[str, object], arguments: Iterable[str] = ()
) -> Settings:
    """What a client taking `settings` and `**overrides` uses: `settings` (default: read from
    the environment) with `overrides` over them, checked as `load_settings` checks them.

    Args:
        arguments: the caller's other keyword arguments, suggested for a misspelt one.

    Raises:
        ConfigError: an override is no setting, or a value is invalid.
    """
    check_setting_names(overrides, arguments)
    if settings is None:
        return load_settings(**overrides)
    if not overrides:
        return settings
    # Every field given: the environment is not read again, the result validated as a whole.
    return load_settings(**{**dict(settings), **overrides})
