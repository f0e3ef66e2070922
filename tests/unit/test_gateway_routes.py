"""Unit tests of the gateway's route table: every route is served, documented and labelled from
the one table, and a route added to a table shows up in all three (issue 25)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from prometheus_client import REGISTRY
from pydantic import SecretStr

from service import Settings
from service.example import calc
from service.gateway._openapi import openapi_document
from service.gateway._routes import ROUTES, Reply, Route
from service.gateway._server import Gateway
from service.testing import InMemoryBroker

__all__: list[str] = []

KEY = "test-key-1"
PING = Route(
    "GET",
    "/v1/ping",
    "_ping",
    Reply("Pong.", {"type": "string"}),
    operation_id="ping",
    summary="Whether the gateway answers.",
    problems=("500",),
)


class PingGateway(Gateway):
    """A gateway whose table (a copy of the global one) has one route more: GET /v1/ping."""

    routes = (*ROUTES, PING)

    async def _ping(self, _: web.Request) -> web.Response:
        return web.Response(text="pong")


def _requests(route: str, code: str) -> float:
    """burrow_gateway_requests_total of one route and status code (0 when never counted)."""
    return (
        REGISTRY.get_sample_value("burrow_gateway_requests_total", {"route": route, "code": code})
        or 0.0
    )


def _gateway(cls: type[Gateway] = Gateway, *, auth: bool = False) -> Gateway:
    """A gateway for service.example:calc on an in-memory broker (never started)."""
    settings = Settings(gateway_api_keys=SecretStr(KEY)) if auth else Settings(gateway_auth="none")
    return cls(calc, settings=settings, link_factory=InMemoryBroker().link_factory)


def _served(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route of the aiohttp app, HEAD left out."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def _documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation of an OpenAPI document."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


def _table_paths(routes: tuple[Route, ...]) -> set[tuple[str, str]]:
    """(method, path) of every path the table stands for, for calc's operations."""
    operations = calc.operations.values()
    return {(route.method, path) for route in routes for path, _ in route.paths(operations)}


async def _resolve(app: web.Application, method: str, path: str) -> web.UrlMappingMatchInfo:
    """What the app's router matches for a request; `{…}` in `path` filled with a value."""
    request = make_mocked_request(method, re.sub(r"\{[^}]+\}", "x", path), app=app)
    match = await app.router.resolve(request)
    assert isinstance(match, web.UrlMappingMatchInfo)
    return match


def test_the_labels_are_the_routes_of_today() -> None:
    """Each path of the table has the metric and log label `<METHOD> <path>` it always had."""
    labels = [
        route.label(path) for route in ROUTES for path, _ in route.paths(calc.operations.values())
    ]
    assert labels == [
        "POST /v1/calc/add",
        "POST /v1/calc/divide",
        "POST /v1/calc/slow_square",
        "GET /v1/jobs/{job_id}",
        "GET /openapi.json",
    ]


async def test_every_route_of_the_table_is_served_and_documented() -> None:
    """The app's routes are the table's; the document's paths are exactly the table's paths,
    and each of them reaches the table's handler through the app's router."""
    gateway = _gateway()
    app = gateway.make_app()
    assert _served(app) == {(route.method, route.path) for route in ROUTES}
    document = json.loads(gateway.document)
    assert document == openapi_document([calc], auth=False)
    assert _documented(document) == _table_paths(ROUTES)
    for route in ROUTES:
        for path, _ in route.paths(calc.operations.values()):
            match = await _resolve(app, route.method, path)
            assert match.http_exception is None, path
            assert match.handler == getattr(gateway, route.handler), path


async def test_a_route_added_to_a_table_is_served_documented_and_counted() -> None:
    """A copy of the table with GET /v1/ping: the app answers it (behind the API key), the
    document has it (with its 401), its metrics are labelled, and the global table is as it was."""
    gateway = _gateway(PingGateway, auth=True)
    app = gateway.make_app()
    assert _served(app) == {(route.method, route.path) for route in (*ROUTES, PING)}
    document = json.loads(gateway.document)
    assert _documented(document) == _table_paths((*ROUTES, PING))
    ping = document["paths"]["/v1/ping"]["get"]
    assert (ping["operationId"], ping["summary"]) == ("ping", "Whether the gateway answers.")
    assert set(ping["responses"]) == {"200", "401", "500"}
    assert "security" not in ping  # under /v1/: the document's security holds
    assert PING not in ROUTES
    assert Gateway.routes is ROUTES
    assert "/v1/ping" not in json.loads(_gateway(auth=True).document)["paths"]

    refused_before = _requests("GET /v1/ping", "401")
    answered_before = _requests("GET /v1/ping", "200")
    async with TestClient(TestServer(app)) as client:
        refused = await client.get("/v1/ping")
        assert refused.status == 401
        answered = await client.get("/v1/ping", headers={"X-API-Key": KEY})
        assert (answered.status, await answered.text()) == (200, "pong")
        served = await (await client.get("/openapi.json")).json()
    assert served == document
    assert _requests("GET /v1/ping", "401") == refused_before + 1
    assert _requests("GET /v1/ping", "200") == answered_before + 1


async def test_a_path_naming_no_operation_is_unmatched() -> None:
    """POST to a service the gateway does not serve: 404, counted as `unmatched` (an
    undeclared operation of a served service is passed on: tests/unit/test_gateway_metadata)."""
    app = _gateway().make_app()
    before = _requests("unmatched", "404")
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/v1/shop/nope", json={})
        assert answer.status == 404
        assert (await answer.json())["detail"] == "no operation shop.nope"
    assert _requests("unmatched", "404") == before + 1


def test_only_a_per_operation_route_has_models() -> None:
    """A route without `{service}` and `{operation}` in its path cannot take an operation's
    request body, reply or 202."""
    with pytest.raises(ValueError, match="per-operation"):
        Route("POST", "/v1/things", "_things", Reply("A thing.", None))
    with pytest.raises(ValueError, match="per-operation"):
        Route("POST", "/v1/things", "_things", Reply("A thing.", "Thing"), body=True)
