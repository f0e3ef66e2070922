"""The calling side of RPC: direct reply-to, a map of pending futures, a deadline on every call.

One long-lived reply consumer on the publishing channel; replies are matched by correlation
id only; late, duplicate and unknown replies are discarded and counted; a lost connection
fails every pending call at once with a retryable error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from service import codec, metrics, tracing
from service.codec import H_DEADLINE, H_KIND, H_STATUS
from service.config import Settings
from service.errors import ConnectionLost, DeadlineExceeded, ServiceError, error_from_wire
from service.topology import DIRECT_REPLY_TO, Names
from service.transport import ConsumerSpec, Link
from service.types import Delivery, Outgoing, new_id

__all__ = ["RpcClient"]

_log = structlog.get_logger("burrow.rpc_client")
_OUTCOMES = frozenset(metrics.CALL_OUTCOMES)


class RpcClient:
    """Makes calls over a `Link` whose channel also carries the direct reply-to consumer."""

    def __init__(self, link: Link, settings: Settings) -> None:
        self.link = link
        self.settings = settings
        self.names = Names(settings.namespace)
        self.pending: dict[str, asyncio.Future[Delivery]] = {}
        self._metrics: dict[str, tuple[dict[str, Any], Any]] = {}
        link.consumers.append(ConsumerSpec(DIRECT_REPLY_TO, self._on_reply, no_ack=True))
        link.on_lost.append(self._fail_pending)

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
        timeout = self.settings.default_deadline if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        started = time.perf_counter()
        route = route[:128]
        children = self._metrics.get(route)
        if children is None:
            # Every outcome of a route exists at zero from its first call: no gaps in rates.
            children = self._metrics[route] = (
                {known: metrics.RPC_CLIENT_CALLS.labels(route, known) for known in _OUTCOMES},
                metrics.RPC_CLIENT_DURATION.labels(route),
            )
        deadline_ms = int((time.time() + timeout) * 1000)
        correlation_id = new_id()
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        metrics.RPC_CLIENT_PENDING.inc()
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout):
                await self.link.publish(
                    Outgoing(
                        exchange=self.names.rpc_exchange,
                        routing_key=route,
                        body=body,
                        message_id=correlation_id,
                        type=route,
                        correlation_id=correlation_id,
                        reply_to=DIRECT_REPLY_TO,
                        headers={
                            H_DEADLINE: deadline_ms,
                            H_KIND: "call",
                            tracing.HEADER: tracing.child(tracing.current()),
                            **(headers or {}),
                        },
                        expiration_ms=max(1, int(timeout * 1000)),
                        persistent=False,
                    ),
                    kind="request",
                    mandatory=True,
                    timeout=timeout,
                )
                reply = await future
            if reply.headers.get(H_STATUS) == "error":
                raise error_from_wire(codec.decode_json(reply.body))
            return reply.body
        except TimeoutError:
            outcome = "DEADLINE_EXCEEDED"
            raise DeadlineExceeded(f"no reply from {route!r} within {timeout:.3f}s") from None
        except ServiceError as exc:
            outcome = exc.code.value
            raise
        finally:
            if self.pending.pop(correlation_id, None) is not None:
                metrics.RPC_CLIENT_PENDING.dec()
            calls, duration = children
            calls[outcome].inc()
            duration.observe(time.perf_counter() - started)

    async def _on_reply(self, delivery: Delivery) -> None:
        future = self.pending.get(delivery.correlation_id or "")
        if future is None or future.done():
            metrics.RPC_LATE_REPLIES.inc()
            _log.info(
                "reply discarded: no pending call",
                correlation_id=(delivery.correlation_id or "")[:128],
            )
            return
        future.set_result(delivery)

    def _fail_pending(self, reason: BaseException) -> None:
        if not self.pending:
            return
        _log.warning("failing pending calls: connection lost", pending=len(self.pending))
        for future in self.pending.values():
            if not future.done():
                future.set_exception(
                    ConnectionLost(
                        "connection to the broker lost while waiting for the reply; "
                        "the request may or may not have run"
                    )
                )
