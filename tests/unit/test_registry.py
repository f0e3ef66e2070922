"""Unit tests of service declarations: models from annotations, names and handlers checked.

A mistake in a declaration must fail at import time, not when the first message arrives.
"""

from __future__ import annotations

from typing import Any

import pytest

from service import Context, Model, Service

__all__: list[str] = []


class Ping(Model):
    """A request."""

    n: int


class Pong(Model):
    """A reply."""

    n: int


def test_models_read_from_annotations() -> None:
    """The request and reply models come from the handler's annotations."""
    svc = Service("pinger")

    @svc.operation()
    async def ping(req: Ping) -> Pong:
        """Answer with the same number."""
        return Pong(n=req.n)

    op = svc.operations["ping"]
    assert (op.request, op.reply, op.wants_context) == (Ping, Pong, False)
    assert op.route == "pinger.ping"
    assert op.description == "Answer with the same number."
    assert op.handler is ping
    assert svc.get("pinger.ping") is op


def test_context_parameter_detected_and_name_timeout_kept() -> None:
    """A second parameter means the handler wants a Context; name and timeout are kept."""
    svc = Service("pinger")

    async def handler(req: Ping, ctx: Context) -> Pong:
        return Pong(n=req.n)

    op = svc.add_operation(handler, name="with_ctx", timeout=3.5)
    assert op.wants_context is True
    assert op.timeout == 3.5
    assert svc.get("pinger.with_ctx") is op


def test_get_unknown_or_other_service_is_none() -> None:
    """get returns None for another service's route or an unknown operation."""
    svc = Service("pinger")

    @svc.operation()
    async def ping(req: Ping) -> Pong:
        return Pong(n=req.n)

    assert svc.get("other.ping") is None
    assert svc.get("pinger.nope") is None
    assert svc.get("pinger") is None


@pytest.mark.parametrize("name", ["", "Calc", "1calc", "calc.add", "calc*", "a" * 64, "ca lc"])
def test_bad_service_name_rejected(name: str) -> None:
    """Service names that cannot be part of a routing key or queue name are refused."""
    with pytest.raises(ValueError, match="service name"):
        Service(name)


@pytest.mark.parametrize("name", ["Add", "add.more", "add-it", "#", "9add"])
def test_bad_operation_name_rejected(name: str) -> None:
    """Operation names with dots, wildcards, capitals or dashes are refused."""
    svc = Service("pinger")

    async def handler(req: Ping) -> Pong:
        return Pong(n=req.n)

    with pytest.raises(ValueError, match="operation name"):
        svc.add_operation(handler, name=name)


def test_duplicate_operation_rejected() -> None:
    """The same operation name twice is an error, not a silent replacement."""
    svc = Service("pinger")

    async def ping(req: Ping) -> Pong:
        return Pong(n=req.n)

    svc.add_operation(ping)
    with pytest.raises(ValueError, match="declared twice"):
        svc.add_operation(ping)


def test_non_async_handler_rejected() -> None:
    """A plain function cannot be a handler."""
    svc = Service("pinger")

    def ping(req: Ping) -> Pong:
        return Pong(n=req.n)

    with pytest.raises(TypeError, match="async"):
        svc.add_operation(ping)  # type: ignore[arg-type]


def test_non_model_request_annotation_rejected() -> None:
    """A request annotated with a non-model type is refused."""
    svc = Service("pinger")

    async def ping(req: dict[str, Any]) -> Pong:
        return Pong(n=1)

    with pytest.raises(TypeError, match="request annotation"):
        svc.add_operation(ping)


def test_non_model_return_annotation_rejected() -> None:
    """A reply annotated with a non-model type (or missing) is refused."""
    svc = Service("pinger")

    async def ping(req: Ping) -> int:
        return req.n

    async def unannotated(req: Ping):  # type: ignore[no-untyped-def]
        return Pong(n=req.n)

    with pytest.raises(TypeError, match="return annotation"):
        svc.add_operation(ping)
    with pytest.raises(TypeError, match="return annotation"):
        svc.add_operation(unannotated)


@pytest.mark.parametrize("arity", [0, 3])
def test_wrong_arity_rejected(arity: int) -> None:
    """A handler must take (request) or (request, context)."""
    svc = Service("pinger")

    async def none() -> Pong:
        return Pong(n=1)

    async def three(req: Ping, ctx: Context, extra: int) -> Pong:
        return Pong(n=req.n)

    with pytest.raises(TypeError, match="must take"):
        svc.add_operation(none if arity == 0 else three)


def test_failed_declaration_leaves_service_unchanged() -> None:
    """A refused declaration registers nothing."""
    svc = Service("pinger")

    async def ping(req: Ping) -> int:
        return 1

    with pytest.raises(TypeError):
        svc.add_operation(ping)
    assert svc.operations == {}


def test_operation_without_reply_model_is_declared_with_none() -> None:
    """`-> None` declares an operation without a reply model (for casts); a missing return
    annotation is still refused."""
    svc = Service("pinger")

    @svc.operation()
    async def note(req: Ping) -> None:
        """Record it."""

    assert svc.operations["note"].reply is None

    async def bare(req: Ping):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(TypeError, match="or None"):
        svc.add_operation(bare)
