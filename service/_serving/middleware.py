"""The onion around every handler: log → metrics → decision → errors → deadline → endpoint.

Each layer takes the `Request` and the next callable and returns a `Result`; none does I/O
with the broker. `decide` makes the outcome final in one place; the dispatcher acts on it
(`settlement.plan`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service._observe import metrics
from service._observe.log import get_logger
from service._protocol import codec, tracing
from service._protocol.envelope import Fields, Refusal
from service._protocol.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from service._protocol.registry import Operation, Subscription
from service._protocol.types import Delivery, Outcome
from service._protocol.vocabulary import DeadReason
from service._serving import retry

_log = get_logger("burrow.handler")
_MAX_ID = 128  # ids are caller-controlled: cap them before they reach a log line


@dataclass(slots=True)
class Request:
    """One delivery on its way to a handler, with what the dispatcher learned of it."""

    service: str
    route: str
    operation: Operation[Any, Any] | Subscription | None
    delivery: Delivery
    kind: str  # call | cast | submit | result | event
    deadline: float | None  # absolute, seconds since the epoch
    reply_to: str | None  # validated direct reply-to address of a call, submit or result
    handler_timeout: float
    job_id: str | None = None  # validated job id of a submit or result
    callback: str | None = None  # validated callback routing key of a submit
    callback_data: str | None = None  # what goes with the callback (x-callback-data)
    attempt: int = 0  # retries already made (x-burrow-attempt; x-death as the fallback)
    max_retries: int = 0
    version: str | None = None  # x-contract-version as sent, coerced to text
    refusal: Refusal | None = None  # the envelope could not be used (undecodable, bad header)
    trace: str | None = None  # the valid traceparent it carried
    envelope: Fields = field(default_factory=Fields)  # every header Burrow read, as read
    started: float = field(default_factory=time.perf_counter)

    @property
    def has_caller(self) -> bool:
        """Whether an error can be answered to someone (else it is dead-lettered)."""
        return self.reply_to is not None or self.job_id is not None


@dataclass(slots=True)
class Result:
    """How handling ended: a reply body, an error, or a signal (expired)."""

    outcome: Outcome
    reply: bytes | None = None
    error: ServiceError | None = None
    dead_reason: str | None = None
    duplicate: bool = False  # answered from a store (idempotency, job); the handler did not run

    def __post_init__(self) -> None:
        if self.error is not None:
            # H5: a caught error's traceback holds every frame up to the consumer callback, and
            # those frames hold this Result: a reference cycle that keeps the delivery and its
            # body alive until a full garbage collection (32 casts of 50 MB: 1.5 GB RSS). The
            # answer and the dead letter need only the error's code, message and details.
            self.error.__traceback__ = self.error.__context__ = self.error.__cause__ = None


def message_ids(delivery: Delivery) -> dict[str, Any]:
    """The ids every log line about a message carries: its message and correlation ids (capped:
    the sender chose them) and the trace and span being handled (`tracing.current`)."""
    trace = tracing.current()
    return {
        "message_id": (delivery.message_id or "")[:_MAX_ID],
        "correlation_id": (delivery.correlation_id or "")[:_MAX_ID],
        "trace_id": tracing.trace_id(trace),
        "span_id": tracing.span_id(trace),
    }


Next = Callable[[Request], Awaitable[Result]]
Middleware = Callable[[Request, Next], Awaitable[Result]]


def compose(middleware: Sequence[Middleware], endpoint: Next) -> Next:
    """Wrap `endpoint` so that the first middleware is the outermost layer."""
    handler = endpoint
    for layer in reversed(middleware):
        handler = _bind(layer, handler)
    return handler


def _bind(layer: Middleware, inner: Next) -> Next:
    # A plain function handing back the layer's coroutine: one coroutine frame per layer.
    def call(request: Request) -> Awaitable[Result]:
        return layer(request, inner)

    return call


def failure(request: Request, error: ServiceError, reason: str, outcome: Outcome) -> Result:
    """An error result with the dead-letter reason to use if nobody can be answered;
    `decide` makes it final."""
    return Result(outcome, error=error, dead_reason=reason)


def decide(request: Request, result: Result) -> Result:
    """The final outcome of a handled message.

    A failure the retry policy takes (`retry.verdict`) is retried, or parked once its retries
    ran out; any other error with a caller is answered; one without is parked with its reason.
    An answer, a stored answer given again, and an outcome already final are left as they are.
    """
    error = result.error
    if error is None or result.duplicate or result.outcome in _FINAL:
        return result
    retried = retry.verdict(
        request.kind, error, result.dead_reason, request.attempt, request.max_retries
    )
    if retried is not None:
        return Result(retried.outcome, error=error, dead_reason=retried.dead_reason)
    if request.has_caller:
        return result
    return Result(
        Outcome.DEAD_LETTERED, error=error, dead_reason=result.dead_reason or DeadReason.FAILED
    )


async def log_middleware(request: Request, call_next: Next) -> Result:
    """One line per handled message: operation, outcome, duration and ids."""
    result = await call_next(request)
    ok = result.outcome is Outcome.OK
    if ok and not _log.is_enabled_for(logging.INFO):
        return result  # the common case at level warning: build nothing
    delivery = request.delivery
    fields: dict[str, Any] = {
        "service": request.service,
        "operation": request.route[:_MAX_ID],
        "kind": request.kind,
        "outcome": result.outcome.value,
        "duration_ms": round((time.perf_counter() - request.started) * 1000, 3),
        **message_ids(delivery),
    }
    if result.error is not None:
        fields["error_code"] = result.error.code.value
        fields["error"] = result.error.message[:300]
    if result.dead_reason is not None and result.outcome is not Outcome.OK:
        fields["reason"] = result.dead_reason
    if result.outcome is Outcome.REJECTED or result.dead_reason not in _HANDLER_FAILED:
        # Refused input: enough to find it again, never the (untrusted) body itself.
        fields.update(codec.body_fingerprint(delivery.body))
    if result.duplicate:
        fields["duplicate"] = True
    if ok:
        _log.info("handled", **fields)
    else:
        _log.warning("handled", **fields)
    return result


class _OperationMetrics:
    """The label children of one (service, operation), looked up once, not per message."""

    def __init__(self, service: str, operation: str) -> None:
        self.received = metrics.MESSAGES_RECEIVED.labels(service, operation)
        self.in_progress = metrics.HANDLER_IN_PROGRESS.labels(service)
        self.duration = metrics.HANDLER_DURATION.labels(service, operation)
        self.handled = {
            outcome: metrics.MESSAGES_HANDLED.labels(service, operation, outcome.value)
            for outcome in Outcome
        }


_operation_metrics: dict[tuple[str, str], _OperationMetrics] = {}


async def metrics_middleware(request: Request, call_next: Next) -> Result:
    """RED metrics: received, handled by outcome, duration, in progress."""
    key = (request.service, request.route if request.operation is not None else "unknown")
    children = _operation_metrics.get(key)
    if children is None:
        children = _operation_metrics[key] = _OperationMetrics(*key)
    children.received.inc()
    children.in_progress.inc()
    try:
        result = await call_next(request)
    finally:
        children.in_progress.dec()
    children.handled[result.outcome].inc()
    children.duration.observe(time.perf_counter() - request.started)
    if result.outcome is Outcome.DEAD_LETTERED and result.dead_reason is not None:
        metrics.DEAD_LETTERED.labels(request.service, result.dead_reason).inc()
    return result


async def error_middleware(request: Request, call_next: Next) -> Result:
    """Map exceptions to structured errors; unexpected ones become INTERNAL, logged here only."""
    try:
        return await call_next(request)
    except ServiceError as exc:
        return failure(request, exc, DeadReason.FAILED, Outcome.ERROR)
    except (ConnectionError, TimeoutError) as exc:
        # A dependency the handler uses is away: retryable, and says no more than that.
        error = Unavailable(f"a dependency is unavailable ({type(exc).__name__})")
        return failure(request, error, DeadReason.FAILED, Outcome.ERROR)
    except Exception as exc:
        ids = message_ids(request.delivery)
        _log.exception(
            "handler raised",
            service=request.service,
            operation=request.route[:_MAX_ID],
            kind=request.kind,
            **ids,
        )
        # The error (answered, or parked in the DLQ) names the exception's type and the trace
        # id of this line; the dead letter keeps the message id: each finds the other.
        internal = Internal.unexpected(exc, trace_id=ids["trace_id"])
        return failure(request, internal, DeadReason.FAILED, Outcome.ERROR)


async def deadline_middleware(request: Request, call_next: Next) -> Result:
    """Skip requests whose caller gave up; bound the handler by deadline and handler timeout."""
    budget = request.handler_timeout
    if request.deadline is not None:
        remaining = request.deadline - time.time()
        if remaining <= 0:
            return Result(Outcome.EXPIRED)
        budget = min(budget, remaining)
    scope = asyncio.timeout(budget)
    try:
        async with scope:
            return await call_next(request)
    except TimeoutError:
        if not scope.expired():
            raise  # the handler's own dependency timed out: error_middleware says UNAVAILABLE
        raise DeadlineExceeded(f"the handler did not finish within {budget:.3f}s") from None


async def decision_middleware(request: Request, call_next: Next) -> Result:
    """Make the outcome final with `decide`: answer, retry, park or drop."""
    return decide(request, await call_next(request))


_FINAL = frozenset({Outcome.RETRIED, Outcome.DEAD_LETTERED})
# The reasons of a failure raised while the handler ran; any other reason refused the input.
_HANDLER_FAILED = frozenset({None, DeadReason.FAILED})

DEFAULT_MIDDLEWARE: tuple[Middleware, ...] = (
    log_middleware,
    metrics_middleware,
    decision_middleware,
    error_middleware,
    deadline_middleware,
)
