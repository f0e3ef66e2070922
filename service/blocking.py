"""`BlockingClient`: the `Client` for synchronous code — threads, scripts, WSGI apps, Celery tasks.

One background thread (a `Portal`) runs an event loop and one async `Client`; every blocking
method hands a coroutine to that loop and waits, so all AMQP I/O happens on one thread.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import Any, TypeVar, TypeVarTuple, overload

from pydantic import BaseModel

from service._amqp.link import LinkFactory, Outbound
from service._amqp.transport import AmqpLink
from service._calling.client import Client, Headers, check_headers
from service._calling.jobs import Job
from service._observe.log import get_logger
from service._protocol.config import Settings, settings_from
from service._protocol.errors import (
    ClientUnusable,
    ConnectionLost,
    DeadlineExceeded,
    ResourceExhausted,
)
from service._protocol.jobs import JobStatus
from service._protocol.registry import Operation

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "ClientUnusable", "BlockingClient", "BlockingJob", "get_client"]

M = TypeVar("M", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_MAX_IN_FLIGHT = 1000
# Extra seconds a caller waits past the call's own deadline: the loop thread raises
# `DeadlineExceeded` itself at the deadline, and this is only the safety net if it cannot.
_MARGIN = 1.0

_log = get_logger("burrow.blocking")


class Portal:
    """The loop thread of a `BlockingClient`: runs coroutine functions for other threads.

    `call(fn, *args, timeout=…)` runs `fn(deadline, *args)` on the loop and blocks until it is
    done, in the shape of anyio's `BlockingPortal.call`; `deadline` (monotonic) lets `fn` hand
    the rest of the time on. A portal refuses every call once closed and after `fork()`.

    Args:
        slots: calls running at once; one that would wait for a slot past its deadline gets
            `ResourceExhausted`.
        shutdown: awaited on the loop by `close()`, before the loop stops.
        uvloop: run the loop on uvloop when it is installed.
    """

    def __init__(
        self, slots: int, shutdown: Callable[[], Awaitable[object]], *, uvloop: bool = True
    ) -> None:
        self.pid = os.getpid()
        self.slots = slots
        self.busy = 0  # slots taken; guarded by _lock
        self._free = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()  # orders submissions against close()
        self._closed = False
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        booted = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(uvloop, shutdown, booted), name="burrow-client", daemon=True
        )
        self._thread.start()
        booted.wait()
        if self._loop is None:  # pragma: no cover - only if the loop could not be created
            raise ClientUnusable("the client's event loop thread failed to start")

    @property
    def closed(self) -> bool:
        """True once `close()` was called, or in a process other than the creator's."""
        return self._closed or self.pid != os.getpid()

    def check(self) -> None:
        """Raise `ClientUnusable` if the portal is closed or was inherited across `fork()`."""
        if self.pid != os.getpid():
            raise ClientUnusable(
                f"BlockingClient created in pid {self.pid} used in pid {os.getpid()} after "
                "fork(); create one per process (get_client() does)"
            )
        if self._closed:
            raise ClientUnusable("this BlockingClient is closed")

    def call(
        self,
        fn: Callable[[float, *Ts], Coroutine[Any, Any, T]],
        *args: *Ts,
        timeout: float,
        slot: bool = True,
    ) -> T:
        """Run `fn(deadline, *args)` on the loop and return its result, or raise its exception.

        `deadline` is `timeout` seconds from now, slot wait included; should the loop not end
        the call by then, this thread gives up `_MARGIN` later. `slot=False` takes no slot.

        Raises:
            ValueError: `timeout` is not positive (for a call that holds a slot).
            ClientUnusable: the portal is closed, or was created in another process.
            ResourceExhausted: no slot freed within `timeout`.
            DeadlineExceeded: the loop did not answer by `_MARGIN` past the deadline.
            ConnectionLost: the portal was closed while the call was pending.
        """
        if slot and timeout <= 0:
            raise ValueError("timeout must be positive")
        self.check()
        if threading.current_thread() is self._thread:  # idents are reused once it ends
            raise RuntimeError("a blocking call on the client's own loop thread would deadlock")
        deadline = time.monotonic() + timeout
        with self._slot(timeout, deadline) if slot else nullcontext():
            with self._lock:
                if self._closed or not self._thread.is_alive():
                    raise ClientUnusable("this BlockingClient is closed")
                assert self._loop is not None
                future = asyncio.run_coroutine_threadsafe(fn(deadline, *args), self._loop)
            wait = deadline - time.monotonic() + _MARGIN
            try:
                return future.result(wait)
            except concurrent.futures.CancelledError:
                raise ConnectionLost("the client was closed while the call was pending") from None
            except TimeoutError:
                if future.done():
                    raise  # the work itself raised it, not the wait
                future.cancel()
                raise DeadlineExceeded(
                    f"the client's loop did not answer within {wait:.3f}s"
                ) from None
            except BaseException:
                future.cancel()  # e.g. KeyboardInterrupt while waiting: do not leave it behind
                raise

    def close(self, timeout: float) -> None:
        """Run `shutdown` and stop the loop thread. Idempotent; a no-op after `fork()`."""
        if self.pid != os.getpid():
            return  # the socket is the parent's: never send it a Close frame from here
        if threading.current_thread() is self._thread:  # idents are reused once it ends
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

    @contextmanager
    def _slot(self, timeout: float, deadline: float) -> Iterator[None]:
        """Hold one slot, waiting for it until `deadline` at most."""
        if not self._free.acquire(timeout=timeout):
            raise ResourceExhausted(
                f"{self.slots} calls already in flight on this client; none finished "
                f"within {timeout:.3f}s",
                details={"max_in_flight": self.slots},
            )
        with self._lock:
            self.busy += 1
        try:
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"no free in-flight slot within {timeout:.3f}s")
            yield
        finally:
            with self._lock:
                self.busy -= 1
            self._free.release()

    def _serve(
        self, uvloop: bool, shutdown: Callable[[], Awaitable[object]], booted: threading.Event
    ) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            booted.set()
            await self._stop.wait()
            await shutdown()

        try:
            with asyncio.Runner(loop_factory=_loop_factory(uvloop)) as runner:
                runner.run(main())
        finally:
            booted.set()  # never leave the constructor waiting if the loop failed


