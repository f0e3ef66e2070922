"""Unit tests of the handler onion: composition order, deadlines, error mapping.

Requests are built by hand around a Delivery; no broker and no dispatcher are involved.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from service._protocol import tracing
from service._protocol.errors import DeadlineExceeded, ErrorCode, Internal, InvalidArgument
from service._protocol.types import Delivery, Outcome
from service._serving.middleware import (
    Next,
    Request,
    Result,
    compose,
    deadline_middleware,
    decide,
    decision_middleware,
    error_middleware,
    failure,
    log_middleware,
)

__all__: list[str] = []


def _request(
    *, deadline: float | None = None, reply_to: str | None = "amq.rabbitmq.reply-to.x"
) -> Request:
    return Request(
        service="calc",
        route="calc.add",
        operation=None,
        delivery=Delivery(body=b"{}", routing_key="calc.add"),
        kind="call" if reply_to else "cast",
        deadline=deadline,
        reply_to=reply_to,
        handler_timeout=5.0,
    )


async def _ok(request: Request) -> Result:
    return Result(Outcome.OK, reply=b"{}")


async def test_compose_first_layer_is_outermost() -> None:
    """compose([a, b], end) runs a → b → end → b → a."""
    trace: list[str] = []

    def layer(name: str):  # type: ignore[no-untyped-def]
        async def run(request: Request, call_next: Next) -> Result:
            trace.append(f"{name}>")
            result = await call_next(request)
            trace.append(f"<{name}")
            return result

        return run

    async def endpoint(request: Request) -> Result:
        trace.append("end")
        return Result(Outcome.OK)

    chain = compose([layer("a"), layer("b"), layer("c")], endpoint)
    result = await chain(_request())
    assert result.outcome is Outcome.OK
    assert trace == ["a>", "b>", "c>", "end", "<c", "<b", "<a"]


async def test_compose_empty_is_the_endpoint() -> None:
    """With no middleware the endpoint's result comes back unchanged."""
    result = await compose([], _ok)(_request())
    assert result.reply == b"{}"


async def test_compose_layer_can_short_circuit() -> None:
    """A layer that does not call next stops the chain: inner layers and endpoint never run."""
    ran: list[str] = []

    async def stop(request: Request, call_next: Next) -> Result:
        return Result(Outcome.REJECTED)

    async def endpoint(request: Request) -> Result:
        ran.append("endpoint")
        return Result(Outcome.OK)

    assert (await compose([stop], endpoint)(_request())).outcome is Outcome.REJECTED
    assert ran == []


async def test_deadline_past_returns_expired_without_running() -> None:
    """A request whose deadline has passed is EXPIRED and its handler never runs."""
    ran: list[str] = []

    async def endpoint(request: Request) -> Result:
        ran.append("ran")
        return Result(Outcome.OK)

    result = await deadline_middleware(_request(deadline=time.time() - 1), endpoint)
    assert result.outcome is Outcome.EXPIRED
    assert result.error is None
    assert ran == []


async def test_deadline_future_runs_handler() -> None:
    """A request with time left is handled normally."""
    result = await deadline_middleware(_request(deadline=time.time() + 30), _ok)
    assert result.outcome is Outcome.OK
    assert (await deadline_middleware(_request(deadline=None), _ok)).outcome is Outcome.OK


async def test_deadline_cuts_slow_handler() -> None:
    """A handler running past the remaining time raises DeadlineExceeded, near the deadline."""
    never = asyncio.Event()

    async def slow(request: Request) -> Result:
        await never.wait()
        return Result(Outcome.OK)

    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await deadline_middleware(_request(deadline=time.time() + 0.2), slow)
    assert time.perf_counter() - started < 0.2 + 2.0


async def test_handler_timeout_bounds_handler_without_deadline() -> None:
    """Without a deadline the handler timeout still bounds the run."""
    never = asyncio.Event()

    async def slow(request: Request) -> Result:
        await never.wait()
        return Result(Outcome.OK)

    request = _request()
    request.handler_timeout = 0.1
    with pytest.raises(DeadlineExceeded):
        await deadline_middleware(request, slow)


