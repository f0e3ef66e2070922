"""The HTTP gateway (`burrow gateway`) against the real broker and a running `calc` service:
calls, submits, sync-when-it-can, jobs, signed webhooks with retries, auth, limits, CORS."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from standardwebhooks import Webhook

from service import App, Settings
from service._protocol.vocabulary import Names
from service.example import calc
from service.gateway._routes import CALLBACK_HEADER
from service.gateway._server import Gateway
from tests.conftest import delete_topology
from tests.faults.harness import sample, wait_until
from tests.integration.test_async_support import EventTap, queue_depth

KEY = "test-key-1"
SECRET = "whsec_" + base64.b64encode(b"burrow-gateway-test-secret-32by").decode()
AUTH = {"Authorization": f"Bearer {KEY}"}
ASYNC = {**AUTH, "Prefer": "respond-async"}


@dataclass
class Receiver:
    """A webhook receiver on loopback: answers the statuses in `plan` in turn, then 200."""

    plan: list[int] = field(default_factory=list)
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        """Record the POST; answer the next planned status."""
        self.posts.append((dict(request.headers), await request.read()))
        status = self.plan.pop(0) if self.plan else 200
        return web.Response(status=status)

    def ids(self) -> list[str]:
        """The webhook-id of every POST received, in order."""
        return [headers["webhook-id"] for headers, _ in self.posts]


@dataclass
class Running:
    """A gateway in front of calc, its base URL and an HTTP session."""

    gateway: Gateway
    http: aiohttp.ClientSession
    base: str
    metrics: str

    async def post(self, path: str, body: Any, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST JSON to the gateway; the response is read (its body kept)."""
        async with self.http.post(self.base + path, json=body, headers=headers) as response:
            await response.read()
            return response

    async def get(self, path: str, headers: dict[str, str] = AUTH) -> aiohttp.ClientResponse:
        """GET from the gateway; the response is read."""
        async with self.http.get(self.base + path, headers=headers) as response:
            await response.read()
            return response


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
def gateway_settings(settings: Settings) -> Settings:
    """The test's settings with quick retries (shared by calc and the gateway: one ladder)."""
    return settings.model_copy(update={"retry_base_delay": 0.2, "max_retries": 3})


