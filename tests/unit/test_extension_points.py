"""Extension points on the in-memory broker: inbound middleware (App, Service, operation),
outbound middleware (App and Client) and lifespans reached through `ctx.state`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from service import (
    Context,
    Middleware,
    Model,
    Next,
    Outbound,
    PermissionDenied,
    Publishing,
    PublishNext,
    Request,
    Result,
    Service,
    State,
)
from service.testing import serve

__all__: list[str] = []


class Hello(Model):
    """Who to greet."""

    name: str


class Greeting(Model):
    """The greeting."""

    text: str


async def require_token(request: Request, call_next: Next) -> Result:
    """Inbound: refuse a message without `authorization: secret` (PERMISSION_DENIED)."""
    if request.delivery.headers.get("authorization") != "secret":
        raise PermissionDenied("a valid authorization header is required")
    return await call_next(request)


async def add_tenant(publishing: Publishing, call_next: PublishNext) -> None:
    """Outbound: stamp every publish with the tenant."""
    publishing.message.headers["x-tenant"] = "acme"
    await call_next(publishing)


async def sign(publishing: Publishing, call_next: PublishNext) -> None:
    """Outbound (client side): the token the service's middleware checks."""
    publishing.message.headers["authorization"] = "secret"
    await call_next(publishing)


def greeter(runs: list[str]) -> Service:
    """`greeter.hello`, which records who it greeted."""
    svc = Service("greeter")

    @svc.operation()
    async def hello(req: Hello) -> Greeting:
        """Greet."""
        runs.append(req.name)
        return Greeting(text=f"hello {req.name}")

    return svc


async def test_inbound_middleware_refuses_unauthenticated_calls() -> None:
    """An App middleware that raises PermissionDenied answers PERMISSION_DENIED; the handler
    runs only for a call that carries the token."""
    runs: list[str] = []
    async with serve(greeter(runs), middleware=[require_token]) as (client, _):
        with pytest.raises(PermissionDenied, match="authorization"):
            await client.call("greeter.hello", {"name": "eve"})
    assert runs == []
    async with serve(greeter(runs), middleware=[require_token]) as served:
        served.client.link.use(sign)
        assert await served.client.call("greeter.hello", {"name": "bob"}) == {"text": "hello bob"}
    assert runs == ["bob"]


async def test_layers_run_app_then_service_then_operation() -> None:
    """App, Service and operation middleware wrap the handler in that order, outermost first;
    an operation's own layer runs for it only."""
    order: list[str] = []

    def recording(name: str) -> Middleware:
        async def layer(request: Request, call_next: Next) -> Result:
            order.append(f"{name}:{request.route}")
            return await call_next(request)

        return layer

    svc = Service("shop", middleware=[recording("service")])

    @svc.operation(middleware=[recording("operation")])
    async def buy(req: Hello) -> Greeting:
        """With a layer of its own."""
        order.append("handler")
        return Greeting(text=req.name)

    @svc.operation()
    async def look(req: Hello) -> Greeting:
        """Without."""
        order.append("handler")
        return Greeting(text=req.name)

    async with serve(svc, middleware=[recording("app")]) as (client, _):
        await client.call("shop.buy", {"name": "a"})
        await client.call("shop.look", {"name": "b"})
    assert order == [
        "app:shop.buy",
        "service:shop.buy",
        "operation:shop.buy",
        "handler",
        "app:shop.look",
        "service:shop.look",
        "handler",
    ]


async def test_outbound_middleware_sees_every_publish() -> None:
    """An App outbound layer stamps replies, completions and events; a Client one stamps the
    requests it sends."""
    runs: list[str] = []
    async with serve(greeter(runs), outbound=[add_tenant]) as (client, broker):
        client.link.use(sign)
        await client.call("greeter.hello", {"name": "a"})
        job = await client.submit("greeter.hello", {"name": "b"})
        await job.result(timeout=5)
        await broker.drain()
    assert broker is not None
    from_app = [m for m in broker.published if m.link != "client"]
    assert {m.kind for m in from_app} >= {"reply", "completion"}
    assert all(m.headers.get("x-tenant") == "acme" for m in from_app)
    from_client = [m for m in broker.published if m.link == "client"]
    assert from_client
    assert all(m.headers.get("authorization") == "secret" for m in from_client)


