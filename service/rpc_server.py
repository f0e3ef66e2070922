"""The serving side: consume a service's queues, dispatch, answer, then ack.

Calls arrive on the request queue, casts and submits on the commands queue, events on one
queue per subscription. Per delivery: read the envelope (kind, deadline, who to answer) →
middleware chain → endpoint (codec + handler) → reply, completion or dead letter → settle.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import structlog
from pydantic import BaseModel

from service import codec, envelope, metrics, tracing
from service.codec import H_STATUS, H_VERSION
from service.config import Settings
from service.dead_letters import DeadLetterQueue
from service.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.events import event_message, publish_event
from service.idempotency import Claim, IdempotencyStore, MemoryStore
from service.jobs import completion_messages, valid_callback, valid_job_id
from service.middleware import DEFAULT_MIDDLEWARE, Middleware, Request, Result, compose, failure
from service.registry import Context, Operation, Service, Subscription
from service.retry import attempts, retry_level, retry_message
from service.topology import DIRECT_REPLY_TO, Names
from service.transport import ConsumerSpec, Link
from service.types import Delivery, DeliveryCallback, Outcome, Outgoing, new_id

__all__ = ["RpcServer"]

_log = structlog.get_logger("burrow.rpc_server")
_REPLY_PREFIX = DIRECT_REPLY_TO + "."
_LEASE_MARGIN = 5.0  # seconds an idempotency claim outlives the handler timeout


class RpcServer:
    """Serves one `Service`: its calls, casts, submits and event subscriptions.

    Args:
        publisher: the link replies, completions and dead letters go out on.
        middleware: layers around the endpoint, outermost first.
        store: where idempotent operations record completed keys (default: in memory).
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        publisher: Link,
        *,
        middleware: Sequence[Middleware] = DEFAULT_MIDDLEWARE,
        store: IdempotencyStore | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.publisher = publisher
        self.names = Names(settings.namespace)
        self.dead_letters = DeadLetterQueue(self.names, service.name, publisher)
        self.store = store or MemoryStore()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # Deliveries being handled: the queue they came from and when the handler must be done.
        self._held: dict[Delivery, tuple[str, float]] = {}
        self._chain = compose(middleware, self._endpoint)
        self._version = str(service.major)
        self._accepts = frozenset(str(major) for major in service.accepts)
        metrics.init_operation_labels(
            service.name,
            [op.route for op in service.operations.values()]
            + [sub.route for sub in service.subscriptions.values()],
        )

    def consumers(self) -> list[ConsumerSpec]:
        """Every consumer this service needs attached."""
        specs = [
            ConsumerSpec(self.names.request_queue(self.service.name), self.on_delivery),
            ConsumerSpec(self.names.commands_queue(self.service.name), self.on_delivery),
        ]
        for sub in self.service.subscriptions.values():
            queue = self.names.subscription_queue(sub.group, sub.name)
            specs.append(ConsumerSpec(queue, self._event_callback(sub)))
        return specs

    def stuck(self) -> dict[str, int]:
        """Per queue, how many deliveries are held past their handler timeout (plus the publish
        timeout of the answer): when that reaches the prefetch, the consumer is stalled."""
        now = time.monotonic()
        found: dict[str, int] = {}
        for queue, due in self._held.values():
            if due < now:
                found[queue] = found.get(queue, 0) + 1
        return found

    async def on_delivery(self, delivery: Delivery) -> None:
        """Handle one call, cast or submit end to end; never raises."""
        request = self._request(delivery)
        await self._handle(delivery, request, envelope.text(delivery.headers.get(tracing.HEADER)))

    def _event_callback(self, sub: Subscription) -> DeliveryCallback:
        async def on_event(delivery: Delivery) -> None:
            fields = envelope.read(delivery)
            request = Request(
                service=self.service.name,
                route=sub.route,
                operation=sub,
                delivery=delivery,
                kind="event",
                deadline=fields.deadline,
                reply_to=None,
                handler_timeout=sub.timeout or self.settings.handler_timeout,
                attempt=attempts(delivery.headers, self.names),
                max_retries=_pick(sub.retries, self.settings.max_retries),
                refusal=fields.refusal,
            )
            await self._handle(delivery, request, fields.traceparent)

        return on_event

    async def _handle(
        self, delivery: Delivery, request: Request, traceparent: str | None = None
    ) -> None:
        self.in_flight += 1
        self.idle.clear()
        due = time.monotonic() + request.handler_timeout + self.settings.publish_timeout
        self._held[delivery] = (delivery.queue, due)
        token = tracing.activate(tracing.parse(traceparent))
        try:
            result = await self._chain(request)
            await self._finish(request, result)
        except Exception:
            # A bug, not the broker: requeueing would bring the same message back for ever.
            # Park it (reason internal) and keep serving; if even that fails, reject it to the
            # queue's own dead-letter exchange.
            _log.exception(
                "dispatch failed; dead-lettering",
                message_id=str(delivery.message_id or "")[:128],
                route=request.route[:128],
            )
            await self._park_after_bug(delivery)
        finally:
            tracing.deactivate(token)
            del self._held[delivery]
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _park_after_bug(self, delivery: Delivery) -> None:
        if delivery.settled is not None:
            return
        try:
            await self.dead_letters.park(delivery, "internal", Internal("dispatch failed"))
        except Exception:  # last resort: never leave a delivery unsettled
            await delivery.reject()
            return
        await delivery.ack()

    def _request(self, delivery: Delivery) -> Request:
        fields = envelope.read(delivery)
        route = delivery.type or delivery.routing_key
        kind = fields.kind or ("call" if delivery.reply_to else "cast")
        reply_to = delivery.reply_to
        if kind != "call" or not reply_to or not reply_to.startswith(_REPLY_PREFIX):
            reply_to = None
        refusal = fields.refusal
        if refusal is not None and not refusal.answerable:
            reply_to = None  # the reply address itself came undecodable: nobody to answer
        job_id = valid_job_id(fields.job_id) if kind == "submit" else None
        operation = self.service.get(route)
        timeout = (operation.timeout if operation else None) or self.settings.handler_timeout
        return Request(
            service=self.service.name,
            route=route,
            operation=operation,
            delivery=delivery,
            kind=kind,
            deadline=fields.deadline,
            reply_to=reply_to,
            job_id=job_id,
            callback=valid_callback(fields.callback) if job_id else None,
            handler_timeout=timeout,
            attempt=attempts(delivery.headers, self.names) if kind != "call" else 0,
            max_retries=_pick(operation.retries if operation else None, self.settings.max_retries),
            version=fields.version,
            refusal=refusal,
        )

    async def _endpoint(self, request: Request) -> Result:
        refused = self._admit(request)
        if refused is not None:
            return refused
        op = request.operation
        assert op is not None
        try:
            payload = codec.decode_model(op.request, request.delivery.body)
        except InvalidArgument as exc:
            reason = "malformed" if exc.details.get("reason") == "json" else "invalid"
            return failure(request, exc, reason, Outcome.REJECTED)
        if request.job_id is not None and not await self._own_job(request):
            # Another submit holds this job id: its result must not be touched. Nobody is
            # answered (the job's queue belongs to the first submitter); the copy is parked.
            request.job_id = request.callback = None
            error = FailedPrecondition("the job id is already in use by another submit")
            return Result(Outcome.DEAD_LETTERED, error=error, dead_reason="job_id_in_use")
        key = self._idempotency_key(op, payload, request.delivery) if op.idempotent else None
        if key is None:
            return Result(Outcome.OK, reply=await self._run(op, payload, request))
        claim = await self._claim(key, request)
        if claim.state == "done":
            reply = claim.answer if op.reply else None
            return Result(Outcome.OK, reply=reply, duplicate=True)
        try:
            answer = await self._run(op, payload, request)
        except BaseException:
            # Shielded: a cancelled handler (connection lost) must still give the key back.
            await asyncio.shield(self.store.release(claim, key))
            raise
        await self.store.put(key, answer or b"", self.settings.idempotency_ttl)
        return Result(Outcome.OK, reply=answer)

    async def _run(
        self, op: Operation[Any, Any] | Subscription, payload: Any, request: Request
    ) -> bytes | None:
        if op.wants_context:
            reply = await op.handler(payload, self._context(request))
        else:
            reply = await op.handler(payload)
        if op.reply is None:
            return None
        if not isinstance(reply, op.reply):
            _log.error("handler returned the wrong type", operation=op.route)
            raise TypeError(f"{op.route} returned {type(reply).__name__}")
        return codec.encode(reply)

    async def _own_job(self, request: Request) -> bool:
        """H8: the first submit of a job id owns it for the result's lifetime; a redelivered
        copy of that submit (same id, route, callback and body) is still its owner."""
        assert request.job_id is not None
        delivery = request.delivery
        digest = hashlib.sha256()
        for part in (request.route, request.callback or "", str(delivery.message_id or "")):
            digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
        digest.update(delivery.body)
        owner = digest.digest()
        key = f"{self.names.namespace}:job-owner:{request.job_id}"
        claim = await self._claim(key, request)
        if claim.state == "mine":
            await self.store.put(key, owner, self.settings.job_result_ttl + _LEASE_MARGIN)
            return True
        return claim.answer == owner

    async def _claim(self, key: str, request: Request) -> Claim:
        """Claim the key, or wait while another copy of the message holds it (bounded by the
        deadline middleware's handler timeout); the lease outlives a crashed holder's handler."""
        lease = request.handler_timeout + _LEASE_MARGIN
        pause = 0.02
        while (claim := await self.store.claim(key, lease)).state == "busy":
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
        return claim

    def _admit(self, request: Request) -> Result | None:
        """Refuse before parsing: unreadable envelope, nobody to answer, foreign version,
        envelope limits, unknown op."""
        delivery = request.delivery
        refusal = request.refusal
        if refusal is not None and not refusal.answerable:
            return failure(request, refusal.error, refusal.reason, Outcome.REJECTED)
        refused = _refusal(request)
        if refused is not None:
            return refused  # nobody legitimate to answer: parked before any other refusal
        if refusal is not None:
            return failure(request, refusal.error, refusal.reason, Outcome.REJECTED)
        version = request.version
        if version is not None and request.kind != "event" and version not in self._accepts:
            mismatch = FailedPrecondition(
                f"contract version {version[:16]!r} is not accepted by {self.service.name}",
                details={"accepted": sorted(self._accepts), "current": self._version},
            )
            return failure(request, mismatch, "invalid", Outcome.REJECTED)
        try:
            codec.check_envelope(delivery, self.settings.max_body_bytes)
        except MessageTooLarge as exc:
            return failure(request, exc, "too_large", Outcome.REJECTED)
        except InvalidArgument as exc:
            return failure(request, exc, "unsupported_content", Outcome.REJECTED)
        if request.operation is None:
            error = NotFound(f"unknown operation {request.route[:128]!r}")
            return failure(request, error, "unknown_operation", Outcome.REJECTED)
        return None

    def _idempotency_key(
        self, op: Operation[Any, Any] | Subscription, payload: Any, delivery: Delivery
    ) -> str | None:
        key = op.idempotency_key(payload) if op.idempotency_key else delivery.message_id
        if not key:
            return None
        return f"{self.names.namespace}:{op.route}:{key[:256]}"

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
            routing_key=delivery.routing_key,
            emit=self._emit,
        )

    async def _emit(self, event: str, payload: BaseModel) -> None:
        model = self.service.events.get(event)
        if model is None or not isinstance(payload, model):
            raise TypeError(f"{event!r} is not declared with Service.event(...) as {type(payload)}")
        message = event_message(
            self.names,
            event,
            codec.encode(payload),
            headers={H_VERSION: self._version, tracing.HEADER: tracing.child(tracing.current())},
        )
        await publish_event(self.publisher, message)

    async def _finish(self, request: Request, result: Result) -> None:
        delivery = request.delivery
        try:
            if result.outcome is Outcome.RETRIED:
                level = retry_level(request.attempt, self.settings.retry_levels)
                message = retry_message(delivery, self.names, level)
                await self.publisher.publish(
                    message, kind="retry", mandatory=True, check_size=False
                )
            elif result.outcome is Outcome.DEAD_LETTERED and self._broker_parks(request, result):
                # H5: a body over the limit is not copied (a re-publish holds two or three more
                # bodies per delivery): the queue's own dead-letter exchange moves it, whole,
                # into the DLQ (x-death reason `rejected`); the `handled` log line and
                # burrow_dead_lettered_total{reason="too_large"} say why.
                await delivery.reject()
                return
            elif result.outcome is Outcome.DEAD_LETTERED:
                await self.dead_letters.park(delivery, result.dead_reason or "failed", result.error)
                if request.job_id is not None:
                    await self._complete(request, result)  # the submitter learns it failed
            elif result.outcome is not Outcome.EXPIRED:
                if request.reply_to is not None:
                    await self._reply(request, result)
                elif request.job_id is not None:
                    await self._complete(request, result)
        except Unavailable as exc:
            # Could not publish the answer or dead letter: hand the message back, never drop it.
            _log.warning("publish failed; requeueing", error=exc.message, route=request.route)
            await delivery.requeue()
            return
        except ServiceError as exc:
            # The DLQ or a holding queue is gone (topology damaged): requeueing would loop, so
            # reject — the broker's own dead-lettering still has a chance to keep it.
            _log.error("cannot park or retry; rejecting", error=exc.message, route=request.route)
            await delivery.reject()
            return
        await delivery.ack()

    def _broker_parks(self, request: Request, result: Result) -> bool:
        """Whether the broker dead-letters this refusal itself: a body over the limit, from a
        queue with a dead-letter exchange (every service queue but the request queue)."""
        return (
            result.dead_reason == "too_large"
            and request.delivery.queue != self.names.request_queue(self.service.name)
        )

    async def _reply(self, request: Request, result: Result) -> None:
        assert request.reply_to is not None
        body, status = _answer(result)
        message = Outgoing(
            exchange="",
            routing_key=request.reply_to,
            body=body,
            message_id=new_id(),
            correlation_id=request.delivery.correlation_id,
            headers={
                H_STATUS: status,
                H_VERSION: self._version,
                tracing.HEADER: tracing.child(tracing.current()),
            },
            persistent=False,
        )
        # mandatory=False: RabbitMQ 3.10 returns direct reply-to publishes spuriously.
        await self._publish_answer(message, kind="reply", mandatory=False)

    async def _complete(self, request: Request, result: Result) -> None:
        assert request.job_id is not None
        body, status = _answer(result)
        first, *rest = completion_messages(
            self.names,
            request.route,
            request.job_id,
            body,
            ok=status == "ok",
            callback=request.callback,
            version=self._version,
        )
        await self._publish_answer(first, kind="completion", mandatory=True)
        for message in rest:
            await self._publish_answer(message, kind="completion", mandatory=False)

    async def _publish_answer(self, message: Outgoing, *, kind: str, mandatory: bool) -> None:
        try:
            await self.publisher.publish(message, kind=kind, mandatory=mandatory)
        except MessageTooLarge as exc:
            # C5: refuse locally, answer with an error the caller can act on instead.
            error = ResourceExhausted(f"the answer is too large to send: {exc.message}")
            message.body = codec.encode_error(error)
            message.headers = {**message.headers, H_STATUS: "error"}
            await self._publish_answer(message, kind=kind, mandatory=mandatory)
        except ServiceError as exc:
            if isinstance(exc, Unavailable):
                raise
            # Unroutable: the caller's reply or job queue is gone; nobody is waiting.
            _log.info("answer not delivered", route=message.routing_key[:128], error=exc.message)


def _refusal(request: Request) -> Result | None:
    """D6/D7: a call or submit with nobody legitimate to answer is parked, never executed."""
    delivery = request.delivery
    if request.kind == "call" and (request.reply_to is None or not delivery.correlation_id):
        reason = (
            "invalid_reply_to"
            if delivery.reply_to and request.reply_to is None
            else "missing_reply_to"
        )
        error: ServiceError = PermissionDenied(
            f"reply_to must be {DIRECT_REPLY_TO}"
            if delivery.reply_to
            else "a call needs reply_to and correlation_id"
        )
        return Result(Outcome.DEAD_LETTERED, error=error, dead_reason=reason)
    if request.kind == "submit" and request.job_id is None:
        error = InvalidArgument("a submit needs an x-job-id header of [A-Za-z0-9_-]{1,64}")
        return Result(Outcome.DEAD_LETTERED, error=error, dead_reason="invalid")
    return None


def _answer(result: Result) -> tuple[bytes, str]:
    if result.error is None:
        return result.reply or b"{}", "ok"
    return codec.encode_error(result.error), "error"


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value
