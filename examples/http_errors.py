"""Burrow outcomes as HTTP answers, shared by both example apps: error codes to statuses,
request parameters to call options, job completions to status bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from service import InvalidArgument, JobStatus, ServiceError
from service.gateway import HTTP_STATUS, RETRY_AFTER_S, http_status, retry_after

__all__ = [
    "HTTP_STATUS",
    "RETRY_AFTER_S",
    "HttpAnswer",
    "error_answer",
    "parse_json",
    "parse_seconds",
    "job_answer",
    "job_accepted",
]

# The status per code and Retry-After are the gateway's (`burrow gateway`): `service.gateway`
# defines them once, so both ways of putting HTTP in front of Burrow agree.

MAX_WAIT_S = 25.0  # longest call timeout or job long-poll a request may ask for


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A framework-neutral response: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_answer(exc: ServiceError) -> HttpAnswer:
    """The HTTP answer for a Burrow error: its status, `{"error": <wire body>}`, Retry-After."""
    return HttpAnswer(http_status(exc), {"error": exc.to_wire()}, retry_after(exc))


def parse_json(body: bytes) -> Any:
    """The request body as JSON; an unreadable body is the caller's INVALID_ARGUMENT."""
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise InvalidArgument("the request body is not JSON") from None


def parse_seconds(value: str | None, name: str, default: float | None = None) -> float | None:
    """A positive number of seconds from a query parameter, capped at MAX_WAIT_S."""
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidArgument(
            f"{name} must be a number of seconds", details={name: value}
        ) from None
    if not 0 < seconds <= MAX_WAIT_S:
        raise InvalidArgument(
            f"{name} must be above 0 and at most {MAX_WAIT_S:g}", details={name: value}
        )
    return seconds


def job_accepted(job_id: str) -> HttpAnswer:
    """202 Accepted for a submitted job, with where to poll for it."""
    location = f"/jobs/{job_id}"
    return HttpAnswer(
        202, {"job_id": job_id, "status": "pending", "location": location}, {"Location": location}
    )


def job_answer(job_id: str, status: JobStatus | None) -> HttpAnswer:
    """The state of a job: pending (not finished yet), done with its result, or failed.

    A failed job is still a job that exists, so it answers 200 with the error in the body;
    only an unknown or expired job is a 404 (raised by the lookup itself).
    """
    if status is None or not status.finished:
        return HttpAnswer(200, {"job_id": job_id, "status": "pending"}, {"Retry-After": "1"})
    if status.error is not None:
        error = status.error.to_wire()
        return HttpAnswer(200, {"job_id": job_id, "status": "failed", "error": error})
    return HttpAnswer(200, {"job_id": job_id, "status": "done", "result": status.result})
