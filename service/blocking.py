"""`BlockingClient`: the `Client` for synchronous code — threads, scripts, WSGI apps, Celery tasks.

One background thread runs an event loop and one async `Client`; every blocking method hands a
coroutine to that loop and waits, so all AMQP I/O happens on one thread over one connection.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, overload

import structlog
from pydantic import BaseModel

from service.client import Client
from service.config import Settings, load_settings
from service.errors import (
    ClientUnusable,
    ConnectionLost,
    DeadlineExceeded,
    ResourceExhausted,
)
from service.jobs import Job
from service.registry import Operation
from service.types import Delivery

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "ClientUnusable",
    "BlockingClient",
    "BlockingJob",
    "get_client",
]

M = TypeVar("M", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)
T = TypeVar("T")

DEFAULT_MAX_IN_FLIGHT = 1000
# Extra seconds a caller waits past the call's own deadline: the loop thread raises
# `DeadlineExceeded` itself at the deadline, and this is only the safety net if it cannot.
_MARGIN = 1.0

_log = structlog.get_logger("burrow.blocking")


class BlockingClient:
    """Calls Burrow services from synchronous code; safe to share between threads.

    The connection is opened on first use (or by `start()`), re-established like the async
    client's, and closed by `close()` or at interpreter exit. A client belongs to the process
    that created it: after `fork()` the child must create its own (`get_client()` does).

    Args:
        settings: as for `Client` (default: from `BURROW_*` environment variables).
        max_in_flight: calls, submits and job waits running at once; a caller that would wait
            for a slot past its deadline gets `ResourceExhausted`.
        uvloop: run the loop thread on uvloop when it is installed.

    Example:
        client = BlockingClient()
        client.call("calc.add", {"a": 1, "b": 2})  # {"sum": 3}
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        uvloop: bool = True,
        **overrides: Any,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.settings = settings or load_settings(**overrides)
        self.max_in_flight = max_in_flight
        self.pid = os.getpid()
        self._client = Client(self.settings)
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._busy = 0  # slots taken; guarded by _lock
        self._lock = threading.Lock()  # orders submissions against close()
        self._closed = False
        self._connected = False  # read and written on the loop thread only
        self._stop = asyncio.Event()
        self._booted = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(
            target=self._serve, args=(uvloop,), name="burrow-client", daemon=True
        )
        self._thread.start()
        self._booted.wait()
        if self._loop is None:  # pragma: no cover - only if the loop could not be created
            raise ClientUnusable("the client's event loop thread failed to start")
        _process.live.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"BlockingClient(namespace={self.settings.namespace!r}, pid={self.pid}, {state})"

    @property
    def in_flight(self) -> int:
        """Calls, casts, submits and job waits running now (at most `max_in_flight`)."""
        return self._busy

    @property
    def closed(self) -> bool:
        """True once `close()` was called (or the client was inherited across a fork)."""
        return self._closed or self.pid != os.getpid()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Connect now instead of on first use; raise `Unavailable` if the broker is away."""
        limit = self.settings.connect_timeout if timeout is None else timeout
        self._run(lambda: self._connect(time.monotonic() + limit), limit + _MARGIN)

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the loop thread; pending calls fail with
        `ConnectionLost`. Idempotent; a no-op on a client inherited across a fork."""
        if self.pid != os.getpid():
            return  # the socket is the parent's: never send it a Close frame from here
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError("close() called on the client's own loop thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            _log.warning("client loop thread did not stop in time", timeout=timeout)
        _process.live.discard(self)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the Client API, blocking ------------------------------------------------------------

    @overload
    def call(
        self,
        operation: Operation[Any, Rep],
        payload: Any,
        *,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
    ) -> Rep: ...

    @overload
    def call(
        self,
        operation: str,
        payload: Any,
        *,
        reply: type[M],
        timeout: float | None = None,
        fallback_to_submit: bool = False,
    ) -> M: ...

    @overload
    def call(
        self,
        operation: str,
        payload: Any,
        *,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
    ) -> Any: ...

    def call(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        reply: type[BaseModel] | None = None,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
    ) -> Any:
        """Call an operation and wait for its reply, at most `timeout` seconds.

        Same arguments, replies and errors as `Client.call`; waiting for a free in-flight slot
        counts against the deadline and ends in `ResourceExhausted` if none frees in time.
        """
        timeout = self.settings.default_deadline if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        started = time.monotonic()

        async def call(deadline: float) -> Any:
            client = await self._connect(deadline)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"no reply within {timeout:.3f}s (still connecting)")
            # The overloads are ours to check (above); pass the arguments through unchanged.
            untyped_call: Callable[..., Awaitable[Any]] = client.call
            return await untyped_call(
                operation,
                payload,
                reply=reply,
                timeout=left,
                fallback_to_submit=fallback_to_submit,
            )

        return self._bounded(call, timeout, started)

    def cast(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
    ) -> str:
        """Fire-and-forget: return the message id once the broker confirmed it (`Client.cast`)."""

        async def cast(deadline: float) -> str:
            client = await self._connect(deadline)
            return await client.cast(operation, payload, delay=delay, at=at)

        return self._bounded(cast, self._publish_wait(), time.monotonic())

    def submit(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        callback: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
    ) -> BlockingJob:
        """Hand work over; return its `BlockingJob` once the broker confirmed it
        (`Client.submit`)."""

        async def submit(deadline: float) -> Job:
            client = await self._connect(deadline)
            return await client.submit(operation, payload, callback=callback, delay=delay, at=at)

        return BlockingJob(self, self._bounded(submit, self._publish_wait(), time.monotonic()))

    def job(self, job_id: str, route: str = "") -> BlockingJob:
        """A handle on a job submitted elsewhere, by its id."""
        self._check_usable()
        return BlockingJob(self, self._client.job(job_id, route))

    def emit(
        self,
        event: str,
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
    ) -> bool:
        """Publish a domain event (confirmed); False when no subscriber queue matched it."""

        async def emit(deadline: float) -> bool:
            client = await self._connect(deadline)
            return await client.emit(event, payload, delay=delay, at=at)

        return self._bounded(emit, self._publish_wait(), time.monotonic())

    # -- machinery ---------------------------------------------------------------------------

    def _serve(self, uvloop: bool) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory(uvloop)) as runner:
                runner.run(self._main())
        finally:
            self._booted.set()  # never leave the constructor waiting if the loop failed

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._booted.set()
        await self._stop.wait()
        await self._client.close()

    async def _connect(self, deadline: float) -> Client:
        """The async client, connected on first use within `deadline` (a monotonic time)."""
        if not self._connected:
            # After this first success the link reconnects by itself; calls made while it is
            # away wait for it within their own deadline, as with the async client.
            timeout = min(deadline - time.monotonic(), self.settings.connect_timeout)
            await self._client.start(timeout=max(0.001, timeout))
            self._connected = True
        return self._client

    def _publish_wait(self) -> float:
        # cast/submit/emit are bounded inside by publish_timeout (twice for submit: declare,
        # then publish), after connecting if this is the first use.
        return self.settings.connect_timeout + 2 * self.settings.publish_timeout

    def _bounded(
        self,
        work: Callable[[float], Coroutine[Any, Any, T]],
        timeout: float,
        started: float,
    ) -> T:
        """Run `work(deadline)` on the loop within one in-flight slot and `timeout` seconds.

        `deadline` is the monotonic time `timeout` seconds after `started`.
        """
        self._check_usable()
        if not self._slots.acquire(timeout=timeout):
            raise ResourceExhausted(
                f"{self.max_in_flight} calls already in flight on this client; none finished "
                f"within {timeout:.3f}s",
                details={"max_in_flight": self.max_in_flight},
            )
        with self._lock:
            self._busy += 1
        try:
            remaining = timeout - (time.monotonic() - started)
            if remaining <= 0:
                raise DeadlineExceeded(f"no free in-flight slot within {timeout:.3f}s")
            deadline = started + timeout
            return self._run(lambda: work(deadline), remaining + _MARGIN)
        finally:
            with self._lock:
                self._busy -= 1
            self._slots.release()

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]], wait: float) -> T:
        """Run a coroutine on the loop thread and wait at most `wait` seconds for it."""
        self._check_usable()
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError("a blocking call on the client's own loop thread would deadlock")
        with self._lock:
            if self._closed:
                raise ClientUnusable("this BlockingClient is closed")
            assert self._loop is not None
            future = asyncio.run_coroutine_threadsafe(make(), self._loop)
        try:
            return future.result(wait)
        except concurrent.futures.CancelledError:
            raise ConnectionLost("the client was closed while the call was pending") from None
        except TimeoutError:
            if future.done():
                raise  # the work itself raised it, not the wait
            future.cancel()
            raise DeadlineExceeded(f"the client's loop did not answer within {wait:.3f}s") from None
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: do not leave the call behind
            raise

    def _check_usable(self) -> None:
        if self.pid != os.getpid():
            raise ClientUnusable(
                f"BlockingClient created in pid {self.pid} used in pid {os.getpid()} after "
                "fork(); create one per process (get_client() does)"
            )
        if self._closed:
            raise ClientUnusable("this BlockingClient is closed")


