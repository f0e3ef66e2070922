"""An aiohttp HTTP API in front of the `calc` service: fast operations answer at once (`call`),
slow ones are accepted as jobs (`submit`, 202 + Location) and polled at GET /jobs/{id}.

Run it next to `burrow run service.example:calc`:  python -m examples.http_api  (port 8080)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from examples.http_errors import (
    HttpAnswer,
    error_answer,
    job_accepted,
    job_answer,
    parse_json,
    parse_seconds,
)
from service import Client, DeadlineExceeded, ServiceError

__all__ = ["CLIENT", "create_app", "main"]

CLIENT = web.AppKey("burrow_client", Client)
_OP = r"{op:[a-z][a-z0-9_]*}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(client: Client | None = None) -> web.Application:
    """The app; without `client` it opens its own from `BURROW_*` settings while it runs."""
    app = web.Application(middlewares=[burrow_errors])
    if client is not None:
        app[CLIENT] = client
    else:
        app.cleanup_ctx.append(_own_client)
    app.router.add_post(f"/calc/{_OP}", call_operation)
    app.router.add_post(f"/calc/{_OP}/jobs", submit_operation)
    app.router.add_get("/jobs/{job_id}", get_job)
    return app


async def _own_client(app: web.Application) -> AsyncIterator[None]:
    # One client for the whole process, shared by every request handler.
    async with Client() as client:
        app[CLIENT] = client
        yield


@web.middleware
async def burrow_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every Burrow error with its mapped HTTP status (examples/http_errors.py)."""
    try:
        return await handler(request)
    except ServiceError as exc:
        return _respond(error_answer(exc))


async def call_operation(request: web.Request) -> web.Response:
    """POST /calc/{op}[?timeout=s]: call the operation and answer with its reply."""
    payload = parse_json(await request.read())
    timeout = parse_seconds(request.query.get("timeout"), "timeout")
    reply = await request.app[CLIENT].call(
        f"calc.{request.match_info['op']}", payload, timeout=timeout
    )
    return web.json_response(reply)


async def submit_operation(request: web.Request) -> web.Response:
    """POST /calc/{op}/jobs: submit the operation; 202 with the job id and where to poll."""
    payload = parse_json(await request.read())
    job = await request.app[CLIENT].submit(f"calc.{request.match_info['op']}", payload)
    return _respond(job_accepted(job.id))


async def get_job(request: web.Request) -> web.Response:
    """GET /jobs/{id}[?wait=s]: the job's state, waiting up to `wait` seconds for it to end."""
    wait = parse_seconds(request.query.get("wait"), "wait", default=0.5)
    assert wait is not None
    job = request.app[CLIENT].job(request.match_info["job_id"])
    try:
        status = await job.finished(wait)
    except DeadlineExceeded:
        status = None
    return _respond(job_answer(job.id, status))


def _respond(answer: HttpAnswer) -> web.Response:
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


def main() -> None:
    """Serve the API on port 8080."""
    web.run_app(create_app(), port=8080)


if __name__ == "__main__":
    main()
