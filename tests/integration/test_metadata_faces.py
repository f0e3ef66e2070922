"""The guide's auth middleware (docs/guide.md §13) on the real broker, reached with its token
from every face: the async `Client`, `BlockingClient`, the `burrow` command and `burrow
gateway`; without the token each gets PERMISSION_DENIED (403 over HTTP). A CLI run and a script
using `BlockingClient` print nothing but the result on stdout (issue 26)."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from service import (
    App,
    Client,
    Context,
    Model,
    Next,
    PermissionDenied,
    Request,
    Result,
    Service,
    Settings,
    State,
)
from service.blocking import BlockingClient
from service.gateway._server import Gateway
from tests.conftest import delete_topology
from tests.integration.test_async_support import sample, wait_until
from tests.integration.test_cli_commands import RUN_TIMEOUT, Run, burrow, burrow_env

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
KEY = "gateway-key-1"
TEA = {"sku": "tea", "total_cents": 450}

# -- the guide's service, as §13 spells it ----------------------------------------------------

TOKEN = "x-service-token"


async def require_token(request: Request, call_next: Next) -> Result:
    if request.delivery.headers.get(TOKEN) != "secret":
        raise PermissionDenied(f"a valid {TOKEN} header is required")
    return await call_next(request)


@asynccontextmanager
async def database(state: State) -> AsyncIterator[None]:
    state.prices = {"tea": 450}  # e.g. a connection pool, opened once
    yield
    state.prices.clear()  # closed after the last message in flight


till = Service("till", lifespan=database)


class Item(Model):
    """What the till prices."""

    sku: str


class Placed(Model):
    """Its answer (the guide's `Placed`)."""

    sku: str
    total_cents: int


@till.operation()
async def price(req: Item, ctx: Context) -> Placed:
    return Placed(sku=req.sku, total_cents=ctx.state.get("prices", dict)[req.sku])


SECRET = {TOKEN: "secret"}
REFUSAL = f"a valid {TOKEN} header is required"


def test_this_is_the_guides_service() -> None:
    """The middleware, lifespan and handler above are spelled as in docs/guide.md §13."""
    guide = GUIDE.read_text(encoding="utf-8")
    assert f'TOKEN = "{TOKEN}"' in guide
    for part in (require_token, database, price):
        assert inspect.getsource(part) in guide, part.__name__


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[App]:
    """The till, with the guide's `require_token` on the App, serving this test's namespace."""
    app = App(till, settings=settings, middleware=[require_token])
    await app.start()
    await app.wait_ready(10)
    yield app
    await app.stop()
    await delete_topology(app.topology)


def handled(outcome: str) -> float:
    """burrow_messages_handled_total of till.price with `outcome` (this process's App)."""
    return sample(
        "burrow_messages_handled_total", service="till", operation="till.price", outcome=outcome
    )


# -- the four faces ---------------------------------------------------------------------------


async def test_async_client(served: App, client: Client) -> None:
    """`headers=` on call, cast, submit (and the job read) and emit reaches the middleware;
    without the token the call is PERMISSION_DENIED, naming its message."""
    with pytest.raises(PermissionDenied, match=REFUSAL) as refused:
        await client.call("till.price", {"sku": "tea"})
    assert re.fullmatch(r"message_id=(\S+) correlation_id=\1", refused.value.__notes__[0])
    assert await client.call("till.price", {"sku": "tea"}, headers=SECRET) == TEA

    before = handled("ok")
    await client.cast("till.price", {"sku": "tea"}, headers=SECRET)
    await wait_until(lambda: handled("ok") > before)
    job = await client.submit("till.price", {"sku": "tea"}, headers=SECRET)
    assert await job.result(timeout=10) == TEA
    read = client.job(job.id, "till.price", headers=SECRET)
    assert await read.result(timeout=10) == TEA
    with pytest.raises(PermissionDenied):
        await client.job(job.id, "till.price").result(timeout=10)


async def test_blocking_client(served: App, settings: Settings) -> None:
    """BlockingClient's call and submit carry `headers=`; without them PERMISSION_DENIED."""

    def script() -> tuple[Any, Any]:
        with BlockingClient(settings) as blocking:
            with pytest.raises(PermissionDenied, match=REFUSAL):
                blocking.call("till.price", {"sku": "tea"})
            called = blocking.call("till.price", {"sku": "tea"}, headers=SECRET)
            job = blocking.submit("till.price", {"sku": "tea"}, headers=SECRET)
            return called, job.result(timeout=10)

    assert await asyncio.to_thread(script) == (TEA, TEA)


async def test_blocking_client_outbound_is_used(served: App, settings: Settings) -> None:
    """`BlockingClient(outbound=[…])`, once accepted and ignored, signs every publish."""

    async def sign(publishing: Any, call_next: Any) -> None:
        publishing.message.headers[TOKEN] = "secret"
        await call_next(publishing)

    def script() -> Any:
        with BlockingClient(settings, outbound=[sign]) as blocking:
            return blocking.call("till.price", {"sku": "tea"})

    assert await asyncio.to_thread(script) == TEA


async def test_cli(served: App, namespace: str) -> None:
    """`--header` on call, cast, submit and job: the token gets through; without it, one
    `error: PERMISSION_DENIED` line naming the message; `burrow job` takes what `burrow
    submit` prints, its `--id-only` id and a gateway job id."""
    header = ["--header", f"{TOKEN}=secret"]
    refused = await burrow(namespace, "call", "till.price", '{"sku": "tea"}')
    assert (refused.code, refused.stdout) == (1, "")
    assert re.fullmatch(
        rf"error: PERMISSION_DENIED: {REFUSAL} \(message_id=(\S+) correlation_id=\1\)\n",
        refused.stderr,
    ), refused.stderr

    called = await burrow(namespace, "call", "till.price", '{"sku": "tea"}', *header)
    assert (called.code, called.stdout) == (0, '{"sku":"tea","total_cents":450}\n'), called.stderr

    before = handled("ok")
    cast = await burrow(namespace, "cast", "till.price", '{"sku": "tea"}', *header, "--id-only")
    assert cast.code == 0, cast.stderr
    assert re.fullmatch(r"[0-9a-f]{32}\n", cast.stdout)
    await wait_until(lambda: handled("ok") > before)

    submitted = await burrow(namespace, "submit", "till.price", '{"sku": "tea"}', *header)
    assert submitted.code == 0, submitted.stderr
    job_id = submitted.json()["job_id"]
    bare = await burrow(namespace, "submit", "till.price", '{"sku": "tea"}', *header, "--id-only")
    assert bare.code == 0, bare.stderr
    for given in (submitted.stdout.strip(), bare.stdout.strip(), f"till.price.{job_id}"):
        route = [] if given.startswith("till.price.") else ["--operation", "till.price"]
        read = await burrow(namespace, "job", given, *route, *header, "--timeout", "20")
        assert (read.code, read.json()) == (0, TEA), (given, read.stderr)

    unread = await burrow(namespace, "job", f"till.price.{job_id}", "--timeout", "5")
    assert unread.code == 1
    assert unread.stderr.endswith(f"; job_id={job_id})\n"), unread.stderr


async def test_gateway(served: App, settings: Settings) -> None:
    """With BURROW_GATEWAY_FORWARD_HEADERS=x-service-token the token in its own header reaches
    the service on a call, a submit and the job's read; the gateway's key stays the gateway's;
    without the token, 403."""
    update = {
        "gateway_port": 0,
        "gateway_host": "127.0.0.1",
        "gateway_api_keys": SecretStr(KEY),
        "gateway_forward_headers": "X-Service-Token",
    }
    gateway = Gateway(till, settings=settings.model_copy(update=update))
    await gateway.start()
    try:
        await gateway.wait_ready(10)
        base = f"http://127.0.0.1:{gateway.port}"
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/till/price", json={"sku": "tea"}, headers=auth) as r:
                assert r.status == 403
                assert (await r.json())["code"] == "PERMISSION_DENIED"
            signed = {**auth, "X-Service-Token": "secret"}
            async with http.post(f"{base}/v1/till/price", json={"sku": "tea"}, headers=signed) as r:
                assert (r.status, await r.json()) == (200, TEA)
            later = {**signed, "Prefer": "respond-async"}
            async with http.post(f"{base}/v1/till/price", json={"sku": "tea"}, headers=later) as r:
                assert r.status == 202
                location = r.headers["Location"]
            for _ in range(100):
                async with http.get(base + location, headers=signed) as r:
                    body = await r.json()
                if body["status"] != "pending":
                    break
                await asyncio.sleep(0.05)
            assert body["result"] == TEA
            async with http.get(base + location, headers=auth) as r:
                assert r.status == 403  # the read is a call: the middleware sees it too
    finally:
        await gateway.stop()
        await delete_topology(gateway.app.topology)


# -- stdout is the result's ----------------------------------------------------------------------


def quiet_env(namespace: str) -> dict[str, str]:
    """A subprocess environment with this test's broker and namespace, no logging settings."""
    env = burrow_env(namespace)
    env.pop("BURROW_LOG_FORMAT", None)
    return env


async def run(*command: str, env: dict[str, str], cwd: Path) -> Run:
    """Run a command to completion (bounded), its output kept apart."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


SCRIPT = """\
import json

from service.blocking import BlockingClient

with BlockingClient() as client:
    reply = client.call("till.price", {"sku": "tea"}, headers={"x-service-token": "secret"})
print(json.dumps(reply))
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A script that calls the till with BlockingClient and prints the reply as JSON."""
    path = tmp_path / "price.py"
    path.write_text(SCRIPT, encoding="utf-8")
    return path


async def test_only_the_result_is_on_stdout(
    served: App, namespace: str, script: Path, tmp_path: Path
) -> None:
    """`burrow call …` and a script using BlockingClient (no logging configured) print the
    result alone on stdout; Burrow's own lines, if any, are on stderr."""
    env = quiet_env(namespace)
    called = await run(
        sys.executable, "-m", "service.cli", "call", "till.price", '{"sku": "tea"}',
        "--header", f"{TOKEN}=secret", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert (called.code, called.stdout) == (0, '{"sku":"tea","total_cents":450}\n'), called.stderr
    scripted = await run(sys.executable, str(script), env=env, cwd=tmp_path)
    assert scripted.code == 0, scripted.stderr
    assert scripted.stdout == json.dumps(TEA) + "\n", scripted.stderr
    assert "broker connected" in scripted.stderr  # the log line is there, on stderr
