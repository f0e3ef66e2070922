"""The bundled example service `calc`: a fast operation, a slow one, and one that can fail."""

from __future__ import annotations

import asyncio

from pydantic import Field

from service.codec import Model
from service.errors import InvalidArgument
from service.registry import Service

__all__ = ["calc", "AddRequest", "AddReply", "SlowSquareRequest", "SlowSquareReply"]

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


@calc.operation()
async def add(req: AddRequest) -> AddReply:
    """Add two integers (the benchmark operation)."""
    return AddReply(sum=req.a + req.b)


@calc.operation()
async def divide(req: DivideRequest) -> DivideReply:
    """Divide a by b; dividing by zero is an INVALID_ARGUMENT error."""
    if req.b == 0:
        raise InvalidArgument("division by zero", details={"field": "b"})
    return DivideReply(quotient=req.a / req.b)


@calc.operation(timeout=900)
async def slow_square(req: SlowSquareRequest) -> SlowSquareReply:
    """Square x after a delay: the operation that takes a while."""
    await asyncio.sleep(req.delay_ms / 1000)
    return SlowSquareReply(square=req.x * req.x)
