"""Serving a service: its calls, casts, submits and events, each delivery in three stages.

1. Read: `read_request` turns the envelope into a `Request` (pure; a refusal rides along).
2. Run: the middleware onion around the endpoint (checks, codec, idempotency, the handler);
   `middleware.decide` makes the outcome final.
3. Settle: `settlement.plan` says what to publish and how to settle; `_carry_out` does it,
   each publish confirmed before the ack.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from service._amqp.link import OUTBOUND_SCOPE, ConsumerSpec, Link, publish_event
from service._observe import metrics
from service._observe.log import get_logger
from service._protocol import codec, envelope, messages, tracing
from service._protocol.config import Settings
from service._protocol.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    error_from_wire,
)
from service._protocol.jobs import (
    JobRecord,
    JobState,
    owner_digest,
    valid_callback,
    valid_callback_data,
    valid_job_id,
)
from service._protocol.messages import event_message
from service._protocol.registry import Context, Operation, Service, State, Subscription
from service._protocol.types import Delivery, DeliveryCallback, Outcome
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_STATUS,
    DeadReason,
    Kind,
    Names,
    PublishKind,
    Status,
)
from service._serving.middleware import (
    DEFAULT_MIDDLEWARE,
    Middleware,
    Next,
    Request,
    Result,
    compose,
    decision_middleware,
    error_middleware,
    failure,
    message_ids,
)
from service._serving.retry import attempts, max_retries
from service._serving.settlement import Plan, Publish, Role, plan
from service._stores.base import Claim, IdempotencyStore, JobStore
from service._stores.memory import MemoryJobStore, MemoryStore

_log = get_logger("burrow.dispatcher")
_REPLY_PREFIX = DIRECT_REPLY_TO + "."
_ANSWERED = frozenset({Kind.CALL, Kind.SUBMIT, Kind.RESULT})  # may carry a reply address
_WITH_JOB = frozenset({Kind.SUBMIT, Kind.RESULT})  # carry x-job-id
_LEASE_MARGIN = 5.0  # seconds an idempotency claim outlives the handler timeout


def read_request(
    delivery: Delivery,
    service: Service,
    settings: Settings,
    names: Names,
    subscription: Subscription | None = None,
) -> Request:
    """Stage 1: what the dispatcher needs to know of a delivery, read once and pure."""
    fields = envelope.read(delivery)
    if subscription is not None:
        return Request(
            service=service.name,
            route=subscription.route,
            operation=subscription,
            delivery=delivery,
            kind=Kind.EVENT,
            deadline=fields.deadline,
            reply_to=None,
            handler_timeout=subscription.timeout or settings.handler_timeout,
            attempt=attempts(delivery.headers, names, Kind.EVENT),
            max_retries=max_retries(subscription.retries, settings),
            refusal=fields.refusal,
            trace=tracing.parse(fields.traceparent),
            envelope=fields,
        )
    route = delivery.type or delivery.routing_key
    kind = fields.kind or (Kind.CALL if delivery.reply_to else Kind.CAST)
    reply_to = delivery.reply_to
    if kind not in _ANSWERED or not reply_to or not reply_to.startswith(_REPLY_PREFIX):
        reply_to = None
    refusal = fields.refusal
    if refusal is not None and not refusal.answerable:
        reply_to = None  # the reply address itself came undecodable: nobody to answer
    job_id = valid_job_id(fields.job_id) if kind in _WITH_JOB else None
    callback = valid_callback(fields.callback) if job_id and kind == Kind.SUBMIT else None
    operation = service.get(route)
    timeout = (operation.timeout if operation else None) or settings.handler_timeout
    return Request(
        service=service.name,
        route=route,
        operation=operation,
        delivery=delivery,
        kind=kind,
        deadline=fields.deadline,
        reply_to=reply_to,
        job_id=job_id,
        callback=callback,
        callback_data=valid_callback_data(fields.callback_data) if callback else None,
        handler_timeout=timeout,
        attempt=attempts(delivery.headers, names, kind),
        max_retries=max_retries(operation.retries if operation else None, settings),
        version=fields.version,
        refusal=refusal,
        trace=tracing.parse(fields.traceparent),
        envelope=fields,
    )


class Dispatcher:
    """Serves one `Service`: its calls, casts, submits and event subscriptions.

    Args:
        publisher: the link replies, completions and dead letters go out on.
        middleware: the built-in layers around the endpoint, outermost first.
        extra: the App's inbound middleware; with the service's and each operation's, they
            run inside the built-in `error_middleware` (a raised `ServiceError` is answered)
            and outside `deadline_middleware`, outermost first.
        state: what the lifespans opened (`ctx.state`).
        store: where idempotent operations record completed keys (default: in memory).
        jobs: where submits record their jobs and results (default: in memory).
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        publisher: Link,
        *,
        middleware: Sequence[Middleware] = DEFAULT_MIDDLEWARE,
        store: IdempotencyStore | None = None,
        jobs: JobStore | None = None,
        extra: Sequence[Middleware] = (),
        state: State | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.publisher = publisher
        self.names = Names(settings.namespace)
        self.store = store or MemoryStore()
        self.jobs = jobs or MemoryJobStore()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # Deliveries being handled: the queue they came from and when the handler must be done.
        self._held: dict[Delivery, tuple[str, float]] = {}
        self.state = state or State()
        shared = [*extra, *service.middleware]
        middleware = _recording(middleware, self._record)
        self._chain = compose(_with(middleware, shared), self._endpoint)
        # Outbound layers of the service and each operation, for what handling them publishes.
        self._outbound = tuple(service.outbound)
        self._outbounds = {
            op.route: (*self._outbound, *op.outbound) for op in _handlers(service) if op.outbound
        }
        # An operation or subscription with layers of its own gets a chain of its own.
        self._chains: dict[str, Next] = {
            op.route: compose(_with(middleware, [*shared, *op.middleware]), self._endpoint)
            for op in _handlers(service)
            if op.middleware
        }
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
        await self._handle(read_request(delivery, self.service, self.settings, self.names))

    def _event_callback(self, sub: Subscription) -> DeliveryCallback:
        async def on_event(delivery: Delivery) -> None:
            await self._handle(read_request(delivery, self.service, self.settings, self.names, sub))

        return on_event

    async def _handle(self, request: Request) -> None:
        delivery = request.delivery
        self.in_flight += 1
        self.idle.clear()
        due = time.monotonic() + request.handler_timeout + self.settings.publish_timeout
        self._held[delivery] = (delivery.queue, due)
        # A message that came without a trace starts one: its log lines and answers share it.
        token = tracing.activate(request.trace or tracing.child(None))
        span = tracing.start_consumer(
            request.route,
            delivery.headers,
            kind=request.kind,
            exchange=delivery.exchange,
            routing_key=delivery.routing_key,
            queue=delivery.queue,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            body=delivery.body,
            delivery_tag=delivery.delivery_tag,
        )
        outcome: str = Outcome.DEAD_LETTERED.value
        code: str | None = "INTERNAL"  # unless it ends otherwise
        scoped = self._outbounds.get(request.route, self._outbound)
        scope = OUTBOUND_SCOPE.set(scoped) if scoped else None
        try:
            result = await self._chains.get(request.route, self._chain)(request)  # stage 2
            await self._carry_out(delivery, self._plan(request, result))  # stage 3
            outcome = result.outcome.value
            code = None if result.error is None else result.error.code.value
        except Exception:
            # A bug, not the broker: requeueing would bring the same message back for ever.
            # Park it (reason internal) and keep serving; if even that fails, reject it to the
            # queue's own dead-letter exchange.
            _log.exception(
                "dispatch failed; dead-lettering",
                service=self.service.name,
                route=request.route[:128],
                **message_ids(delivery),
            )
            await self._park_after_bug(delivery)
        finally:
            if scope is not None:
                OUTBOUND_SCOPE.reset(scope)
            if span is not None:
                span.end(outcome, code)
            tracing.deactivate(token)
            del self._held[delivery]
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    def _plan(self, request: Request, result: Result) -> Plan:
        return plan(
            request,
            result,
            names=self.names,
            version=self._version,
            retry_levels=self.settings.retry_levels,
            trace=tracing.current(),
        )

    async def _carry_out(self, delivery: Delivery, todo: Plan) -> None:
        """Publish each message of the plan with a confirm, then settle as it says."""
        for step in todo.publishes:
            try:
                await self._publish(step)
            except Unavailable as exc:
                # Could not publish: hand the message back, never drop it.
                _log.warning(
                    "publish failed; requeueing",
                    error=exc.message,
                    kind=step.kind,
                    **message_ids(delivery),
                )
                await delivery.requeue()
                return
            except ServiceError as exc:
                if step.role is Role.ANSWER:
                    # Unroutable: the caller's reply or job queue is gone; nobody is waiting.
                    route = step.message.routing_key[:128]
                    _log.info(
                        "answer not delivered",
                        route=route,
                        error=exc.message,
                        **message_ids(delivery),
                    )
                    continue
                # The DLQ or a holding queue is gone (topology damaged): requeueing would
                # loop, so reject — the broker's own dead-lettering still has a chance.
                _log.error(
                    "cannot park or retry; rejecting",
                    error=exc.message,
                    kind=step.kind,
                    **message_ids(delivery),
                )
                await delivery.reject()
                return
        await delivery.settle(todo.then)

    async def _publish(self, step: Publish) -> None:
        copy = step.role is Role.COPY  # a copy of what we received: its size was checked
        try:
            await self.publisher.publish(
                step.message, kind=step.kind, mandatory=step.mandatory, check_size=not copy
            )
        except MessageTooLarge as exc:
            if copy:
                raise
            # C5: refuse locally, answer with an error the caller can act on instead.
            error = ResourceExhausted(f"the answer is too large to send: {exc.message}")
            message = dataclasses.replace(
                step.message,
                body=codec.encode_error(error),
                headers={**step.message.headers, H_STATUS: Status.ERROR},
            )
            await self.publisher.publish(message, kind=step.kind, mandatory=step.mandatory)

    async def _park_after_bug(self, delivery: Delivery) -> None:
        if delivery.settled is not None:
            return
        letter = messages.dead_letter(
            delivery,
            self.names,
            self.service.name,
            DeadReason.INTERNAL,
            Internal("dispatch failed"),
        )
        try:
            await self.publisher.publish(
                letter, kind=PublishKind.DEAD_LETTER, mandatory=True, check_size=False
            )
        except Exception:  # last resort: never leave a delivery unsettled
            await delivery.reject()
            return
        await delivery.ack()

    async def _endpoint(self, request: Request) -> Result:
        refused = self._admit(request)
        if refused is not None:
            return refused
        op = request.operation
        assert op is not None
        if request.kind == Kind.RESULT:
            return await self._lookup(request)
        try:
            payload = codec.decode_model(op.request, request.delivery.body)
        except InvalidArgument as exc:
            reason = (
                DeadReason.MALFORMED if exc.details.get("reason") == "json" else DeadReason.INVALID
            )
            return failure(request, exc, reason, Outcome.REJECTED)
        if request.job_id is not None:
            held = await self._begin_job(request)
            if held is not None:
                return held
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
            _log.error(
                "handler returned the wrong type",
                operation=op.route,
                returned=type(reply).__name__[:128],
                **message_ids(request.delivery),
            )
            raise TypeError(f"{op.route} returned {type(reply).__name__}")
        return codec.encode(reply)

    async def _begin_job(self, request: Request) -> Result | None:
        """Record the job as running; a `Result` instead when the handler must not run: the
        job id belongs to another submit (H8), or this one already finished (a redelivery)."""
        assert request.job_id is not None
        owner = _owner(request)
        held = await self.jobs.begin(
            self.names.job_key(request.job_id),
            JobRecord(JobState.RUNNING, owner, request.route),
            self.settings.job_result_ttl + _LEASE_MARGIN,
        )
        if held is None or (held.owner == owner and not held.finished):
            return None  # ours, new or interrupted: run it
        return _in_use(request) if held.owner != owner else _from_record(held)

    async def _record(self, request: Request, call_next: Next) -> Result:
        """The layer just outside `decision_middleware`: a submit's decided outcome is
        recorded before the outer layers log and count it (a store that is away turns it
        into a retry, and they say so)."""
        result = await call_next(request)
        if request.kind == Kind.SUBMIT and request.job_id is not None:
            return await self._finish_job(request, result)
        return result

    async def _finish_job(self, request: Request, result: Result) -> Result:
        """Record a final outcome before any completion is published; the first recorded
        result is the job's, whichever copy of the submit produced it."""
        assert request.job_id is not None
        if result.outcome in (Outcome.RETRIED, Outcome.EXPIRED) or result.duplicate:
            return result
        if result.error is None:
            record = JobRecord(
                JobState.COMPLETED, _owner(request), request.route, result.reply or b"{}"
            )
        else:
            body = codec.encode_error(result.error)
            record = JobRecord(JobState.FAILED, _owner(request), request.route, body)
        try:
            held = await self.jobs.finish(
                self.names.job_key(request.job_id), record, self.settings.job_result_ttl
            )
        except Unavailable as exc:
            # Not recorded, not announced: the job runs again once the store is back.
            _log.warning(
                "job result not recorded; retrying",
                error=exc.message,
                job_id=request.job_id,
                **message_ids(request.delivery),
            )
            return Result(Outcome.RETRIED, error=exc)
        if held == record:
            return result
        return _in_use(request) if held.owner != record.owner else _from_record(held)

    async def _lookup(self, request: Request) -> Result:
        """A `result` call: the job's record as JSON, or NOT_FOUND; the handler never runs."""
        assert request.job_id is not None
        held = await self.jobs.get(self.names.job_key(request.job_id))
        if held is None or held.route != request.route:
            error = NotFound(
                f"no job {request.job_id!r} of {request.route[:128]!r}: never received, "
                "or its result expired",
                details={"reason": "unknown_job"},
            )
            return failure(request, error, DeadReason.FAILED, Outcome.ERROR)
        return Result(Outcome.OK, reply=_record_body(request.job_id, held))

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
        if version is not None and request.kind != Kind.EVENT and version not in self._accepts:
            mismatch = FailedPrecondition(
                f"contract version {version[:16]!r} is not accepted by {self.service.name}",
                details={"accepted": sorted(self._accepts), "current": self._version},
            )
            return failure(request, mismatch, DeadReason.INVALID, Outcome.REJECTED)
        try:
            codec.check_envelope(delivery, self.settings.max_body_bytes)
        except MessageTooLarge as exc:
            return failure(request, exc, DeadReason.TOO_LARGE, Outcome.REJECTED)
        except InvalidArgument as exc:
            return failure(request, exc, DeadReason.UNSUPPORTED_CONTENT, Outcome.REJECTED)
        if request.operation is None:
            route, svc = request.route[:128], self.service
            # Names compared without the "svc." every route shares (it makes any name close).
            close = difflib.get_close_matches(route.partition(".")[2], svc.operations, n=3)
            hint = " or ".join(repr(f"{svc.name}.{name}") for name in close)
            suggestion = f"; did you mean {hint}?" if hint else ""
            error = NotFound(f"unknown operation {route!r}{suggestion}")
            return failure(request, error, DeadReason.UNKNOWN_OPERATION, Outcome.REJECTED)
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
        trace = tracing.current()
        return Context(
            operation=request.route,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            deadline=request.deadline,
            redelivered=delivery.redelivered,
            headers=delivery.headers,
            log=_log.bind(
                service=self.service.name,
                operation=request.route,
                message_id=delivery.message_id or "",
                correlation_id=delivery.correlation_id or "",
                trace_id=tracing.trace_id(trace),
                span_id=tracing.span_id(trace),
            ),
            routing_key=_routing_key(request),
            emit=self._emit,
            state=self.state,
            envelope=request.envelope,
        )

    async def _emit(self, event: str, payload: BaseModel) -> None:
        model = self.service.events.get(event)
        if model is None or not isinstance(payload, model):
            raise TypeError(f"{event!r} is not declared with Service.event(...) as {type(payload)}")
        headers = messages.stamp({}, version=self._version, trace=tracing.current())
        message = event_message(self.names, event, codec.encode(payload), headers=headers)
        await publish_event(self.publisher, message)


