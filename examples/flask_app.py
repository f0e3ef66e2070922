"""A Flask (WSGI) app in front of the `calc` service, the blocking twin of examples/http_api.py:
the same routes and error statuses, made with the process-wide `BlockingClient`.

Run it next to `burrow run service.example:calc`, e.g. under gunicorn with pre-forked workers:
    gunicorn -w 4 'examples.flask_app:create_app()'
Each worker gets its own client on first use (`get_client()`); none is inherited across fork.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from examples.http_errors import (
    HttpAnswer,
    error_answer,
    job_accepted,
    job_answer,
    parse_json,
    parse_seconds,
)
from service import DeadlineExceeded, ServiceError
from service.blocking import BlockingClient, get_client

__all__ = ["create_app"]


def create_app(client: BlockingClient | None = None) -> Flask:
    """The app; without `client` every request uses this process's `get_client()`."""
    app = Flask(__name__)

    def burrow() -> BlockingClient:
        # Resolved per request, never at import: a client made in a gunicorn master before
        # the fork would be refused in every worker.
        return client if client is not None else get_client()

    @app.errorhandler(ServiceError)
    def burrow_error(exc: ServiceError) -> Response:
        """Answer every Burrow error with its mapped HTTP status (examples/http_errors.py)."""
        return _respond(error_answer(exc))

    @app.post("/calc/<op>")
    def call_operation(op: str) -> Response:
        """POST /calc/{op}[?timeout=s]: call the operation and answer with its reply."""
        payload = parse_json(request.get_data())
        timeout = parse_seconds(request.args.get("timeout"), "timeout")
        return jsonify(burrow().call(f"calc.{op}", payload, timeout=timeout))

    @app.post("/calc/<op>/jobs")
    def submit_operation(op: str) -> Response:
        """POST /calc/{op}/jobs: submit the operation; 202 with the job id and where to poll."""
        job = burrow().submit(f"calc.{op}", parse_json(request.get_data()))
        return _respond(job_accepted(job.id))

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str) -> Response:
        """GET /jobs/{id}[?wait=s]: the job's state, waiting up to `wait` seconds for it."""
        wait = parse_seconds(request.args.get("wait"), "wait", default=0.5)
        assert wait is not None
        job = burrow().job(job_id)
        try:
            status = job.finished(wait)
        except DeadlineExceeded:
            status = None
        return _respond(job_answer(job.id, status))

    return app


def _respond(answer: HttpAnswer) -> Response:
    response = jsonify(answer.body)
    response.status_code = answer.status
    response.headers.update(answer.headers)
    return response
