"""W7's peer: a FastAPI app on uvicorn that calls Burrow's `Client` by hand.

Written the way docs/calling.md and examples/http_api.py say to put HTTP in front of Burrow:
one `Client` opened in the app's `lifespan` and kept on `app.state`, one POST route per
operation with the request model as the body and the reply model as the return type (as
FastAPI's documentation recommends: validated, serialised straight to JSON by pydantic), each
doing `await client.call("calc.<op>", body, reply=<reply model>)` and returning it; Burrow
errors answered with examples/http_errors.py's statuses. The routes sit at the gateway's paths
(`/v1/calc/<op>`), so the load generator sends the same requests to both.

Run: `python -m bench.http_peer PORT NAMESPACE [uvloop|asyncio]` — one uvicorn process, one
worker, uvloop and httptools when installed, access log off, warning level.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bench.tools.burrow_tool import settings_for
from examples.http_errors import error_answer
from service import Client, ServiceError, Settings
from service._observe.log import configure_logging
from service.example import (
    AddReply,
    AddRequest,
    DivideReply,
    DivideRequest,
    SlowSquareReply,
    SlowSquareRequest,
)

__all__ = ["HTTP_IMPL", "create_app", "client_of", "main"]

# uvicorn's fast HTTP parser when installed (`uvicorn[standard]`), else its pure-Python h11.
HTTP_IMPL = "httptools" if importlib.util.find_spec("httptools") else "h11"


def client_of(request: Request) -> Client:
    """The process's Client, opened by the lifespan."""
    client: Client = request.app.state.client
    return client


def create_app(settings: Settings) -> FastAPI:
    """The app: one Client for the process, opened and closed by the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Client(settings) as client:
            app.state.client = client
            yield

    app = FastAPI(title="calc over HTTP (FastAPI + Burrow Client)", lifespan=lifespan)

    @app.exception_handler(ServiceError)
    async def burrow_error(request: Request, exc: ServiceError) -> JSONResponse:
        answer = error_answer(exc)
        return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

    @app.post("/v1/calc/add")
    async def add(body: AddRequest, request: Request) -> AddReply:
        """Add two integers."""
        return await client_of(request).call("calc.add", body, reply=AddReply)

    @app.post("/v1/calc/divide")
    async def divide(body: DivideRequest, request: Request) -> DivideReply:
        """Divide a by b."""
        return await client_of(request).call("calc.divide", body, reply=DivideReply)

    @app.post("/v1/calc/slow_square")
    async def slow_square(body: SlowSquareRequest, request: Request) -> SlowSquareReply:
        """Square x after a delay."""
        client = client_of(request)
        return await client.call("calc.slow_square", body, reply=SlowSquareReply, timeout=900)

    return app


def main() -> int:
    """Serve the app on 127.0.0.1:PORT until SIGTERM."""
    port, namespace = int(sys.argv[1]), sys.argv[2]
    loop = sys.argv[3] if len(sys.argv) > 3 else "uvloop"
    if HTTP_IMPL == "h11":
        print("warning: httptools is not installed; uvicorn falls back to h11", file=sys.stderr)
    settings = settings_for(namespace, "classic")
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        loop=loop,
        http=HTTP_IMPL,
        workers=1,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