def _routing_key(request: Request) -> str:
    """The routing key a handler sees (`ctx.routing_key`). An event that came back keyed by its
    own queue's name (a retry or a `burrow dlq replay` goes through the default exchange) shows
    the event name it was published with, its `type`, as on its first delivery."""
    delivery = request.delivery
    if request.kind == Kind.EVENT and delivery.type and delivery.routing_key == delivery.queue:
        return str(delivery.type)
    return delivery.routing_key


def _refusal(request: Request) -> Result | None:
    """D6/D7: a call or submit with nobody legitimate to answer is parked, never executed."""
    delivery = request.delivery
    if request.kind in _CALLED and (request.reply_to is None or not delivery.correlation_id):
        reason = (
            DeadReason.INVALID_REPLY_TO
            if delivery.reply_to and request.reply_to is None
            else DeadReason.MISSING_REPLY_TO
        )
        error: ServiceError = PermissionDenied(
            f"reply_to must be {DIRECT_REPLY_TO}"
            if delivery.reply_to
            else "a call needs reply_to and correlation_id"
        )
        return Result(Outcome.DEAD_LETTERED, error=error, dead_reason=reason)
    if request.kind in _WITH_JOB and request.job_id is None:
        error = InvalidArgument(
            f"a {request.kind} needs an x-job-id header of [A-Za-z0-9_-]{{1,64}}"
        )
        if request.kind == Kind.RESULT:
            return failure(request, error, DeadReason.INVALID, Outcome.REJECTED)
        return Result(Outcome.DEAD_LETTERED, error=error, dead_reason=DeadReason.INVALID)
    return None


