"""The calling side of RPC: direct reply-to, a map of pending futures, a deadline on every call.

One long-lived reply consumer on the publishing channel; replies are matched by correlation
id only; late, duplicate and unknown replies are discarded and counted; a lost connection
fails every pending call at once with a retryable error.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from service._amqp.link import ConsumerSpec, Link
from service._observe import metrics
from service._observe.log import get_logger
from service._protocol import codec, envelope, tracing
from service._protocol.config import Settings
from service._protocol.errors import ConnectionLost, DeadlineExceeded, ServiceError, error_from_wire
from service._protocol.messages import call_request
from service._protocol.types import Delivery, new_id
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_JOB_ID,
    Names,
    PublishKind,
)

_log = get_logger("burrow.rpc_client")
T = TypeVar("T")
_OUTCOMES = frozenset(metrics.CALL_OUTCOMES)


class Awaiting(Protocol):
    """Something else waiting on the reply consumer, by correlation id: a submitted `Job`."""

    def deliver(self, delivery: Delivery) -> None:
        """Its message arrived."""

    def lost(self) -> None:
        """The reply address is gone: its message can no longer arrive."""


class RpcClient:
    """Makes calls over a `Link` whose channel also carries the direct reply-to consumer."""

    def __init__(self, link: Link, settings: Settings) -> None:
        self.link = link
        self.settings = settings
        self.names = Names(settings.namespace)
        self.pending: dict[str, asyncio.Future[Delivery]] = {}
        # Calls whose request is not confirmed yet: a loss reported meanwhile (the link may
        # notice a closed channel late) does not fail them; their publish answers for them.
        self._unsent: set[str] = set()
        self._metrics: dict[str, tuple[dict[str, Any], Any]] = {}
        # Jobs submitted from here, until their completion arrives; one nobody holds any
        # more is forgotten (its result stays in the service's store).
        self.awaiting: weakref.WeakValueDictionary[str, Awaiting] = weakref.WeakValueDictionary()
        link.add_consumer(
            ConsumerSpec(DIRECT_REPLY_TO, self._on_reply, no_ack=True, inline=self._reply)
        )
        link.on_lost(self._fail_pending)

    async def call_raw(
        self,
        route: str,
        body: bytes,
        *,
        timeout: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> bytes:
        """Call `route` with a JSON body; return the reply body or raise the remote error.

        Args:
            timeout: seconds until the deadline (default: settings.default_deadline).
        """
        return await self.call(route, body, _as_is, timeout=timeout, headers=headers)

    async def call(
        self,
        route: str,
        body: bytes,
        decode: Callable[[bytes], T],
        *,
        timeout: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> T:
        """`call_raw`, returning `decode(reply body)`: a reply it cannot decode is counted
        with the error it raises, not as `ok`.

        A `ServiceError` raised carries a note (PEP 678) with the request's ids,
        `message_id=… correlation_id=…`: what the service's log and dead letters name."""
        timeout = self.settings.default_deadline if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        started = time.perf_counter()
        label = route[:128]  # bounds the metric label only: the full route is published
        children = self._metrics.get(label)
        if children is None:
            # Every outcome of a route exists at zero from its first call: no gaps in rates.
            children = self._metrics[label] = (
                {known: metrics.RPC_CLIENT_CALLS.labels(label, known) for known in _OUTCOMES},
                metrics.RPC_CLIENT_DURATION.labels(label),
            )
        deadline_ms = int((time.time() + timeout) * 1000)
        correlation_id = new_id()
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        self._unsent.add(correlation_id)
        metrics.RPC_CLIENT_PENDING.inc()
        outcome = "ok"
        span = tracing.start_call(label)
        try:
            async with asyncio.timeout(timeout):
                await self.link.publish(
                    call_request(
                        self.names,
                        route,
                        body,
                        correlation_id=correlation_id,
                        deadline_ms=deadline_ms,
                        timeout=timeout,
                        trace=tracing.current(),
                        headers=headers,
                    ),
                    kind=PublishKind.REQUEST,
                    mandatory=True,
                    timeout=timeout,
                )
                self._unsent.discard(correlation_id)
                reply = await future
            if envelope.failed(reply.headers):
                raise error_from_wire(codec.decode_answer(reply.body))
            return decode(reply.body)
        except TimeoutError:
            outcome = "DEADLINE_EXCEEDED"
            late = DeadlineExceeded(f"no reply from {label!r} within {timeout:.3f}s")
            tag(late, message_id=correlation_id, correlation_id=correlation_id)
            raise late from None
        except ServiceError as exc:
            outcome = exc.code.value
            tag(exc, message_id=correlation_id, correlation_id=correlation_id)
            raise
        finally:
            if span is not None:
                span.end(outcome, None if outcome == "ok" else outcome)
            self._unsent.discard(correlation_id)
            if self.pending.pop(correlation_id, None) is not None:
                metrics.RPC_CLIENT_PENDING.dec()
            calls, duration = children
            calls[outcome].inc()
            duration.observe(time.perf_counter() - started)

    async def _on_reply(self, delivery: Delivery) -> None:
        self._reply(delivery)

    def _reply(self, delivery: Delivery) -> None:
        """A reply or pushed completion arrived: resolve what waits for it (never waits)."""
        future = self.pending.get(delivery.correlation_id or "")
        if future is None:
            waiter = self.awaiting.pop(delivery.correlation_id or "", None)
            if waiter is not None:
                waiter.deliver(delivery)
                return
            if H_JOB_ID in delivery.headers:
                return  # the completion of a job nobody here awaits any more: expected
        if future is None or future.done():
            metrics.RPC_LATE_REPLIES.inc()
            _log.info(
                "reply discarded: no pending call",
                correlation_id=(delivery.correlation_id or "")[:128],
            )
            return
        future.set_result(delivery)

    def _fail_pending(self, reason: BaseException) -> None:
        waiting = list(self.awaiting.values())
        self.awaiting.clear()
        for waiter in waiting:
            waiter.lost()
        sent = [f for cid, f in self.pending.items() if cid not in self._unsent and not f.done()]
        if not sent:
            return
        _log.warning("failing pending calls: connection lost", pending=len(sent))
        for future in sent:
            future.set_exception(
                ConnectionLost(
                    "connection to the broker lost while waiting for the reply; "
                    "the request may or may not have run"
                )
            )


def tag(exc: BaseException, **ids: str) -> None:
    """Note on `exc` (PEP 678) which message it is about: `message_id=… correlation_id=…`,
    once; a traceback shows it, and the CLI puts it on its `error:` line."""
    note = " ".join(f"{name}={value}" for name, value in ids.items())
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def _as_is(body: bytes) -> bytes:
    return body
