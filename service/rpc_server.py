"""The serving side: consume a service's request queue, dispatch, reply, then ack.

Per delivery: read the envelope (kind, deadline, reply_to) → middleware chain → endpoint
(codec + handler) → publish the reply or dead-letter → settle. Acks follow the reply.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog

from service import codec, metrics
from service.codec import H_DEADLINE, H_KIND, H_STATUS
from service.config import Settings
from service.errors import (
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.middleware import DEFAULT_MIDDLEWARE, Middleware, Request, Result, compose, failure
from service.registry import Context, Service
from service.topology import DIRECT_REPLY_TO, Names
from service.transport import ConsumerSpec, Link
from service.types import Delivery, Outcome, Outgoing

__all__ = ["RpcServer"]

_log = structlog.get_logger("burrow.rpc_server")
_KINDS = frozenset({"call", "cast", "submit"})
_REPLY_PREFIX = DIRECT_REPLY_TO + "."


class RpcServer:
    """Serves one `Service` from its request queue.

    Args:
        publisher: the link replies and dead letters are published on (not the consuming one).
        middleware: layers around the endpoint, outermost first.
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        publisher: Link,
        *,
        middleware: Sequence[Middleware] = DEFAULT_MIDDLEWARE,
    ) -> None:
        self.service = service
        self.settings = settings
        self.publisher = publisher
        self.names = Names(settings.namespace)
        self.queue = self.names.request_queue(service.name)
        self.dead_letter_queue = self.names.dead_letter_queue(service.name)
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._chain = compose(middleware, self._endpoint)
        metrics.init_operation_labels(
            service.name, [op.route for op in service.operations.values()]
        )

    def consumer(self) -> ConsumerSpec:
        """The consumer to attach to the request queue."""
        return ConsumerSpec(self.queue, self.on_delivery)

    async def on_delivery(self, delivery: Delivery) -> None:
        """Handle one request end to end; never raises."""
        self.in_flight += 1
        self.idle.clear()
        try:
            request = self._request(delivery)
            result = await self._chain(request)
            await self._finish(request, result)
        except Exception:  # a bug here must not kill the consumer; the broker redelivers
            _log.exception("dispatch failed; requeueing", message_id=delivery.message_id)
            await delivery.requeue()
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    def _request(self, delivery: Delivery) -> Request:
        headers = delivery.headers
        route = delivery.type or delivery.routing_key
        kind = headers.get(H_KIND)
        if kind not in _KINDS:
            kind = "call" if delivery.reply_to else "cast"
        reply_to = delivery.reply_to
        if kind != "call" or not reply_to or not reply_to.startswith(_REPLY_PREFIX):
            reply_to = None
        operation = self.service.get(route)
        timeout = (operation.timeout if operation else None) or self.settings.handler_timeout
        return Request(
            service=self.service.name,
            route=route if len(route) <= 128 else route[:128],
            operation=operation,
            delivery=delivery,
            kind=str(kind),
            deadline=_deadline(headers.get(H_DEADLINE)),
            reply_to=reply_to,
            handler_timeout=timeout,
        )

    async def _endpoint(self, request: Request) -> Result:
        delivery = request.delivery
        if request.kind == "call" and request.reply_to is None:
            # D6/D7: nobody legitimate to answer — park it, never execute, never reply.
            reason = "invalid_reply_to" if delivery.reply_to else "missing_reply_to"
            denied = PermissionDenied(
                f"reply_to must be {DIRECT_REPLY_TO}"
                if delivery.reply_to
                else "a call needs reply_to and correlation_id"
            )
            return Result(Outcome.DEAD_LETTERED, error=denied, dead_reason=reason)
        try:
            codec.check_envelope(delivery, self.settings.max_body_bytes)
        except MessageTooLarge as exc:
            return failure(request, exc, "too_large", Outcome.REJECTED)
        except InvalidArgument as exc:
            return failure(request, exc, "unsupported_content", Outcome.REJECTED)
        op = request.operation
        if op is None:
            error = NotFound(f"unknown operation {request.route!r}")
            return failure(request, error, "unknown_operation", Outcome.REJECTED)
        try:
            payload = codec.decode_model(op.request, delivery.body)
        except InvalidArgument as exc:
            reason = "malformed" if exc.details.get("reason") == "json" else "invalid"
            return failure(request, exc, reason, Outcome.REJECTED)
        if op.wants_context:
            reply = await op.handler(payload, self._context(request))
        else:
            reply = await op.handler(payload)
        if not isinstance(reply, op.reply):
            _log.error(
                "handler returned the wrong type", operation=op.route, type=type(reply).__name__
            )
            raise TypeError("reply type")
        return Result(Outcome.OK, reply=codec.encode(reply))

    def _context(self, request: Request) -> Context:
        delivery = request.delivery
        return Context(
            operation=request.route,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            deadline=request.deadline,
            redelivered=delivery.redelivered,
            headers=delivery.headers,
            log=_log.bind(operation=request.route, correlation_id=delivery.correlation_id),
        )

    async def _finish(self, request: Request, result: Result) -> None:
        delivery = request.delivery
        try:
            if result.outcome is Outcome.DEAD_LETTERED:
                await self._dead_letter(delivery, result)
            elif request.reply_to is not None and result.outcome is not Outcome.EXPIRED:
                await self._reply(request, result)
        except Unavailable as exc:
            # Could not publish the reply or dead letter: hand the message back, never drop it.
            _log.warning("publish failed; requeueing", error=exc.message, route=request.route)
            await delivery.requeue()
            return
        await delivery.ack()

    async def _reply(self, request: Request, result: Result) -> None:
        assert request.reply_to is not None
        if result.error is None:
            body, status = result.reply or b"{}", "ok"
        else:
            body, status = codec.encode(result.error.to_wire()), "error"
        message = Outgoing(
            exchange="",
            routing_key=request.reply_to,
            body=body,
            message_id=uuid.uuid4().hex,
            correlation_id=request.delivery.correlation_id,
            headers={H_STATUS: status},
            persistent=False,
        )
        try:
            # mandatory=False: RabbitMQ 3.10 returns direct reply-to publishes spuriously.
            await self.publisher.publish(message, kind="reply", mandatory=False)
        except MessageTooLarge as exc:
            error = ResourceExhausted(exc.message.replace("reply body", "the reply"))
            message.body = codec.encode(error.to_wire())
            message.headers = {H_STATUS: "error"}
            await self.publisher.publish(message, kind="reply", mandatory=False)
        except ServiceError as exc:
            if isinstance(exc, Unavailable):
                raise
            _log.warning("reply not delivered", error=exc.message)

    async def _dead_letter(self, delivery: Delivery, result: Result) -> None:
        reason = result.dead_reason or "failed"
        headers: dict[str, Any] = dict(delivery.headers)
        headers.update(
            {
                codec.H_DEAD_REASON: reason,
                codec.H_DEAD_ERROR: codec.encode(result.error.to_wire()).decode()
                if result.error
                else "",
                codec.H_ORIGINAL_EXCHANGE: delivery.exchange,
                codec.H_ORIGINAL_ROUTING_KEY: delivery.routing_key,
                "x-burrow-dead-at": int(time.time() * 1000),
            }
        )
        message = Outgoing(
            exchange=self.names.dead_letter_exchange,
            routing_key=self.dead_letter_queue,
            body=delivery.body,
            message_id=delivery.message_id or uuid.uuid4().hex,
            type=delivery.type,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            headers=headers,
            persistent=True,
            content_type=delivery.content_type or "application/octet-stream",
        )
        await self.publisher.publish(message, kind="dead_letter", mandatory=True)


def _deadline(value: object) -> float | None:
    # Hostile input: accept only a plausible integer millisecond timestamp.
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**53:
        return value / 1000.0
    return None
