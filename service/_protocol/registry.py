"""Declaring a service: its operations, each once, with pydantic request and reply models
(or no reply model: `-> None`, for an operation that only answers "done").

A `Service` is pure declaration; `service._runtime.app` runs it and `service._protocol.topology`
names its queues.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from pydantic import BaseModel

from service._protocol.envelope import Fields
from service._protocol.vocabulary import is_event_name, is_topic_pattern

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)

Handler = Callable[..., Awaitable[Any]]
Emit = Callable[[str, BaseModel], Awaitable[None]]
IdempotencyKey = Callable[[Any], str]
# An inbound middleware, `service.Middleware` (typed there; this module is below it).
Layer = Callable[[Any, Any], Awaitable[Any]]
T = TypeVar("T")


class State:
    """What the lifespans opened, shared by every handler of an `App` (`ctx.state`).

    Example:
        @asynccontextmanager
        async def lifespan(state: State) -> AsyncIterator[None]:
            state.db = await open_pool()
            yield
            await state.db.close()
    """

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"nothing opened {name!r}: set it in a lifespan (state.{name} = …)")

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # declared so that type checkers allow it

    def get(self, name: str, kind: type[T]) -> T:
        """`state.<name>`, checked to be a `kind`: the typed way to reach a resource."""
        value = getattr(self, name)
        if not isinstance(value, kind):
            raise TypeError(f"state.{name} is a {type(value).__name__}, not a {kind.__name__}")
        return value


# Opened at start (before the first message), closed at stop (after the in-flight ones).
Lifespan = Callable[[State], AbstractAsyncContextManager[Any]]


async def _no_emit(event: str, payload: BaseModel) -> None:
    raise RuntimeError("emit is only available while a service is running")


# The inbox transaction's connection while a handler runs under `Inbox` (`Context.db`).
TRANSACTION: ContextVar[Any] = ContextVar("burrow_transaction", default=None)


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
    routing_key: str = ""
    emit: Emit = _no_emit  # publish a domain event: await ctx.emit("orders.created", model)
    state: State = field(default_factory=State)  # what the lifespans opened
    envelope: Fields = field(default_factory=Fields)  # Burrow's headers, read and coerced

    @property
    def db(self) -> Any:
        """The connection of the inbox transaction this handler runs in (asyncpg's; see
        `service.Inbox`): its writes commit with the message id, before the ack. None when the
        handler runs under no `Inbox`."""
        return TRANSACTION.get()


@dataclass(slots=True)
class Operation(Generic[Req, Rep]):
    """One operation of a service: `<service>.<name>`, its models and its handler.

    Args:
        reply: the reply model; None for a handler annotated `-> None` (a call is answered
            `{}`, a submit completes with `{}`: docs/protocol.md §5.2).
        timeout: upper bound on one run of the handler, in seconds (None: the settings' default).
    """

    service: str
    name: str
    request: type[Req]
    reply: type[Rep] | None
    handler: Handler
    wants_context: bool
    timeout: float | None = None
    description: str = ""
    major: int = 1  # the service's contract major version when declared
    retries: int | None = None  # None: settings.max_retries (casts and submits only)
    idempotent: bool = False
    idempotency_key: IdempotencyKey | None = None  # default: the message id
    middleware: tuple[Layer, ...] = ()  # inbound, around this operation only (innermost)
    outbound: tuple[Layer, ...] = ()  # around what is published while handling it (innermost)

    @property
    def route(self) -> str:
        """The full name, also the routing key and AMQP `type`: `calc.add`."""
        return f"{self.service}.{self.name}"


@dataclass(slots=True)
class Subscription:
    """A handler for events whose routing key matches `pattern`.

    Instances of one `group` compete for the events; each group gets every event.
    """

    service: str
    name: str
    pattern: str
    group: str
    request: type[BaseModel]
    handler: Handler
    wants_context: bool
    timeout: float | None = None
    description: str = ""
    reply: None = None
    retries: int | None = None
    idempotent: bool = False
    idempotency_key: IdempotencyKey | None = None
    middleware: tuple[Layer, ...] = ()  # inbound, around this subscription only (innermost)
    outbound: tuple[Layer, ...] = ()  # around what is published while handling it (innermost)

    @property
    def route(self) -> str:
        """Metric and log label: `<service>.<subscription>` (event keys may be unbounded)."""
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
    version: str = "1.0.0"
    accepts: tuple[int, ...] = ()
    operations: dict[str, Operation[Any, Any]] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    events: dict[str, type[BaseModel]] = field(default_factory=dict)
    middleware: Sequence[Layer] = ()  # inbound, around every message of this service
    outbound: Sequence[Layer] = ()  # around what it publishes while handling (`link.Outbound`)
    lifespan: Lifespan | None = None  # opened after the App's, closed before it

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"service name {self.name!r} must match {_NAME.pattern}")
        if not _VERSION.match(self.version):
            raise ValueError(f"version {self.version!r} must be MAJOR.MINOR.PATCH")
        if not self.accepts:
            self.accepts = (self.major,)

    @property
    def major(self) -> int:
        """The contract's major version, carried in the `x-contract-version` header."""
        return int(self.version.split(".", 1)[0])

    def event(self, name: str, model: type[BaseModel]) -> None:
        """Declare an event this service emits (`ctx.emit` refuses undeclared ones)."""
        if not is_event_name(name):
            raise ValueError(f"{name!r} is not an event name (dot-separated words)")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"event {name}: the model must be a pydantic model")
        self.events[name] = model

    def operation(
        self,
        name: str | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        idempotent: bool = False,
        idempotency_key: IdempotencyKey | None = None,
        middleware: Sequence[Layer] = (),
        outbound: Sequence[Layer] = (),
    ) -> Callable[[Handler], Handler]:
        """Declare the decorated coroutine as an operation; models come from its annotations.

        Args:
            timeout: bound on one handler run, seconds.
            retries: retries of a retryable failure for casts and submits (calls answer at once).
            idempotent: run the handler once per key; duplicates get the stored reply.
            idempotency_key: derive the key from the request (default: the message id).
            middleware: inbound layers around this operation only (`service.Middleware`).
            outbound: layers around what is published while it is handled (`service.Outbound`).
        """

        def register(handler: Handler) -> Handler:
            self.add_operation(
                handler,
                name=name,
                timeout=timeout,
                retries=retries,
                idempotent=idempotent or idempotency_key is not None,
                idempotency_key=idempotency_key,
                middleware=middleware,
                outbound=outbound,
            )
            return handler

        return register

    def add_operation(
        self,
        handler: Handler,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        idempotent: bool = False,
        idempotency_key: IdempotencyKey | None = None,
        middleware: Sequence[Layer] = (),
        outbound: Sequence[Layer] = (),
    ) -> Operation[Any, Any]:
        """Declare `handler` as an operation (the non-decorator form)."""
        op_name = name or handler.__name__
        self._check_new("operation", op_name, self.operations, handler)
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
            major=self.major,
            retries=retries,
            idempotent=idempotent,
            idempotency_key=idempotency_key,
            middleware=tuple(middleware),
            outbound=tuple(outbound),
        )
        self.operations[op_name] = op
        return op

    def subscribe(
        self,
        pattern: str,
        *,
        group: str | None = None,
        name: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        idempotent: bool = False,
        idempotency_key: IdempotencyKey | None = None,
        middleware: Sequence[Layer] = (),
        outbound: Sequence[Layer] = (),
    ) -> Callable[[Handler], Handler]:
        """Handle events matching `pattern` (`orders.*.created`, `#`); the model is annotated.

        Args:
            group: competing-consumer group (default: the service name).
            name: the subscription's name (default: the function name).
            retries: retries of a retryable failure before dead-lettering.
            idempotent: handle each event once per key (default key: the message id).
            middleware: inbound layers around this subscription only (`service.Middleware`).
            outbound: layers around what is published while it is handled (`service.Outbound`).
        """

        def register(handler: Handler) -> Handler:
            sub_name = name or handler.__name__
            sub_group = group or self.name
            self._check_new("subscription", sub_name, self.subscriptions, handler)
            if not _NAME.match(sub_group):
                raise ValueError(f"group name {sub_group!r} must match {_NAME.pattern}")
            if not is_topic_pattern(pattern):
                raise ValueError(f"{pattern!r} is not a topic pattern")
            event, _, wants_context = _models_of(handler, returns=False)
            self.subscriptions[sub_name] = Subscription(
                service=self.name,
                name=sub_name,
                pattern=pattern,
                group=sub_group,
                request=event,
                handler=handler,
                wants_context=wants_context,
                timeout=timeout,
                description=inspect.getdoc(handler) or "",
                retries=retries,
                idempotent=idempotent or idempotency_key is not None,
                idempotency_key=idempotency_key,
                middleware=tuple(middleware),
                outbound=tuple(outbound),
            )
            return handler

        return register

    def _check_new(self, what: str, name: str, taken: dict[str, Any], handler: Handler) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{what} name {name!r} must match {_NAME.pattern}")
        if name in taken:
            raise ValueError(f"{what} {self.name}.{name} declared twice")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for {self.name}.{name} must be an async function")

    def get(self, route: str) -> Operation[Any, Any] | None:
        """The operation for a full route (`calc.add`), or None."""
        service, _, name = route.partition(".")
        return self.operations.get(name) if service == self.name else None


def _models_of(
    handler: Handler, *, returns: bool = True
) -> tuple[type[BaseModel], type[BaseModel] | None, bool]:
    """The request model, the reply model (None for `-> None`) and whether the handler takes
    a context. An operation's return annotation is a pydantic model or `None`; an event
    handler's is `None` or absent."""
    hints = typing.get_type_hints(handler)
    params = list(inspect.signature(handler).parameters)
    if not params or len(params) > 2:
        raise TypeError(f"{handler.__name__} must take (request) or (request, context)")
    request = hints.get(params[0])
    if not _is_model(request):
        raise TypeError(f"{handler.__name__}: request annotation must be a pydantic model")
    reply = hints.get("return")
    if not returns:
        if reply not in (None, type(None)):
            raise TypeError(f"{handler.__name__}: an event handler returns None")
        return request, None, len(params) == 2
    if reply is type(None):  # `-> None`: no reply model
        return request, None, len(params) == 2
    if not _is_model(reply):
        raise TypeError(
            f"{handler.__name__}: return annotation must be a pydantic model, or None for an "
            "operation without a reply"
        )
    return request, reply, len(params) == 2


def _is_model(annotation: object) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