@pytest.fixture
async def start_gateway(gateway_settings: Settings) -> AsyncIterator[StartGateway]:
    """Start calc, then a gateway in front of it on free ports; both stopped after the test
    (the gateway first), then what they declared deleted."""
    started: list[tuple[App, Gateway, aiohttp.ClientSession]] = []

    async def start(serving: dict[str, Any] | None = None, **overrides: Any) -> Running:
        service = App(calc, settings=gateway_settings.model_copy(update=serving or {}))
        await service.start()
        await service.wait_ready(10)
        update = {
            "gateway_port": 0,
            "gateway_host": "127.0.0.1",
            "gateway_api_keys": SecretStr(KEY),
            "gateway_callback_hosts": "127.0.0.1",
            "gateway_webhook_secret": SecretStr(SECRET),
            **overrides,
        }
        gateway = Gateway(calc, settings=gateway_settings.model_copy(update=update))
        http = aiohttp.ClientSession()
        started.append((service, gateway, http))
        await gateway.start()
        await gateway.wait_ready(10)
        assert gateway.app.http is not None
        return Running(
            gateway,
            http,
            f"http://127.0.0.1:{gateway.port}",
            f"http://127.0.0.1:{gateway.app.http.port}/metrics",
        )

    yield start
    for service, gateway, http in started:
        await http.close()
        await gateway.stop()
        await service.stop()
    await delete_topology(
        *(app.topology for service, gateway, _ in started for app in (service, gateway.app))
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver serving on a free loopback port."""
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield found
    await runner.cleanup()


async def _finished(running: Running, location: str) -> dict[str, Any]:
    """Poll a job's location until it is no longer pending; its body. A 503 (the read is a
    call to the service: refused while its request queue is full) is polled again, as its
    Retry-After says."""
    body: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal body
        response = await running.get(location)
        if response.status == 503 and "Retry-After" in response.headers:
            return False
        assert response.status == 200, await response.text()
        body = await response.json()
        return bool(body["status"] != "pending")

    deadline = time.monotonic() + 20
    while not await done():
        assert time.monotonic() < deadline, "the job did not finish"
        await asyncio.sleep(0.05)
    return body


async def test_a_call_answers_200_with_the_reply(start_gateway: StartGateway) -> None:
    """POST /v1/calc/add is a call: 200 and the reply model as JSON."""
    running = await start_gateway()
    response = await running.post("/v1/calc/add", {"a": 2, "b": 40}, AUTH)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"sum": 42}


async def test_respond_async_is_202_then_the_job_is_polled(start_gateway: StartGateway) -> None:
    """Prefer: respond-async submits: 202, Location and Preference-Applied; the location
    answers pending, then completed with the result."""
    running = await start_gateway()
    response = await running.post("/v1/calc/slow_square", {"x": 12, "delay_ms": 300}, ASYNC)
    assert response.status == 202
    accepted = await response.json()
    location = response.headers["Location"]
    assert location == f"/v1/jobs/{accepted['job_id']}" == accepted["location"]
    assert response.headers["Preference-Applied"] == "respond-async"
    assert accepted["status"] == "pending"
    first = await running.get(location)
    assert (await first.json())["status"] == "pending"
    assert first.headers["Retry-After"] == "1"
    done = await _finished(running, location)
    assert done == {"job_id": accepted["job_id"], "status": "completed", "result": {"square": 144}}


async def test_wait_then_async_answers_202_at_the_wait_and_runs_once(
    start_gateway: StartGateway, amqp_channel: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    """Prefer: wait=1, respond-async on a 3 s job: 202 no earlier than 1 s (and before the
    job ended), and the job completes exactly once."""
    running = await start_gateway()
    tap = await EventTap(amqp_channel, namespace).start("calc.square.computed")
    started = time.monotonic()
    response = await running.post(
        "/v1/calc/slow_square",
        {"x": 7, "delay_ms": 3000},
        {**AUTH, "Prefer": "wait=1, respond-async"},
    )
    waited = time.monotonic() - started
    assert response.status == 202, await response.text()
    assert waited >= 1.0
    done = await _finished(running, response.headers["Location"])
    assert done["result"] == {"square": 49}
    assert json.loads((await tap.next()).body) == {"x": 7, "square": 49}
    await asyncio.sleep(0.5)  # a second run would have emitted by now (same 3 s job)
    assert tap.messages.empty()


async def test_wait_then_async_answers_200_when_the_job_is_quick(
    start_gateway: StartGateway,
) -> None:
    """Prefer: respond-async, wait=10 on a quick job answers 200 with the reply, as a call."""
    running = await start_gateway()
    response = await running.post(
        "/v1/calc/slow_square",
        {"x": 5, "delay_ms": 10},
        {**AUTH, "Prefer": "respond-async, wait=10"},
    )
    assert response.status == 200
    assert await response.json() == {"square": 25}
    assert response.headers["Preference-Applied"] == "wait=10"


async def test_errors_are_problems_with_one_status_per_code(start_gateway: StartGateway) -> None:
    """Errors are application/problem+json with Burrow's code, details and retryable: 422 for
    invalid input (checked before any AMQP), 504 at the wait, 404 for unknown routes and jobs."""
    running = await start_gateway()
    divide = await running.post("/v1/calc/divide", {"a": 1, "b": 0}, AUTH)
    assert divide.status == 422
    assert divide.content_type == "application/problem+json"
    body = await divide.json()
    assert body == {
        "type": "urn:burrow:error:invalid_argument",
        "title": "Invalid argument",
        "status": 422,
        "detail": "division by zero",
        "code": "INVALID_ARGUMENT",
        "details": {"field": "b"},
        "retryable": False,
    }
    overflow = await running.post("/v1/calc/divide", {"a": 1e308, "b": 1e-308}, AUTH)
    assert overflow.status == 422
    assert (await overflow.json())["detail"] == "the quotient is out of range"
    invalid = await running.post("/v1/calc/add", {"a": "x"}, AUTH)
    assert invalid.status == 422
    assert (await invalid.json())["code"] == "INVALID_ARGUMENT"
    slow = await running.post(
        "/v1/calc/slow_square", {"x": 1, "delay_ms": 2000}, {**AUTH, "Prefer": "wait=0.3"}
    )
    assert slow.status == 504
    assert (await slow.json())["code"] == "DEADLINE_EXCEEDED"
    for path in ("/v1/calc/nope", "/v1/nope/add"):
        assert (await running.post(path, {}, AUTH)).status == 404
    unknown = await running.get("/v1/jobs/calc.slow_square." + "0" * 32)
    assert unknown.status == 404
    assert (await unknown.json())["code"] == "NOT_FOUND"
    assert (await running.get("/v1/jobs/not-a-job")).status == 404


async def test_a_saturated_service_is_503_for_a_call_and_202_for_async(
    start_gateway: StartGateway,
) -> None:
    """With calc's request queue full, a plain call answers 503 RESOURCE_EXHAUSTED with
    Retry-After; the same request preferring async is accepted (202) and completes."""
    running = await start_gateway(
        serving={"prefetch": 1, "max_queue_length": 1}, default_deadline=10.0
    )
    busy = {"x": 1, "delay_ms": 1500}
    # One call being handled (prefetch 1), the rest waiting: the bounded request queue is full
    # (a quorum queue on 3.10 takes one message past x-max-length, 4.x none).
    held = [
        asyncio.ensure_future(running.post("/v1/calc/slow_square", busy, AUTH)) for _ in range(3)
    ]
    await asyncio.sleep(0.3)
    refused = await running.post("/v1/calc/add", {"a": 1, "b": 2}, AUTH)
    assert refused.status == 503, await refused.text()
    assert refused.headers["Retry-After"] == "1"
    problem = await refused.json()
    assert (problem["code"], problem["retryable"]) == ("RESOURCE_EXHAUSTED", True)
    accepted = await running.post(
        "/v1/calc/slow_square", busy, {**AUTH, "Prefer": "respond-async, wait=0.1"}
    )
    assert accepted.status == 202
    done = await _finished(running, accepted.headers["Location"])
    assert done["result"] == {"square": 1}
    statuses = sorted(r.status for r in await asyncio.gather(*held))
    assert statuses in ([200, 200, 200], [200, 200, 503])


async def test_a_failed_job_reads_as_failed_with_its_error(start_gateway: StartGateway) -> None:
    """A submitted job that fails reads as status failed with the error body; waited for
    within `wait`, it answers the error as a problem."""
    running = await start_gateway()
    response = await running.post("/v1/calc/divide", {"a": 1, "b": 0}, ASYNC)
    assert response.status == 202
    done = await _finished(running, response.headers["Location"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "INVALID_ARGUMENT"
    waited = await running.post(
        "/v1/calc/divide", {"a": 1, "b": 0}, {**AUTH, "Prefer": "respond-async, wait=10"}
    )
    assert waited.status == 422
    assert (await waited.json())["detail"] == "division by zero"


async def test_api_keys_are_required_unless_auth_is_off(start_gateway: StartGateway) -> None:
    """Without a key, or with a wrong one, /v1 answers 401 with WWW-Authenticate; a key as
    Bearer token or X-API-Key is accepted; /openapi.json needs none."""
    running = await start_gateway()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        refused = await running.post("/v1/calc/add", {"a": 1, "b": 1}, headers)
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await refused.json())["code"] == "UNAUTHENTICATED"
    assert (await running.post("/v1/calc/add", {"a": 1, "b": 1}, {"X-API-Key": KEY})).status == 200
    document = await running.get("/openapi.json", headers={})
    assert document.status == 200
    assert (await document.json())["openapi"] == "3.1.0"


async def test_auth_none_serves_without_keys(start_gateway: StartGateway) -> None:
    """BURROW_GATEWAY_AUTH=none (said explicitly) serves /v1 without any key."""
    running = await start_gateway(gateway_auth="none", gateway_api_keys=SecretStr(""))
    assert (await running.post("/v1/calc/add", {"a": 1, "b": 1}, {})).status == 200


async def test_a_body_over_the_limit_is_413(start_gateway: StartGateway) -> None:
    """A request body over BURROW_MAX_BODY_BYTES is refused with a 413 problem."""
    running = await start_gateway(max_body_bytes=2048)
    response = await running.post("/v1/calc/add", {"a": 1, "b": 1, "pad": "x" * 4096}, AUTH)
    assert response.status == 413
    assert (await response.json())["code"] == "INVALID_ARGUMENT"


async def test_cors_only_for_configured_origins(start_gateway: StartGateway) -> None:
    """A configured origin gets CORS headers and preflights; any other origin gets none."""
    running = await start_gateway(gateway_cors_origins="https://app.example.com")
    allowed = {**AUTH, "Origin": "https://app.example.com"}
    response = await running.post("/v1/calc/add", {"a": 1, "b": 1}, allowed)
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    async with running.http.options(
        running.base + "/v1/calc/add",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
    ) as preflight:
        assert preflight.status == 204
        assert "Prefer" in preflight.headers["Access-Control-Allow-Headers"]
    other = await running.post(
        "/v1/calc/add", {"a": 1, "b": 1}, {**AUTH, "Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_each_job_gets_one_signed_webhook(
    start_gateway: StartGateway, receiver: Receiver
) -> None:
    """A callback receiver gets exactly one POST per job, signed as Standard Webhooks say
    (checked with the reference library), carrying the job's result."""
    running = await start_gateway()
    headers = {**ASYNC, CALLBACK_HEADER: receiver.url}
    jobs = []
    for x in range(5):
        response = await running.post("/v1/calc/slow_square", {"x": x, "delay_ms": 0}, headers)
        assert response.status == 202
        jobs.append((await response.json())["job_id"])
    await wait_until(lambda: len(receiver.posts) >= 5, 20, "five webhooks")
    await asyncio.sleep(0.5)  # a duplicate would arrive in this time
    assert sorted(receiver.ids()) == sorted(jobs)
    verifier = Webhook(SECRET)
    for sent_headers, body in receiver.posts:
        payload = verifier.verify(body, sent_headers)
        x = jobs.index(sent_headers["webhook-id"])
        assert payload["type"] == "job.completed"
        assert payload["data"] == {
            "job_id": jobs[x],
            "operation": "calc.slow_square",
            "status": "completed",
            "result": {"square": x * x},
        }


