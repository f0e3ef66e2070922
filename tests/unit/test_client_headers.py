"""A caller's own message headers (`headers=`) on every face of `Client`, on the in-memory
broker: they reach the service's middleware on calls, casts, submits and events; Burrow's
protocol headers are refused by name; an argument that is no setting is an error; a failure
names the message it is about (issue 26)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service import (
    Client,
    ConfigError,
    Model,
    Next,
    NotFound,
    PermissionDenied,
    Request,
    Result,
    Service,
    Settings,
    Unroutable,
)
from service._calling.client import PROTOCOL_HEADERS, HeaderValue, check_headers
from service._protocol import vocabulary
from service.testing import InMemoryBroker
from tests.unit.conftest import ServeApp

__all__: list[str] = []

TOKEN = {"x-service-token": "secret"}


class Item(Model):
    """What the till is asked for."""

    sku: str


class Price(Model):
    """What it answers."""

    sku: str
    cents: int


class Till:
    """A service behind a token check; it records the headers of everything it handled."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        async def require_token(request: Request, call_next: Next) -> Result:
            self.seen.put_nowait((request.route, dict(request.delivery.headers)))
            if request.delivery.headers.get("x-service-token") != "secret":
                raise PermissionDenied("a valid x-service-token header is required")
            return await call_next(request)

        self.service = svc = Service("till", middleware=[require_token])
        svc.event("till.priced", Price)

        @svc.operation()
        async def price(req: Item) -> Price:
            """Price one item."""
            return Price(sku=req.sku, cents=450)

        @svc.subscribe("till.priced", group="audit")
        async def audit(event: Price) -> None:
            """Take note of a priced item."""

    async def next_headers(self) -> tuple[str, dict[str, Any]]:
        """The route and headers of the next message the till handled."""
        async with asyncio.timeout(5):
            return await self.seen.get()


@pytest.fixture
def till() -> Till:
    """A fresh till."""
    return Till()


async def test_headers_reach_the_service_from_call_cast_submit_and_emit(
    serve_app: ServeApp, till: Till
) -> None:
    """The same `headers=` travels on a call, a cast, a submit and an event, and the
    middleware reads it; without it the call is PERMISSION_DENIED."""
    _, client, _ = await serve_app(till.service)
    with pytest.raises(PermissionDenied):
        await client.call("till.price", {"sku": "tea"})
    assert (await till.next_headers())[1].get("x-service-token") is None

    assert await client.call("till.price", {"sku": "tea"}, headers=TOKEN) == {
        "sku": "tea",
        "cents": 450,
    }
    await client.cast("till.price", {"sku": "tea"}, headers=TOKEN)
    job = await client.submit("till.price", {"sku": "tea"}, headers=TOKEN)
    assert await job.result(timeout=5) == {"sku": "tea", "cents": 450}
    assert await client.emit("till.priced", {"sku": "tea", "cents": 450}, headers=TOKEN)
    kinds = []
    for _ in range(4):
        route, headers = await till.next_headers()
        assert headers["x-service-token"] == "secret", route
        kinds.append(headers.get(vocabulary.H_KIND, "event"))
    assert sorted(kinds) == ["call", "cast", "event", "submit"]


async def test_header_values_keep_their_types(serve_app: ServeApp, till: Till) -> None:
    """Text, integers, floats, booleans and bytes arrive as they were given."""
    _, client, _ = await serve_app(till.service)
    given: dict[str, HeaderValue] = {
        **TOKEN,
        "x-tenant": 7,
        "x-ratio": 0.5,
        "x-trial": True,
        "x-blob": b"\x00\x01",
    }
    await client.call("till.price", {"sku": "tea"}, headers=given)
    _, headers = await till.next_headers()
    assert {name: headers[name] for name in given} == given