class BlockingJob:
    """A handle on submitted work; `job.result()` blocks until it finished."""

    def __init__(self, client: BlockingClient, job: Job) -> None:
        self._client = client
        self._job = job
        self.id = job.id
        self.route = job.route

    def __repr__(self) -> str:
        return f"BlockingJob({self.id!r}, route={self.route!r})"

    def completion(self, timeout: float) -> Delivery:
        """The raw completion message (`Job.completion`), left in place to be read again."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        client, job = self._client, self._job

        async def completion(deadline: float) -> Delivery:
            await client._connect(deadline)
            return await job.completion(max(0.001, deadline - time.monotonic()))

        return client._bounded(completion, timeout, time.monotonic())

    def result(self, timeout: float = 30.0) -> Any:
        """Wait for the job's result (decoded JSON); raise its error if it failed.

        Raises:
            NotFound: unknown job, or its result expired.
            DeadlineExceeded: not finished within `timeout` seconds.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        client, job = self._client, self._job

        async def result(deadline: float) -> Any:
            await client._connect(deadline)
            return await job.result(timeout=max(0.001, deadline - time.monotonic()))

        return client._bounded(result, timeout, time.monotonic())


def _loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    if uvloop:
        try:
            import uvloop as _uvloop  # noqa: PLC0415 - optional speed-up
        except ImportError:  # pragma: no cover - uvloop is not on every platform
            pass
        else:
            return _uvloop.new_event_loop
    return asyncio.new_event_loop


