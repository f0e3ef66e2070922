"""Prometheus metrics, prefix `burrow_`: RED on the serving and the calling side, links, build,
the outbox relay and the inbox.

Label values are bounded (service, operation, outcome, reason, link) — never ids.
"""

from __future__ import annotations

import platform
import weakref
from collections.abc import Iterable
from importlib import metadata
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from service._protocol.errors import ErrorCode
from service._protocol.types import Outcome
from service._protocol.vocabulary import DeadReason, PublishKind, Status

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

BUILD_INFO = Gauge(
    "burrow_build_info",
    "Always 1; the labels say which Burrow, Python and aio-pika this process runs.",
    ["version", "python_version", "aio_pika_version"],
)
MESSAGES_RECEIVED = Counter(
    "burrow_messages_received_total",
    "Messages delivered to a Burrow consumer.",
    ["service", "operation"],
)
MESSAGES_HANDLED = Counter(
    "burrow_messages_handled_total",
    "Messages whose handling ended, by outcome.",
    ["service", "operation", "outcome"],
)
HANDLER_DURATION = Histogram(
    "burrow_handler_duration_seconds",
    "Time from delivery to settled, per operation.",
    ["service", "operation"],
    buckets=_LATENCY_BUCKETS,
)
HANDLER_IN_PROGRESS = Gauge(
    "burrow_handler_in_progress",
    "Messages being handled right now.",
    ["service"],
)
MESSAGES_PUBLISHED = Counter(
    "burrow_messages_published_total",
    "Publishes by outcome (confirmed, returned, nacked, timeout, lost).",
    ["kind", "outcome"],
)
RPC_CLIENT_CALLS = Counter(
    "burrow_rpc_client_calls_total",
    "Calls made by this process, by outcome (ok or the error code).",
    ["operation", "outcome"],
)
RPC_CLIENT_DURATION = Histogram(
    "burrow_rpc_client_duration_seconds",
    "Call latency seen by the caller, publish to reply.",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
RPC_CLIENT_PENDING = Gauge(
    "burrow_rpc_client_pending",
    "Calls waiting for their reply.",
)
RPC_LATE_REPLIES = Counter(
    "burrow_rpc_late_replies_total",
    "Replies that matched no pending call (late, duplicate or unknown correlation id).",
)
DEAD_LETTERED = Counter(
    "burrow_dead_lettered_total",
    "Messages parked in a dead-letter queue, by reason.",
    ["service", "reason"],
)
AMQP_RECONNECTS = Counter(
    "burrow_amqp_reconnects_total",
    "Connections re-established after a loss.",
    ["link"],
)
AMQP_CONNECTION_BLOCKED = Gauge(
    "burrow_amqp_connection_blocked",
    "1 while the broker blocks this connection (memory or disk alarm).",
    ["link"],
)
CONSUMERS_ATTACHED = Gauge(
    "burrow_consumers_attached",
    "Consumers currently attached to their queues.",
    ["link"],
)

GATEWAY_REQUESTS = Counter(
    "burrow_gateway_requests_total",
    "HTTP requests the gateway answered, by route (`POST /v1/calc/add`) and status code.",
    ["route", "code"],
)
GATEWAY_DURATION = Histogram(
    "burrow_gateway_request_duration_seconds",
    "Time from an HTTP request's arrival to its answer, per route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
GATEWAY_IN_PROGRESS = Gauge(
    "burrow_gateway_requests_in_progress",
    "HTTP requests the gateway is answering right now.",
    ["route"],
)
WEBHOOK_DELIVERIES = Counter(
    "burrow_gateway_webhooks_total",
    "Webhook POSTs of job completions, by outcome (delivered, failed, refused).",
    ["outcome"],
)

OUTBOX_PENDING = Gauge(
    "burrow_outbox_pending_rows",
    "Outbox rows committed and neither published nor parked yet (read by the relay).",
)
OUTBOX_LAG = Gauge(
    "burrow_outbox_lag_seconds",
    "Age of the oldest outbox row not published yet; 0 when there is none.",
)
OUTBOX_PUBLISHED = Counter(
    "burrow_outbox_published_total",
    "Outbox rows the relay published, by outcome (confirmed; unrouted: an event no "
    "subscriber matched).",
    ["outcome"],
)
OUTBOX_PARKED = Counter(
    "burrow_outbox_parked_total",
    "Outbox rows parked instead of published, by reason.",
    ["reason"],
)
INBOX_DUPLICATES = Counter(
    "burrow_inbox_duplicates_total",
    "Deliveries the inbox found already handled: acked without running the handler.",
)

PUBLISH_OUTCOMES = ("confirmed", "returned", "nacked", "timeout", "lost")  # link.PUBLISH_OUTCOMES
CALL_OUTCOMES: tuple[str, ...] = (Status.OK, *ErrorCode)  # ok, or the error code of the reply
DEAD_LETTER_REASONS: tuple[str, ...] = tuple(DeadReason)
# Label values of burrow_messages_published_total{kind}, all created at zero.
PUBLISH_KINDS: tuple[str, ...] = tuple(PublishKind)
# What became of an outbox row the relay published; why one was parked (service/_outbox/relay).
OUTBOX_OUTCOMES = ("confirmed", "unrouted")
OUTBOX_PARK_REASONS = ("unroutable", "too_large", "refused", "invalid", "internal")
# delivered: the receiver answered 2xx; failed: an error or another status (retried);
# refused: the URL is no longer allowed, or the completion is unusable (parked, not retried).
WEBHOOK_OUTCOMES = ("delivered", "failed", "refused")


def _build_labels() -> dict[str, str]:
    """The label values of `burrow_build_info`, read from the installed packages' metadata."""
    return {
        "version": _installed_version("burrow"),
        "python_version": platform.python_version(),
        "aio_pika_version": _installed_version("aio-pika"),
    }


def _installed_version(distribution: str) -> str:
    # A source tree run without installing has no metadata; the series must still exist.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(**_build_labels()).set(1)
for _kind in PUBLISH_KINDS:
    for _outcome in PUBLISH_OUTCOMES:
        MESSAGES_PUBLISHED.labels(_kind, _outcome)
RPC_LATE_REPLIES.inc(0)
for _outcome in WEBHOOK_OUTCOMES:
    WEBHOOK_DELIVERIES.labels(_outcome)
for _outcome in OUTBOX_OUTCOMES:
    OUTBOX_PUBLISHED.labels(_outcome)
for _reason in OUTBOX_PARK_REASONS:
    OUTBOX_PARKED.labels(_reason)
INBOX_DUPLICATES.inc(0)


def init_operation_labels(service: str, operations: Iterable[str]) -> None:
    """Create every known label set at zero so dashboards show zeros, not gaps."""
    HANDLER_IN_PROGRESS.labels(service)
    for reason in DEAD_LETTER_REASONS:
        DEAD_LETTERED.labels(service, reason)
    for operation in (*operations, "unknown"):
        MESSAGES_RECEIVED.labels(service, operation)
        HANDLER_DURATION.labels(service, operation)
        for outcome in Outcome:
            MESSAGES_HANDLED.labels(service, operation, outcome.value)


class WatchedLink(Protocol):
    """What the link gauges read from a link at scrape time (see `link.Link`)."""

    @property
    def name(self) -> str: ...  # pragma: no cover

    @property
    def blocked(self) -> bool: ...  # pragma: no cover


# Links are read when Prometheus scrapes, so the gauge can never lag behind the connection;
# weak references let stopped apps and their links go away without unregistering.
_watched: weakref.WeakSet[WatchedLink] = weakref.WeakSet()


def watch_link(link: WatchedLink) -> None:
    """Report `link` in `burrow_amqp_connection_blocked` and show its reconnects at zero."""
    _watched.add(link)
    name = link.name
    AMQP_RECONNECTS.labels(name)
    CONSUMERS_ATTACHED.labels(name)
    AMQP_CONNECTION_BLOCKED.labels(name).set_function(lambda: _blocked(name))


def _blocked(name: str) -> float:
    # Several links may share a name (two apps in one process): blocked if any of them is.
    return float(any(link.blocked for link in list(_watched) if link.name == name))
