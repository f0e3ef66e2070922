"""The HTTP examples against a live `calc` service: replies, jobs and every error status.

The aiohttp app runs on the test's loop with the async client; the Flask app's requests are
made from another thread because its blocking client waits for the service on this loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
from aiohttp.test_utils import TestClient, TestServer
from flask.testing import FlaskClient

from examples.flask_app import create_app as create_flask_app
from examples.http_api import create_app as create_aiohttp_app
from service import Client, Settings
from service._protocol.codec import encode
from service._protocol.vocabulary import Names
from service.blocking import BlockingClient
from service.example import calc
from tests.conftest import AppFactory

__all__: list[str] = []

if TYPE_CHECKING:  # TestClient takes type arguments at run time only from aiohttp 3.11
    HttpClient = TestClient[Any, Any]


@pytest.fixture
async def http(client: Client) -> AsyncIterator[HttpClient]:
    """The aiohttp example app served on an ephemeral port, calling through `client`."""
    async with TestClient(TestServer(create_aiohttp_app(client))) as http_client:
        yield http_client


@pytest.fixture
async def flask_client(settings: Settings) -> AsyncIterator[FlaskClient]:
    """The Flask example app's test client, calling through its own BlockingClient."""
    blocking = BlockingClient(settings)
    yield create_flask_app(blocking).test_client()
    await asyncio.to_thread(blocking.close)


async def test_aiohttp_call_answers_the_reply(start_app: AppFactory, http: HttpClient) -> None:
    """POST /calc/add answers 200 with the service's reply."""
    await start_app(calc)
    response = await http.post("/calc/add", json={"a": 2, "b": 40})
    assert response.status == 200
    assert await response.json() == {"sum": 42}


async def test_aiohttp_error_statuses(start_app: AppFactory, http: HttpClient) -> None:
    """Bad payloads are 422, unknown operations 404, missed deadlines 504, each with its code."""
    await start_app(calc)
    cases = [
        ("/calc/add", {"a": "x", "b": 1}, 422, "INVALID_ARGUMENT"),
        ("/calc/divide", {"a": 1, "b": 0}, 422, "INVALID_ARGUMENT"),
        ("/calc/nope", {}, 404, "NOT_FOUND"),
        ("/calc/slow_square?timeout=0.3", {"x": 2, "delay_ms": 3000}, 504, "DEADLINE_EXCEEDED"),
    ]
    for path, payload, status, code in cases:
        response = await http.post(path, json=payload)
        assert response.status == status, path
        assert (await response.json())["error"]["code"] == code, path
    not_json = await http.post("/calc/add", data=b"{nope")
    assert not_json.status == 422
    bad_timeout = await http.post("/calc/add?timeout=-1", json={"a": 1, "b": 1})
    assert bad_timeout.status == 422


async def test_aiohttp_job_is_accepted_then_polled(start_app: AppFactory, http: HttpClient) -> None:
    """A submitted slow_square answers 202 + Location; polling it gives pending, then done."""
    await start_app(calc)
    accepted = await http.post("/calc/slow_square/jobs", json={"x": 12, "delay_ms": 1500})
    assert accepted.status == 202
    body = await accepted.json()
    assert accepted.headers["Location"] == body["location"] == f"/jobs/{body['job_id']}"
    pending = await http.get(f"{body['location']}?wait=0.1")
    assert pending.status == 200
    assert (await pending.json())["status"] == "pending"
    done = await http.get(f"{body['location']}?wait=20")
    assert await done.json() == {
        "job_id": body["job_id"],
        "status": "done",
        "result": {"square": 144},
    }


async def test_aiohttp_failed_and_unknown_jobs(start_app: AppFactory, http: HttpClient) -> None:
    """A failed job reports its error with 200; an unknown job id is a 404."""
    await start_app(calc)
    accepted = await http.post("/calc/divide/jobs", json={"a": 1, "b": 0})
    location = (await accepted.json())["location"]
    failed = await (await http.get(f"{location}?wait=20")).json()
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "INVALID_ARGUMENT"
    unknown = await http.get("/jobs/no-such-job")
    assert unknown.status == 404


async def fill_queue(channel: aio_pika.abc.AbstractChannel, namespace: str) -> int:
    """Publish slow_square casts to calc's request queue until the broker nacks one (full)."""
    names = Names(namespace)
    exchange = await channel.get_exchange(names.rpc_exchange, ensure=False)
    body = encode({"x": 1, "delay_ms": 5000})
    for accepted in range(20):
        message = aio_pika.Message(body, content_type="application/json", expiration=10)
        try:
            await exchange.publish(message, routing_key="calc.slow_square", mandatory=True)
        except aio_pika.exceptions.DeliveryError:
            return accepted
    raise AssertionError("calc's request queue never refused a message")


async def test_aiohttp_full_queue_is_503_with_retry_after(
    start_app: AppFactory,
    http: HttpClient,
    amqp_channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
) -> None:
    """When the request queue is at its length limit the API answers 503 with Retry-After."""
    await start_app(calc, max_queue_length=1, prefetch=1)
    # The first cast is being handled (prefetch 1) for 5 s; the next ones fill the queue.
    assert await fill_queue(amqp_channel, settings.namespace) >= 2
    response = await http.post("/calc/add", json={"a": 1, "b": 1})
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["error"]["code"] == "RESOURCE_EXHAUSTED"


async def test_flask_call_and_errors(start_app: AppFactory, flask_client: FlaskClient) -> None:
    """The Flask app answers replies with 200 and maps errors like the aiohttp app."""
    await start_app(calc)
    ok = await asyncio.to_thread(flask_client.post, "/calc/add", json={"a": 1, "b": 2})
    assert (ok.status_code, ok.get_json()) == (200, {"sum": 3})
    cases = [
        ("/calc/add", {"a": "x", "b": 1}, 422, "INVALID_ARGUMENT"),
        ("/calc/nope", {}, 404, "NOT_FOUND"),
        ("/calc/slow_square?timeout=0.3", {"x": 2, "delay_ms": 3000}, 504, "DEADLINE_EXCEEDED"),
    ]
    for path, payload, status, code in cases:
        response = await asyncio.to_thread(flask_client.post, path, json=payload)
        assert response.status_code == status, path
        body = response.get_json()
        assert body is not None
        assert body["error"]["code"] == code, path


async def test_flask_job_is_accepted_then_polled(
    start_app: AppFactory, flask_client: FlaskClient
) -> None:
    """The Flask app accepts a slow_square job with 202 + Location and reports its result."""
    await start_app(calc)
    accepted = await asyncio.to_thread(
        flask_client.post, "/calc/slow_square/jobs", json={"x": 5, "delay_ms": 200}
    )
    assert accepted.status_code == 202
    body = accepted.get_json()
    assert body is not None
    assert accepted.headers["Location"] == body["location"]
    done = await asyncio.to_thread(flask_client.get, f"{body['location']}?wait=20")
    assert done.get_json() == {"job_id": body["job_id"], "status": "done", "result": {"square": 25}}
    unknown = await asyncio.to_thread(flask_client.get, "/jobs/no-such-job")
    assert unknown.status_code == 404
