"""The gateway on the in-memory broker: the request headers BURROW_GATEWAY_FORWARD_HEADERS
names become message headers of calls and submits (the gateway's own and the protocol's never
can), and an operation of a served service deployed after the gateway started is served
(issue 26)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from service import (
    App,
    ConfigError,
    Model,
    Next,
    PermissionDenied,
    Request,
    Result,
    Service,
    Settings,
)
from service.gateway._server import Gateway
from service.testing import InMemoryBroker

__all__: list[str] = []

TOKEN = "x-service-token"


class Item(Model):
    """What the till is asked for."""

    sku: str


class Price(Model):
    """What it answers."""

    sku: str
    cents: int


def till(*, later: bool, seen: asyncio.Queue[dict[str, Any]] | None = None) -> Service:
    """The till service: `price`, and with `later` the `discount` deployed since; it refuses
    a message without the token and records the headers of every message it gets."""

    async def require_token(request: Request, call_next: Next) -> Result:
        if seen is not None:
            seen.put_nowait(dict(request.delivery.headers))
        if request.delivery.headers.get(TOKEN) != "secret":
            raise PermissionDenied(f"a valid {TOKEN} header is required")
        return await call_next(request)

    svc = Service("till", middleware=[require_token])

    @svc.operation()
    async def price(req: Item) -> Price:
        """Price one item."""
        return Price(sku=req.sku, cents=450)

    if later:

        @svc.operation()
        async def discount(req: Item) -> Price:
            """Price one item, less ten percent."""
            return Price(sku=req.sku, cents=405)

    return svc


Start = Callable[..., Awaitable["TestClient[Any, Any]"]]


@pytest.fixture
async def start(settings: Settings) -> AsyncIterator[Start]:
    """Run the till of today on a fresh in-memory broker, and a gateway (no auth) built with
    the code of `declared` in front of it; an HTTP test client on the gateway."""
    broker = InMemoryBroker()
    running: list[Any] = []

    async def begin(declared: Service, serving: Service, **overrides: Any) -> TestClient[Any, Any]:
        app = App(serving, settings=settings, http=False, link_factory=broker.link_factory)
        await app.start()
        running.append(app)
        await app.wait_ready(5)
        update = {"gateway_auth": "none", **overrides}
        gateway = Gateway(
            declared, settings=settings.model_copy(update=update), link_factory=broker.link_factory
        )
        await gateway.client.start()
        running.append(gateway.client)
        http = TestClient(TestServer(gateway.make_app()))
        await http.start_server()
        running.append(http)
        return http

    yield begin
    for thing in reversed(running):
        if isinstance(thing, TestClient):
            await thing.close()
        elif isinstance(thing, App):
            await thing.stop()
        else:
            await thing.close()


async def test_listed_headers_reach_the_service_on_calls_and_submits(start: Start) -> None:
    """With x-service-token listed, the header reaches the service's middleware on a call and
    on a submit (lower-cased name, text value); unlisted headers and the gateway's key do not.
    Without it the call is 403."""
    seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    svc = till(later=False, seen=seen)
    http = await start(svc, svc, gateway_forward_headers="X-Service-Token")

    refused = await http.post("/v1/till/price", json={"sku": "tea"})
    assert refused.status == 403
    assert (await refused.json())["code"] == "PERMISSION_DENIED"

    sent = {"X-Service-Token": "secret", "X-Other": "no", "Authorization": "Bearer k"}
    called = await http.post("/v1/till/price", json={"sku": "tea"}, headers=sent)
    assert (called.status, await called.json()) == (200, {"sku": "tea", "cents": 450})
    submitted = await http.post(
        "/v1/till/price",
        json={"sku": "tea"},
        headers={**sent, "Prefer": "respond-async, wait=5"},
    )
    assert (submitted.status, await submitted.json()) == (200, {"sku": "tea", "cents": 450})

    for _ in range(3):
        async with asyncio.timeout(5):
            headers = await seen.get()
        assert "x-other" not in headers
        assert "authorization" not in {name.lower() for name in headers}
    assert headers[TOKEN] == "secret"


@pytest.mark.parametrize(
    ("listed", "why"),
    [
        ("Authorization", "API key header"),
        ("x-api-key", "API key header"),
        ("Connection", "hop-by-hop"),
        ("Transfer-Encoding", "hop-by-hop"),
        ("Content-Length", "framing"),
        ("Host", "framing"),
        ("Prefer", "the gateway's own"),
        ("Burrow-Callback-Url", "callback header"),
        ("x-burrow-kind", "protocol headers"),
        ("x-deadline", "protocol headers"),
        ("x-burrow-whatever", "protocol headers"),
        ("traceparent", "trace context"),
    ],
)
def test_headers_never_forwarded_are_a_config_error_that_says_why(
    settings: Settings, listed: str, why: str
) -> None:
    """Naming a header that is never forwarded stops the gateway at start, saying why."""
    update = {"gateway_auth": "none", "gateway_forward_headers": f"x-fine, {listed}"}
    with pytest.raises(ConfigError, match="BURROW_GATEWAY_FORWARD_HEADERS") as caught:
        Gateway(
            till(later=False),
            settings=settings.model_copy(update=update),
            link_factory=InMemoryBroker().link_factory,
        )
    assert f"{listed.lower()} is never forwarded" in str(caught.value)
    assert why in str(caught.value)


def test_forwarded_headers_are_documented_and_allowed_by_cors(settings: Settings) -> None:
    """Each forwarded header is an optional header parameter of every operation's path in
    /openapi.json, and a CORS preflight may ask for it."""
    update = {
        "gateway_auth": "none",
        "gateway_forward_headers": "x-service-token",
        "gateway_cors_origins": "https://app.example",
    }
    gateway = Gateway(
        till(later=False),
        settings=settings.model_copy(update=update),
        link_factory=InMemoryBroker().link_factory,
    )
    document = json.loads(gateway.document)
    parameters = document["paths"]["/v1/till/price"]["post"]["parameters"]
    assert {"$ref": "#/components/parameters/Forwarded_x-service-token"} in parameters
    parameter = document["components"]["parameters"]["Forwarded_x-service-token"]
    assert (parameter["name"], parameter["in"], parameter["required"]) == (
        "x-service-token",
        "header",
        False,
    )
    assert "parameters" not in document["paths"]["/openapi.json"]["get"]
    assert "x-service-token" in gateway._cors_headers


def _requests(route: str, code: str) -> float:
    return (
        REGISTRY.get_sample_value("burrow_gateway_requests_total", {"route": route, "code": code})
        or 0.0
    )


async def test_an_operation_deployed_after_the_gateway_started_is_served(start: Start) -> None:
    """The gateway's code knows only `price`; the service running now also has `discount`:
    it is called and submitted (read back by its job id), checked by the service, counted
    under the route's template; an operation nobody has is the service's 404."""
    http = await start(
        till(later=False), till(later=True), gateway_forward_headers="x-service-token"
    )
    token = {TOKEN: "secret"}
    template = "POST /v1/{service}/{operation}"
    before = _requests(template, "200")

    called = await http.post("/v1/till/discount", json={"sku": "tea"}, headers=token)
    assert (called.status, await called.json()) == (200, {"sku": "tea", "cents": 405})
    assert _requests(template, "200") == before + 1

    accepted = await http.post(
        "/v1/till/discount", json={"sku": "tea"}, headers={**token, "Prefer": "respond-async"}
    )
    assert accepted.status == 202
    job_id = (await accepted.json())["job_id"]
    assert job_id.startswith("till.discount.")
    unread = await http.get(f"/v1/jobs/{job_id}")
    assert unread.status == 403  # a read is a call: the service's middleware sees it too
    for _ in range(50):
        status = await (await http.get(f"/v1/jobs/{job_id}", headers=token)).json()
        if status["status"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert status == {
        "job_id": job_id,
        "status": "completed",
        "result": {"sku": "tea", "cents": 405},
    }

    invalid = await http.post("/v1/till/discount", json={"sku": 5}, headers=token)
    assert (invalid.status, (await invalid.json())["code"]) == (422, "INVALID_ARGUMENT")
    not_json = await http.post("/v1/till/discount", data=b"{", headers=token)
    assert not_json.status == 422
    nobody = await http.post("/v1/till/refund", json={"sku": "tea"}, headers=token)
    assert (nobody.status, (await nobody.json())["code"]) == (404, "NOT_FOUND")
    assert "unknown operation" in (await nobody.json())["detail"]
    strange = await http.post("/v1/till/No-Such", json={}, headers=token)
    assert (await strange.json())["detail"] == "no operation till.No-Such"