async def test_error_middleware_hides_unknown_exception() -> None:
    """An unexpected exception becomes INTERNAL without its message; it is logged locally."""

    async def boom(request: Request) -> Result:
        raise RuntimeError("secret /etc/path")

    with capture_logs() as logs:
        result = await error_middleware(_request(), boom)
    assert result.outcome is Outcome.ERROR
    assert isinstance(result.error, Internal)
    assert result.error.code is ErrorCode.INTERNAL
    wire = str(result.error.to_wire())
    assert "secret" not in wire
    assert "/etc/path" not in wire
    assert "Traceback" not in wire
    assert result.dead_reason == "failed"
    assert any(entry["event"] == "handler raised" for entry in logs)


async def test_error_middleware_keeps_service_errors() -> None:
    """A ServiceError raised by the handler is answered as is."""
    raised = InvalidArgument("b must not be zero", details={"field": "b"})

    async def bad(request: Request) -> Result:
        raise raised

    result = await error_middleware(_request(), bad)
    assert result.outcome is Outcome.ERROR
    assert result.error is raised


async def test_error_middleware_without_caller_dead_letters() -> None:
    """With nobody to answer, a failure is decided DEAD_LETTERED with reason `failed`."""

    async def boom(request: Request) -> Result:
        raise ValueError("x")

    with capture_logs():
        result = await compose([decision_middleware, error_middleware], boom)(
            _request(reply_to=None)
        )
    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.dead_reason == "failed"
    assert isinstance(result.error, Internal)


async def test_error_middleware_maps_deadline_from_inner_layer() -> None:
    """DeadlineExceeded from the deadline layer reaches the caller as DEADLINE_EXCEEDED."""
    never = asyncio.Event()

    async def slow(request: Request) -> Result:
        await never.wait()
        return Result(Outcome.OK)

    request = _request(deadline=time.time() + 0.05)
    result = await compose([error_middleware, deadline_middleware], slow)(request)
    assert result.outcome is Outcome.ERROR
    assert isinstance(result.error, DeadlineExceeded)


def test_failure_with_and_without_caller() -> None:
    """A failure is answered to a caller as given; decided without one, it is parked."""
    error = InvalidArgument("bad")
    answered = decide(_request(), failure(_request(), error, "invalid", Outcome.REJECTED))
    assert (answered.outcome, answered.error, answered.dead_reason) == (
        Outcome.REJECTED,
        error,
        "invalid",
    )
    lone = _request(reply_to=None)
    parked = decide(lone, failure(lone, error, "invalid", Outcome.REJECTED))
    assert (parked.outcome, parked.dead_reason) == (Outcome.DEAD_LETTERED, "invalid")


async def test_handler_raised_line_carries_the_message_ids() -> None:
    """The `handler raised` line has the message, correlation, trace and span ids of the
    `handled` line beside it, and the error names the exception type and that trace id."""
    trace = tracing.child(None)
    request = _request(reply_to=None)
    request.delivery = Delivery(
        body=b"{}", routing_key="calc.add", message_id="m-1", correlation_id="c-1"
    )

    async def boom(request: Request) -> Result:
        raise KeyError("secret")

    token = tracing.activate(trace)
    try:
        chain = compose([log_middleware, decision_middleware, error_middleware], boom)
        with capture_logs() as logs:
            result = await chain(request)
    finally:
        tracing.deactivate(token)
    [raised] = [entry for entry in logs if entry["event"] == "handler raised"]
    [handled] = [entry for entry in logs if entry["event"] == "handled"]
    ids = ("message_id", "correlation_id", "trace_id", "span_id")
    assert {key: raised[key] for key in ids} == {key: handled[key] for key in ids}
    assert (raised["message_id"], raised["correlation_id"]) == ("m-1", "c-1")
    assert raised["trace_id"] == tracing.trace_id(trace)
    assert (raised["service"], raised["operation"], raised["kind"]) == ("calc", "calc.add", "cast")
    assert result.outcome is Outcome.DEAD_LETTERED
    assert isinstance(result.error, Internal)
    assert result.error.message == "the handler failed"
    assert result.error.details == {"exception": "KeyError", "trace_id": raised["trace_id"]}
    assert "secret" not in str(result.error.to_wire())