async def test_lifespans_open_once_serve_handlers_and_close_after_in_flight_work() -> None:
    """The App's and the Service's lifespans open before the first message, in that order; a
    handler reaches the resource through ctx.state; they close, in reverse, only after the
    message in flight at stop has finished."""
    log: list[str] = []
    gate = asyncio.Event()
    entered = asyncio.Event()

    @asynccontextmanager
    async def app_lifespan(state: State) -> AsyncIterator[None]:
        log.append("app open")
        state.pool = ["conn-1"]
        yield
        log.append("app close")

    @asynccontextmanager
    async def service_lifespan(state: State) -> AsyncIterator[None]:
        log.append("service open")
        state.greeting = "hi"
        yield
        log.append("service close")

    svc = Service("slow", lifespan=service_lifespan)

    @svc.operation()
    async def wait(req: Hello, ctx: Context) -> Greeting:
        """Use both resources, after the gate opens."""
        pool = ctx.state.get("pool", list)
        entered.set()
        await gate.wait()
        log.append("handled")
        return Greeting(text=f"{ctx.state.greeting} {req.name} via {pool[0]}")

    async with serve(svc, lifespan=app_lifespan) as served:
        assert log == ["app open", "service open"]
        call = asyncio.ensure_future(served.client.rpc.call_raw("slow.wait", b'{"name":"x"}'))
        await entered.wait()
        stopping = asyncio.ensure_future(served.app.stop())
        await asyncio.sleep(0.05)
        assert "service close" not in log  # in flight: nothing closed yet
        gate.set()
        await stopping
        assert await call == b'{"text":"hi x via conn-1"}'
    assert log == ["app open", "service open", "handled", "service close", "app close"]


def test_state_says_what_is_missing_and_checks_types() -> None:
    """state.<name> that no lifespan set names it; get() checks the type it promises."""
    state = State()
    state.pool = "not a list"
    with pytest.raises(AttributeError, match="nothing opened 'db'"):
        _ = state.db
    with pytest.raises(TypeError, match="not a list"):
        state.get("pool", list)


async def test_service_and_operation_outbound_wrap_what_handling_publishes() -> None:
    """A Service's outbound layers see what handling its messages publishes (the reply here),
    inside the App's; an operation's own layer runs for that operation only, innermost."""
    order: list[str] = []

    def stamping(name: str) -> Outbound:
        async def layer(publishing: Publishing, call_next: PublishNext) -> None:
            if publishing.kind == "reply":
                order.append(name)
                publishing.message.headers[f"x-{name}"] = "1"
            await call_next(publishing)

        return layer

    svc = Service("desk", outbound=[stamping("service")])

    @svc.operation(outbound=[stamping("operation")])
    async def sign(req: Hello) -> Greeting:
        """With a layer of its own."""
        return Greeting(text=req.name)

    @svc.operation()
    async def stamp(req: Hello) -> Greeting:
        """Without."""
        return Greeting(text=req.name)

    async with serve(svc, outbound=[stamping("app")]) as (client, broker):
        await client.call("desk.sign", {"name": "a"})
        await client.call("desk.stamp", {"name": "b"})
        await client.cast("desk.stamp", {"name": "c"})  # answered by nothing: no reply stamped
    assert order == ["app", "service", "operation", "app", "service"]
    assert broker is not None
    replies = [m.headers for m in broker.published if m.kind == "reply"]
    assert [
        sorted(k for k in h if k in ("x-app", "x-service", "x-operation")) for h in replies
    ] == [
        ["x-app", "x-operation", "x-service"],
        ["x-app", "x-service"],
    ]
