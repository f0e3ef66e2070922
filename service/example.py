"""The bundled example service `calc`: a fast operation, a slow one meant for submit, one
that can fail, an event it emits (`calc.square.computed`) and a subscription to it."""

from __future__ import annotations

import asyncio
import math

from pydantic import Field

from service._protocol.codec import Model
from service._protocol.errors import InvalidArgument
from service._protocol.registry import Context, Service

calc = Service("calc", description="A calculator: the example every Burrow guide uses.")


class AddRequest(Model):
    """Two integers to add."""

    a: int
    b: int


class AddReply(Model):
    """Their sum."""

    sum: int


class DivideRequest(Model):
    """A division; `b` must not be zero."""

    a: float
    b: float


class DivideReply(Model):
    """The quotient."""

    quotient: float


class SlowSquareRequest(Model):
    """A number to square after `delay_ms` of pretend work."""

    x: int
    delay_ms: int = Field(default=2000, ge=0, le=600_000)


class SlowSquareReply(Model):
    """The square."""

    square: int


class SquareComputed(Model):
    """Event: a square was computed by slow_square."""

    x: int
    square: int


calc.event("calc.square.computed", SquareComputed)


@calc.operation()
async def add(req: AddRequest) -> AddReply:
    """Add two integers (the benchmark operation)."""
    return AddReply(sum=req.a + req.b)


@calc.operation()
async def divide(req: DivideRequest) -> DivideReply:
    """Divide a by b; dividing by zero (or a quotient beyond a double) is INVALID_ARGUMENT."""
    if req.b == 0:
        raise InvalidArgument("division by zero", details={"field": "b"})
    quotient = req.a / req.b
    if not math.isfinite(quotient):  # 1e308 / 1e-308: no double holds it, JSON cannot say inf
        raise InvalidArgument("the quotient is out of range", details={"field": "a"})
    return DivideReply(quotient=quotient)


@calc.operation(timeout=900)
async def slow_square(req: SlowSquareRequest, ctx: Context) -> SlowSquareReply:
    """Square x after a delay (meant for submit); emits `calc.square.computed`."""
    await asyncio.sleep(req.delay_ms / 1000)
    square = req.x * req.x
    await ctx.emit("calc.square.computed", SquareComputed(x=req.x, square=square))
    return SlowSquareReply(square=square)


@calc.subscribe("calc.square.computed", group="calc_audit")
async def audit_square(event: SquareComputed, ctx: Context) -> None:
    """Log every computed square (the example subscription)."""
    ctx.log.info("square computed", x=event.x, square=event.square)