_CALLED = frozenset({Kind.CALL, Kind.RESULT})  # must name a reply address


def _owner(request: Request) -> bytes:
    """H8: the digest that makes a delivery the job id's own submit (or a copy of it)."""
    delivery = request.delivery
    return owner_digest(
        request.route, request.callback, delivery.message_id, delivery.body, request.callback_data
    )


def _in_use(request: Request) -> Result:
    """H8: another submit holds this job id; its record must not be touched. Nobody is
    answered (the first submitter is told, not this one); the copy is parked."""
    request.job_id = request.callback = request.callback_data = request.reply_to = None
    error = FailedPrecondition("the job id is already in use by another submit")
    return Result(Outcome.DEAD_LETTERED, error=error, dead_reason=DeadReason.JOB_ID_IN_USE)


def _from_record(record: JobRecord) -> Result:
    """The answer a finished job gives again, without running anything."""
    if record.state is JobState.COMPLETED:
        return Result(Outcome.OK, reply=record.body, duplicate=True)
    error = error_from_wire(codec.decode_json(record.body))
    return Result(Outcome.ERROR, error=error, duplicate=True)


def _record_body(job_id: str, record: JobRecord) -> bytes:
    """`{"job_id", "state", "result" | "error"}`: the body of a `result` call's reply."""
    head = codec.encode({"job_id": job_id, "state": record.state.value})[:-1]
    if record.state is JobState.RUNNING:
        return head + b"}"
    field = b',"result":' if record.state is JobState.COMPLETED else b',"error":'
    return head + field + record.body + b"}"


def _handlers(service: Service) -> list[Operation[Any, Any] | Subscription]:
    return [*service.operations.values(), *service.subscriptions.values()]


def _with(builtin: Sequence[Middleware], added: Sequence[Middleware]) -> list[Middleware]:
    """`builtin` with `added` right inside `error_middleware` (at the end if it is absent)."""
    layers = list(builtin)
    at = layers.index(error_middleware) + 1 if error_middleware in layers else len(layers)
    layers[at:at] = added
    return layers


def _recording(builtin: Sequence[Middleware], record: Middleware) -> list[Middleware]:
    """`builtin` with `record` right outside `decision_middleware` (innermost if absent)."""
    layers = list(builtin)
    at = layers.index(decision_middleware) if decision_middleware in layers else len(layers)
    layers.insert(at, record)
    return layers
