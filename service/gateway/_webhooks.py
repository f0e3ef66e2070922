"""Job completions POSTed to the HTTP caller's callback URL, signed as Standard Webhooks say.

The gateway submits a job with the callback route `gateway.webhook` and the URL (with the
job's operation) as `x-callback-data`; the service copies that onto the completion it
publishes to the callback route. The gateway's own service, `gateway`, consumes that route
(`<ns>.gateway.webhooks.events`) and POSTs. A POST that fails (an error, no answer in time,
any status but 2xx) raises a retryable error: the delivery goes through Burrow's retry holding
queues and, after `BURROW_MAX_RETRIES`, into `<ns>.gateway.dlq` (`retries_exhausted`). A URL
the allow-list no longer accepts, a 410 Gone and an unusable completion are parked at once.

Signatures: `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`,
the key being the base64 text after `whsec_`. `webhook-id` is the job id, the same on every
retry, so a receiver drops duplicates by it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import ConfigDict

from service._observe import metrics
from service._protocol import codec, envelope
from service._protocol.codec import Model
from service._protocol.config import Settings
from service._protocol.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from service._protocol.jobs import valid_callback, valid_job_id
from service._protocol.registry import Context, Service, State
from service._protocol.vocabulary import H_CALLBACK_DATA, H_JOB_ID

CALLBACK_ROUTE = "gateway.webhook"  # the callback routing key of every gateway submit
_MAX_URL = 2048


def parse_secret(text: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (the prefix is optional)."""
    encoded = text.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("BURROW_GATEWAY_WEBHOOK_SECRET must be whsec_<base64>") from None
    if len(key) < 16:
        raise ConfigError("BURROW_GATEWAY_WEBHOOK_SECRET: use a key of at least 16 bytes")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value of one POST."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """Which callback URLs may be named: http(s), no credentials, a host on the allow-list
    (`api.example.com` exactly, or `*.example.com` for its subdomains)."""

    hosts: frozenset[str]
    suffixes: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> CallbackPolicy:
        """The allow-list of `BURROW_GATEWAY_CALLBACK_HOSTS`."""
        names = [h.strip().lower() for h in settings.gateway_callback_hosts.split(",")]
        exact = frozenset(h for h in names if h and not h.startswith("*."))
        suffixes = tuple(h[1:] for h in names if h.startswith("*.") and len(h) > 2)
        return cls(exact, suffixes)

    @property
    def enabled(self) -> bool:
        """Whether any callback is allowed at all."""
        return bool(self.hosts or self.suffixes)

    def check(self, url: str) -> str:
        """`url` if it may be called back; else `InvalidArgument` saying why."""
        if len(url) > _MAX_URL:
            raise InvalidArgument(f"the callback URL is longer than {_MAX_URL} characters")
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise InvalidArgument("the callback URL cannot be parsed") from None
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidArgument("the callback URL must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise InvalidArgument("the callback URL must not hold credentials")
        if host not in self.hosts and not any(host.endswith(s) for s in self.suffixes):
            raise InvalidArgument(
                "the callback host is not allowed (BURROW_GATEWAY_CALLBACK_HOSTS)",
                details={"host": host[:253]},
            )
        return url


def callback_data(url: str, operation: str) -> str:
    """The `x-callback-data` of a gateway submit: where to POST, and the job's operation."""
    return codec.encode({"url": url, "operation": operation}).decode()


class Completion(Model):
    """A job's completion as published to the callback route: its reply, or an error body."""

    model_config = ConfigDict(extra="allow", frozen=True)


def webhook_service(settings: Settings, policy: CallbackPolicy) -> Service:
    """The gateway's own service: one subscription that POSTs completions to their URLs."""
    secret = settings.gateway_webhook_secret.get_secret_value()
    if policy.enabled and not secret:
        raise ConfigError(
            "BURROW_GATEWAY_CALLBACK_HOSTS allows callbacks: set BURROW_GATEWAY_WEBHOOK_SECRET "
            "(whsec_<base64>) to sign them"
        )
    key = parse_secret(secret) if secret else b""
    timeout = aiohttp.ClientTimeout(total=settings.gateway_webhook_timeout)

    @asynccontextmanager
    async def session(state: State) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=timeout) as opened:
            state.webhook_session = opened
            yield

    svc = Service(
        "gateway",
        description="The HTTP gateway's webhooks: job completions POSTed to callback URLs.",
        lifespan=session,
    )

    @svc.subscribe(CALLBACK_ROUTE, name="webhooks")
    async def webhooks(event: Completion, ctx: Context) -> None:
        """POST one job's completion to the callback URL its submit named."""
        url, operation = _target(ctx.headers.get(H_CALLBACK_DATA))
        try:
            policy.check(url)
        except InvalidArgument as exc:  # the allow-list changed since the submit
            raise _refused(FailedPrecondition(exc.message, details=exc.details)) from None
        job_id = valid_job_id(envelope.text(ctx.headers.get(H_JOB_ID))) or valid_job_id(
            ctx.correlation_id
        )
        if job_id is None:  # it names the webhook (an HTTP header): never empty or forged
            raise _refused(
                InvalidArgument(
                    f"the completion carries no usable {H_JOB_ID} ([A-Za-z0-9_-]{{1,64}}), "
                    "nor a correlation id that is one"
                )
            )
        webhook_id = f"{operation}.{job_id}"
        body = codec.encode(_payload(webhook_id, operation, event, envelope.failed(ctx.headers)))
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "burrow-gateway",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, webhook_id, timestamp, body),
        }
        session: aiohttp.ClientSession = ctx.state.webhook_session
        await _post(session, url, body, headers)

    return svc


def _target(data: object) -> tuple[str, str]:
    text = envelope.text(data)
    try:
        found = codec.decode_json(text.encode()) if text is not None else None
    except InvalidArgument:  # not JSON
        found = None
    if (
        not isinstance(found, dict)
        or not isinstance(found.get("url"), str)
        or valid_callback(found.get("operation")) is None  # `<svc>.<op>`: it names the webhook
    ):
        raise _refused(InvalidArgument(f"the completion carries no usable {H_CALLBACK_DATA}"))
    return found["url"], found["operation"]


def _refused(error: ServiceError) -> ServiceError:
    """Count a completion that will never be POSTed; `error` is what parks it."""
    metrics.WEBHOOK_DELIVERIES.labels("refused").inc()
    return error


def _payload(webhook_id: str, operation: str, event: Completion, failed: bool) -> dict[str, Any]:
    """The POST body; its `job_id` is the id the gateway handed out (`<svc>.<op>.<job id>`),
    which is also the webhook id."""
    value = event.model_dump(mode="json")
    return {
        "type": "job.failed" if failed else "job.completed",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {
            "job_id": webhook_id,
            "operation": operation,
            "status": "failed" if failed else "completed",
            ("error" if failed else "result"): value,
        },
    }


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> None:
    host = urlsplit(url).hostname or ""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as got:
            status = got.status
            await got.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        raise Unavailable(f"webhook to {host}: {type(exc).__name__}") from None
    if 200 <= status < 300:
        metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
        return
    if status == 410:  # Gone: the receiver asks never to be called for this again
        raise _refused(FailedPrecondition(f"webhook to {host} answered 410 Gone"))
    metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
    raise Unavailable(f"webhook to {host} answered {status}", details={"status": status})
