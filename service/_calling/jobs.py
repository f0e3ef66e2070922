"""Submitted work: job ids, and the handle a caller awaits.

A submit names a job id and the submitter's direct reply-to address. The service records the
job in its result store (`service._stores`) and, when it ends, publishes the completion to
that address, as the `<service>.<op>.completed|failed` event, and to the callback route if one
was named. The submitter's `Job` is resolved by that push; a handle made anywhere else (or one
whose push can no longer arrive: the connection was replaced) reads the record instead.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service._protocol import codec, envelope
from service._protocol.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from service._protocol.jobs import JobStatus, valid_job_id
from service._protocol.types import Delivery
from service._protocol.vocabulary import (
    JOB_ID_PATTERN,
)

_JOB_ID = re.compile(JOB_ID_PATTERN)
_ROUTE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,15}$")
_FIRST_PAUSE, _MAX_PAUSE = 0.05, 1.0  # seconds between reads of the record while waiting

# How a handle reads a job's record: (job id, route) → its status, or None when unknown.
Reader = Callable[[str, str], Awaitable["JobStatus | None"]]


class Job:
    """A handle on submitted work: `await job.result()`.

    Args:
        reader: how to read the job's record (the `Client` asks the service, or its store).
        pushed: the completion will be pushed to this process (it submitted the job).
    """

    def __init__(self, job_id: str, route: str, reader: Reader, *, pushed: bool = False) -> None:
        if valid_job_id(job_id) is None:
            raise InvalidArgument(f"not a job id: {job_id[:80]!r}")
        self.id = job_id
        self.route = route
        self._reader = reader
        self._submitted = pushed
        self._push: asyncio.Future[JobStatus] | None = (
            asyncio.get_running_loop().create_future() if pushed else None
        )

    def __repr__(self) -> str:
        return f"Job({self.id!r}, route={self.route!r})"

    def deliver(self, delivery: Delivery) -> None:
        """The completion arrived on the reply consumer (called by `RpcClient`)."""
        if self._push is None or self._push.done():
            return
        try:
            failed = envelope.failed(delivery.headers)
            status = JobStatus.ended(self.id, codec.decode_answer(delivery.body), failed=failed)
            self._push.set_result(status)
        except ServiceError as exc:  # unreadable: say so where the result is awaited
            self._push.set_exception(exc)

    def lost(self) -> None:
        """The reply address changed (connection lost): the push can no longer arrive."""
        if self._push is not None and not self._push.done():
            self._push.cancel()

    async def status(self) -> JobStatus:
        """Read the job's record once.

        Raises:
            NotFound: no service has received the job yet, or its result expired.
        """
        if self._push is not None and self._push.done() and not self._push.cancelled():
            return self._push.result()
        found = await self._reader(self.id, self.route)
        if found is None:
            raise NotFound(f"job {self.id!r}: not received by a service yet, or expired")
        return found

    async def finished(self, timeout: float = 30.0) -> JobStatus:
        """Wait at most `timeout` seconds for the job to end; its final status.

        A read that fails retryably (the service overloaded or away) is tried again.

        Raises:
            DeadlineExceeded: it is running (or, submitted here, not started) at the deadline.
            NotFound: no record of it appeared before the deadline (unknown, or expired).
            ServiceError: every read up to the deadline failed (e.g. `Unavailable`).
        """
        deadline = time.monotonic() + timeout
        push = self._push
        if push is not None:
            if not push.done():  # (most results are awaited after they arrived: no timer then)
                await asyncio.wait([push], timeout=max(0.0, timeout))
            if push.done() and not push.cancelled():
                return push.result()
            if not push.done():
                raise DeadlineExceeded(f"job {self.id!r} did not finish within {timeout:.3f}s")
        seen, pause = self._submitted, _FIRST_PAUSE
        answered: ServiceError | None = None  # a retryable failure of the last read, if any
        while True:
            try:
                found = await self._reader(self.id, self.route)
                answered = None
            except ServiceError as exc:
                if not exc.retryable:
                    raise
                found, answered = None, exc  # the store or service is away, or overloaded
            if found is not None and found.finished:
                return found
            seen = seen or found is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if seen:
                    raise DeadlineExceeded(f"job {self.id!r} did not finish within {timeout:.3f}s")
                if answered is not None:
                    raise answered
                raise NotFound(f"job {self.id!r}: not received by a service, or expired")
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_PAUSE)

    async def result(self, timeout: float = 30.0) -> Any:
        """Wait for the job's result (decoded JSON); raise its error if it failed.

        Raises:
            NotFound: unknown job, or its result expired.
            DeadlineExceeded: not finished within `timeout` seconds.
        """
        status = await self.finished(timeout)
        if status.error is not None:
            raise status.error
        return status.result