async def test_a_failing_receiver_gets_the_third_try(
    start_gateway: StartGateway, receiver: Receiver
) -> None:
    """A receiver that answers 500 twice gets the same signed webhook a third time (through
    the retry holding queues), and no fourth."""
    running = await start_gateway()
    receiver.plan = [500, 503]
    headers = {**ASYNC, CALLBACK_HEADER: receiver.url}
    response = await running.post("/v1/calc/slow_square", {"x": 3, "delay_ms": 0}, headers)
    job_id = (await response.json())["job_id"]
    await wait_until(lambda: len(receiver.posts) >= 3, 20, "the third try")
    await asyncio.sleep(1.0)  # a fourth would come 0.8 s after the third
    assert receiver.ids() == [job_id] * 3
    sent = {json.dumps(json.loads(body)["data"], sort_keys=True) for _, body in receiver.posts}
    assert len(sent) == 1  # the same job's data each time (the timestamps are the tries')
    Webhook(SECRET).verify(receiver.posts[-1][1], receiver.posts[-1][0])


async def test_a_receiver_that_never_answers_2xx_is_dead_lettered(
    start_gateway: StartGateway,
    receiver: Receiver,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """After the retry limit, the webhook is parked in the gateway's dead-letter queue."""
    running = await start_gateway()
    receiver.plan = [500] * 10
    headers = {**ASYNC, CALLBACK_HEADER: receiver.url}
    await running.post("/v1/calc/slow_square", {"x": 3, "delay_ms": 0}, headers)
    dlq = Names(namespace).dead_letter_queue("gateway")

    async def parked() -> bool:
        return await queue_depth(amqp_channel, dlq) == 1

    deadline = time.monotonic() + 20
    while not await parked():
        assert time.monotonic() < deadline, "the webhook was not dead-lettered"
        await asyncio.sleep(0.1)
    assert len(receiver.posts) == 4  # the first try and BURROW_MAX_RETRIES=3 retries


async def test_a_callback_outside_the_allow_list_is_refused_at_submit(
    start_gateway: StartGateway,
) -> None:
    """A callback host not on BURROW_GATEWAY_CALLBACK_HOSTS, credentials in the URL or a
    callback without respond-async: 422 at submit, and no job."""
    running = await start_gateway()
    for url in (
        "http://169.254.169.254/latest",
        "http://localhost:1/hook",
        "ftp://127.0.0.1/hook",
        "http://user:pw@127.0.0.1/hook",
    ):
        response = await running.post(
            "/v1/calc/add", {"a": 1, "b": 1}, {**ASYNC, CALLBACK_HEADER: url}
        )
        assert response.status == 422, url
        assert "Location" not in response.headers
    plain = await running.post(
        "/v1/calc/add", {"a": 1, "b": 1}, {**AUTH, CALLBACK_HEADER: "http://127.0.0.1/hook"}
    )
    assert plain.status == 422


async def test_metrics_and_probes_are_served(start_gateway: StartGateway) -> None:
    """The gateway serves /metrics with per-route RED metrics, and /readyz."""
    running = await start_gateway()
    route = "POST /v1/calc/add"
    before = {code: sample(_REQUESTS, route=route, code=code) for code in ("200", "401")}
    await running.post("/v1/calc/add", {"a": 1, "b": 1}, AUTH)
    await running.post("/v1/calc/add", {"a": 1, "b": 1}, {})
    assert sample(_REQUESTS, route=route, code="200") == before["200"] + 1
    assert sample(_REQUESTS, route=route, code="401") == before["401"] + 1
    async with running.http.get(running.metrics) as response:
        text = await response.text()
    assert f'burrow_gateway_request_duration_seconds_count{{route="{route}"}}' in text
    assert 'burrow_gateway_webhooks_total{outcome="delivered"}' in text
    async with running.http.get(running.metrics.replace("/metrics", "/readyz")) as ready:
        assert ready.status == 200


_REQUESTS = "burrow_gateway_requests_total"


async def test_schemathesis_finds_no_5xx_and_no_response_off_the_document(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Schemathesis, driven by /openapi.json (examples, coverage and fuzzing, fixed seed),
    finds no 5xx answer and no response the document does not describe: every operation as
    a call, slow_square (whose generated delays outlast any deadline: a 504 by design) as a
    submit, and the job route."""
    running = await start_gateway(default_deadline=5.0)
    calls = ["--exclude-path", "/v1/calc/slow_square"]
    submits = ["--include-path", "/v1/calc/slow_square", "--header", "Prefer: respond-async"]
    for selection in (calls, submits):
        output = await _schemathesis(running, selection, tmp_path)
        assert "Test cases:" in output, output[-3000:]


async def _schemathesis(running: Running, selection: list[str], where: Path) -> str:
    """Run `st run` against the gateway's document; its output (fails the test on a finding)."""
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{running.base}/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        *selection,
        "--checks",
        ",".join(checks),
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "100",
        "--seed",
        "17",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",  # nothing kept between runs: each run is the seed's
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=where,  # its crash cache goes there, not into the checkout
    )
    async with asyncio.timeout(240):
        raw, _ = await process.communicate()
    output = raw.decode(errors="replace")
    assert process.returncode == 0, output[-6000:]
    return output
