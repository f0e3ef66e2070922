"""Submitted work: job ids, where completions go, and the handle a caller awaits.

A submit names a job id; the caller declares `<ns>.job.<id>` (durable, expiring when unused)
before publishing. On completion the service publishes the result (or error) there, as the
`<service>.<op>.completed|failed` event, and to the caller's callback route if it named one.
"""

from __future__ import annotations

import re
from typing import Any

from service import codec
from service.errors import InvalidArgument, error_from_wire
from service.link import Link
from service.topology import Names, QueueDecl
from service.types import Delivery
from service.vocabulary import (
    ARG_EXPIRES,
    ARG_QUEUE_TYPE,
    H_CALLBACK,
    H_JOB_ID,
    H_STATUS,
    JOB_ID_PATTERN,
    Status,
)

__all__ = [
    "H_JOB_ID",
    "H_CALLBACK",
    "valid_job_id",
    "job_queue_decl",
    "Job",
]

_JOB_ID = re.compile(JOB_ID_PATTERN)
_ROUTE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,15}$")


def valid_job_id(value: object) -> str | None:
    """The job id if it is safe to use in a queue name, else None."""
    return value if isinstance(value, str) and _JOB_ID.match(value) else None


def valid_callback(value: object) -> str | None:
    """The callback routing key if well-formed (plain words, no wildcards), else None."""
    return value if isinstance(value, str) and len(value) <= 255 and _ROUTE.match(value) else None


def job_queue_decl(names: Names, job_id: str, ttl_s: float) -> QueueDecl:
    """The queue holding one job's completion; RabbitMQ deletes it after `ttl_s` unused."""
    return QueueDecl(
        names.job_queue(job_id),
        {ARG_QUEUE_TYPE: "classic", ARG_EXPIRES: max(1000, int(ttl_s * 1000))},
    )


class Job:
    """A handle on submitted work; `await job.result()` from any process that knows the id."""

    def __init__(self, job_id: str, route: str, link: Link, names: Names) -> None:
        if valid_job_id(job_id) is None:
            raise InvalidArgument(f"not a job id: {job_id[:80]!r}")
        self.id = job_id
        self.route = route
        self._link = link
        self._names = names

    def __repr__(self) -> str:
        return f"Job({self.id!r}, route={self.route!r})"

    async def completion(self, timeout: float) -> Delivery:
        """The raw completion message, left in place so it can be read again."""
        return await self._link.peek(self._names.job_queue(self.id), timeout)

    async def result(self, timeout: float = 30.0) -> Any:
        """Wait for the job's result (decoded JSON); raise its error if it failed.

        Raises:
            NotFound: unknown job, or its result expired.
            DeadlineExceeded: not finished within `timeout` seconds.
        """
        delivery = await self.completion(timeout)
        if delivery.headers.get(H_STATUS) == Status.ERROR:
            raise error_from_wire(codec.decode_json(delivery.body))
        return codec.decode_json(delivery.body)