@pytest.mark.parametrize(
    "name",
    ["x-burrow-kind", "X-Deadline", "traceparent", "x-contract-version", "x-burrow-anything"],
)
async def test_a_protocol_header_is_refused_on_every_face(
    serve_app: ServeApp, till: Till, name: str
) -> None:
    """A header Burrow sets itself (any `H_*` of the vocabulary, any `x-burrow-*`) is a
    ValueError naming it, on call, cast, submit and emit; nothing is published."""
    _, client, broker = await serve_app(till.service)
    before = len(broker.published)
    headers = {name: "1"}
    for attempt in (
        client.call("till.price", {"sku": "tea"}, headers=headers),
        client.cast("till.price", {"sku": "tea"}, headers=headers),
        client.submit("till.price", {"sku": "tea"}, headers=headers),
        client.emit("till.priced", {"sku": "tea", "cents": 1}, headers=headers),
    ):
        with pytest.raises(ValueError, match=name):
            await attempt
    assert len(broker.published) == before


def test_every_vocabulary_header_is_reserved() -> None:
    """The reserved set is every `H_*` value of the vocabulary."""
    spelled = {
        value.lower()
        for key, value in vars(vocabulary).items()
        if key.startswith("H_") and isinstance(value, str)
    }
    assert spelled == PROTOCOL_HEADERS
    assert {"x-deadline", "x-death", "x-job-id", "tracestate"} <= PROTOCOL_HEADERS


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"x-when": object()}, TypeError),
        ({"x-list": [1, 2]}, TypeError),
        ({"x-huge": 2**64}, TypeError),
        ({"": "empty"}, ValueError),
        ({"x" * 256: "long"}, ValueError),
    ],
    ids=["object", "list", "int-beyond-64-bits", "empty-name", "long-name"],
)
def test_headers_amqp_cannot_carry_are_refused(headers: dict[str, Any], error: type) -> None:
    """A value of another type, an int beyond 64 bits, an empty or over-long name: refused."""
    with pytest.raises(error):
        check_headers(headers)


def test_unknown_client_argument_names_the_closest_setting() -> None:
    """`Client(namspace=…)` is a ConfigError that suggests `namespace`, never the default."""
    with pytest.raises(
        ConfigError, match="'namspace' is not a Burrow setting or argument; did you mean namespace"
    ):
        Client(namspace="orders", link_factory=InMemoryBroker().link_factory)
    with pytest.raises(ConfigError, match="did you mean outbound"):
        Client(Settings(), outbond=[], link_factory=InMemoryBroker().link_factory)


def test_overrides_apply_over_given_settings() -> None:
    """`Client(settings, namespace=…)` uses the override, validated like any setting."""
    broker = InMemoryBroker()
    client = Client(Settings(prefetch=7), namespace="orders", link_factory=broker.link_factory)
    assert (client.settings.namespace, client.settings.prefetch) == ("orders", 7)
    with pytest.raises(ConfigError, match="BURROW_NAMESPACE"):
        Client(Settings(), namespace="Not Valid", link_factory=broker.link_factory)


async def test_a_failed_call_names_its_message(serve_app: ServeApp, till: Till) -> None:
    """The error of a call carries a note with its message and correlation ids; that of a
    cast or submit the broker refused, its message id."""
    _, client, broker = await serve_app(till.service)
    with pytest.raises(PermissionDenied) as refused:
        await client.call("till.price", {"sku": "tea"})
    await broker.drain()
    [request] = [m for m in broker.published if m.link == "client" and m.kind == "request"]
    assert refused.value.__notes__ == [
        f"message_id={request.message_id} correlation_id={request.correlation_id}"
    ]
    with pytest.raises(NotFound) as unknown:
        await client.call("till.nope", {}, headers=TOKEN)
    assert unknown.value.__notes__[0].startswith("message_id=")
    with pytest.raises(Unroutable) as cast:
        await client.cast("ghost.op", {})
    [lost] = [m for m in broker.published if m.routing_key == "ghost.op"]
    assert cast.value.__notes__ == [f"message_id={lost.message_id}"]
    with pytest.raises(Unroutable) as submit:
        await client.submit("ghost.op", {})
    assert submit.value.__notes__[0].startswith("message_id=")
