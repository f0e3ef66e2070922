"""Declaring a service: its operations, each once, with pydantic request and reply models.

A `Service` is pure declaration; `service.app` runs it and `service.topology` names its queues.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from pydantic import BaseModel

__all__ = ["Context", "Operation", "Service", "Handler"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)

Handler = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class Context:
    """What a handler may know about the message it is handling."""

    operation: str
    message_id: str | None
    correlation_id: str | None
    deadline: float | None  # absolute, seconds since the epoch
    redelivered: bool
    headers: dict[str, Any]
    log: structlog.typing.FilteringBoundLogger


@dataclass(slots=True)
class Operation(Generic[Req, Rep]):
    """One operation of a service: `<service>.<name>`, its models and its handler.

    Args:
        timeout: upper bound on one run of the handler, in seconds (None: the settings' default).
    """

    service: str
    name: str
    request: type[Req]
    reply: type[Rep]
    handler: Handler
    wants_context: bool
    timeout: float | None = None
    description: str = ""

    @property
    def route(self) -> str:
        """The full name, also the routing key and AMQP `type`: `calc.add`."""
        return f"{self.service}.{self.name}"


@dataclass
class Service:
    """A named set of operations.

    Example:
        calc = Service("calc")

        @calc.operation()
        async def add(req: AddRequest) -> AddReply: ...
    """

    name: str
    description: str = ""
    operations: dict[str, Operation[Any, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"service name {self.name!r} must match {_NAME.pattern}")

    def operation(
        self, name: str | None = None, *, timeout: float | None = None
    ) -> Callable[[Handler], Handler]:
        """Declare the decorated coroutine as an operation; models come from its annotations."""

        def register(handler: Handler) -> Handler:
            self.add_operation(handler, name=name, timeout=timeout)
            return handler

        return register

    def add_operation(
        self, handler: Handler, *, name: str | None = None, timeout: float | None = None
    ) -> Operation[Any, Any]:
        """Declare `handler` as an operation (the non-decorator form)."""
        op_name = name or handler.__name__
        if not _NAME.match(op_name):
            raise ValueError(f"operation name {op_name!r} must match {_NAME.pattern}")
        if op_name in self.operations:
            raise ValueError(f"operation {self.name}.{op_name} declared twice")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for {self.name}.{op_name} must be an async function")
        request, reply, wants_context = _models_of(handler)
        op: Operation[Any, Any] = Operation(
            service=self.name,
            name=op_name,
            request=request,
            reply=reply,
            handler=handler,
            wants_context=wants_context,
            timeout=timeout,
            description=inspect.getdoc(handler) or "",
        )
        self.operations[op_name] = op
        return op

    def get(self, route: str) -> Operation[Any, Any] | None:
        """The operation for a full route (`calc.add`), or None."""
        service, _, name = route.partition(".")
        return self.operations.get(name) if service == self.name else None


def _models_of(handler: Handler) -> tuple[type[BaseModel], type[BaseModel], bool]:
    hints = typing.get_type_hints(handler)
    params = list(inspect.signature(handler).parameters)
    if not params or len(params) > 2:
        raise TypeError(f"{handler.__name__} must take (request) or (request, context)")
    request = hints.get(params[0])
    reply = hints.get("return")
    for what, model in (("request", request), ("return", reply)):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{handler.__name__}: {what} annotation must be a pydantic model")
    return request, reply, len(params) == 2  # type: ignore[return-value]