# -- process-wide state: the shared client, exit and fork hooks --------------------------------


class _Process:
    """What this process knows about its clients; reset in a child after `fork()`."""

    def __init__(self) -> None:
        self.live: weakref.WeakSet[BlockingClient] = weakref.WeakSet()
        # Clients inherited across a fork stay referenced forever in the child: collecting
        # them would close the parent's event loop objects from here, which warns and helps
        # nobody.
        self.inherited: list[BlockingClient] = []
        self.default: BlockingClient | None = None
        self.lock = threading.Lock()

    def after_fork_in_child(self) -> None:
        self.inherited.extend(self.live)
        self.live = weakref.WeakSet()
        self.default = None
        # Another thread of the parent may have held the lock at the moment of the fork.
        self.lock = threading.Lock()

    def close_all(self) -> None:
        for client in list(self.live):
            if client.pid == os.getpid():
                client.close(timeout=client.settings.shutdown_grace)


_process = _Process()


def get_client(settings: Settings | None = None, **overrides: Any) -> BlockingClient:
    """The process-wide `BlockingClient`, created on first use in each process.

    Frameworks call this wherever they need a client: each gunicorn worker, Celery worker
    process or thread pool gets the one client of its own process. `settings` and `overrides`
    apply only when the client is created.
    """
    with _process.lock:
        client = _process.default
        if client is None or client.closed:
            client = _process.default = BlockingClient(settings, **overrides)
        return client


atexit.register(_process.close_all)
os.register_at_fork(after_in_child=_process.after_fork_in_child)