class BlockingClient:
    """Calls Burrow services from synchronous code; safe to share between threads.

    The connection is opened on first use (or by `start()`), re-established like the async
    client's, and closed by `close()` or at interpreter exit. A client belongs to the process
    that created it: after `fork()` the child must create its own (`get_client()` does).

    Args:
        settings, link_factory, outbound, overrides: as for `Client` (default settings: from
            `BURROW_*` environment variables); an override that is no setting raises
            `ConfigError` naming the closest one.
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
        link_factory: LinkFactory = AmqpLink,
        outbound: Sequence[Outbound] = (),
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        uvloop: bool = True,
        **overrides: Any,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        arguments = ("settings", "link_factory", "outbound", "max_in_flight", "uvloop")
        self.settings = settings_from(settings, overrides, arguments)
        self.max_in_flight = max_in_flight
        self._client = Client(self.settings, link_factory=link_factory, outbound=outbound)
        self._started = False  # read and written on the loop thread only
        # cast/submit/emit are bounded inside by publish_timeout (twice for submit: declare,
        # then publish), after connecting if this is the first use.
        self._publish_wait = self.settings.connect_timeout + 2 * self.settings.publish_timeout
        self._portal = Portal(max_in_flight, self._client.close, uvloop=uvloop)
        self.pid = self._portal.pid
        _process.live.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._portal.closed else "open"
        return f"BlockingClient(namespace={self.settings.namespace!r}, pid={self.pid}, {state})"

    @property
    def in_flight(self) -> int:
        """Calls, casts, submits and job waits running now (at most `max_in_flight`)."""
        return self._portal.busy

    @property
    def closed(self) -> bool:
        """True once `close()` was called (or the client was inherited across a fork)."""
        return self._portal.closed

    def start(self, timeout: float | None = None) -> None:
        """Connect now instead of on first use; raise `Unavailable` if the broker is away."""
        limit = self.settings.connect_timeout if timeout is None else timeout
        self._portal.call(self._connect, timeout=limit, slot=False)

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the loop thread; pending calls fail with
        `ConnectionLost`. Idempotent; a no-op on a client inherited across a fork."""
        self._portal.close(timeout)
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

    @overload
    def call(
        self,
        operation: Operation[Any, Rep],
        payload: Any,
        *,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
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
        headers: Headers | None = None,
    ) -> M: ...

    @overload
    def call(
        self,
        operation: str,
        payload: Any,
        *,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
    ) -> Any: ...

    def call(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        reply: type[BaseModel] | None = None,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
    ) -> Any:
        """Call an operation and wait for its reply, at most `timeout` seconds.

        Same arguments (`headers=` included), replies and errors as `Client.call`; waiting for
        a free in-flight slot counts against the deadline and ends in `ResourceExhausted` if
        none frees in time.
        """
        timeout = self.settings.default_deadline if timeout is None else timeout
        # The overloads are ours to check (above); pass the arguments through unchanged.
        untyped_call: Callable[..., Awaitable[Any]] = self._client.call
        work = partial(
            untyped_call,
            operation,
            payload,
            reply=reply,
            fallback_to_submit=fallback_to_submit,
            headers=check_headers(headers),  # refused here, on the caller's thread
        )
        return self._portal.call(self._call, work, timeout=timeout)

    def cast(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
    ) -> str:
        """Fire-and-forget: return the message id once the broker confirmed it (`Client.cast`)."""
        work = partial(
            self._client.cast,
            operation,
            payload,
            delay=delay,
            at=at,
            headers=check_headers(headers),
        )
        return self._portal.call(self._publish, work, timeout=self._publish_wait)

    def submit(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        callback: str | None = None,
        callback_data: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
    ) -> BlockingJob:
        """Hand work over; return its `BlockingJob` once the broker confirmed it
        (`Client.submit`)."""
        work = partial(
            self._client.submit,
            operation,
            payload,
            callback=callback,
            callback_data=callback_data,
            delay=delay,
            at=at,
            headers=check_headers(headers),
        )
        return BlockingJob(self, self._portal.call(self._publish, work, timeout=self._publish_wait))

    def job(self, job_id: str, route: str = "", *, headers: Headers | None = None) -> BlockingJob:
        """A handle on a job submitted elsewhere, by its id (`Client.job`)."""
        self._portal.check()
        return BlockingJob(self, self._client.job(job_id, route, headers=headers))

    def emit(
        self,
        event: str,
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
    ) -> bool:
        """Publish a domain event (confirmed); False when no subscriber queue matched it."""
        work = partial(
            self._client.emit, event, payload, delay=delay, at=at, headers=check_headers(headers)
        )
        return self._portal.call(self._publish, work, timeout=self._publish_wait)

    # -- the coroutines the portal runs, on the loop thread ----------------------------------

    async def _connect(self, deadline: float) -> Client:
        """The async client, connected on first use within `deadline` (a monotonic time)."""
        if not self._started:
            # After this first success the link reconnects by itself; calls made while it is
            # away wait for it within their own deadline, as with the async client.
            timeout = min(deadline - time.monotonic(), self.settings.connect_timeout)
            await self._client.start(timeout=max(0.001, timeout))
            self._started = True
        return self._client

    async def _publish(self, deadline: float, work: Callable[[], Awaitable[T]]) -> T:
        """`work()` once connected: a cast, submit or emit (bounded by `publish_timeout`)."""
        await self._connect(deadline)
        return await work()

    async def _wait(self, deadline: float, wait: Callable[[float], Awaitable[T]]) -> T:
        """`wait(seconds left)` once connected: a job's result or final status."""
        await self._connect(deadline)
        return await wait(max(0.001, deadline - time.monotonic()))

    async def _call(self, deadline: float, work: Callable[..., Awaitable[Any]]) -> Any:
        """`work(timeout=…)`, a `Client.call`, once connected, given the time left (none
        left: `DeadlineExceeded`)."""
        await self._connect(deadline)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("no reply within the deadline (still connecting)")
        return await work(timeout=left)


class BlockingJob:
    """A handle on submitted work; `job.result()` blocks until it finished."""

    def __init__(self, client: BlockingClient, job: Job) -> None:
        self._client = client
        self._job = job
        self.id = job.id
        self.route = job.route

    def __repr__(self) -> str:
        return f"BlockingJob({self.id!r}, route={self.route!r})"

    def finished(self, timeout: float = 30.0) -> JobStatus:
        """Wait at most `timeout` seconds for the job to end (`Job.finished`); its status.

        Raises:
            DeadlineExceeded: still running at the deadline.
            NotFound: no record of it appeared before the deadline (unknown, or expired).
        """
        return self._client._portal.call(self._client._wait, self._job.finished, timeout=timeout)

    def result(self, timeout: float = 30.0) -> Any:
        """Wait for the job's result (decoded JSON); raise its error if it failed.

        Raises:
            NotFound: unknown job, or its result expired.
            DeadlineExceeded: not finished within `timeout` seconds.
        """
        return self._client._portal.call(self._client._wait, self._job.result, timeout=timeout)


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
