"""The blocking client's `Portal` without a broker: run, re-raise, deadlines, slots, close, fork.

Each test calls the portal from the test's thread (or a pool) and runs small coroutine functions
on the portal's own loop thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from service import blocking
from service._protocol.errors import (
    ClientUnusable,
    ConnectionLost,
    DeadlineExceeded,
    ResourceExhausted,
)
from service.blocking import Portal

__all__: list[str] = []


class Shutdown:
    """The portal's `shutdown` coroutine function; records that it ran."""

    def __init__(self) -> None:
        self.ran = False

    async def __call__(self) -> None:
        self.ran = True


@pytest.fixture
def shutdown() -> Shutdown:
    """A fresh shutdown recorder."""
    return Shutdown()


@pytest.fixture
def portal(shutdown: Shutdown) -> Iterator[Portal]:
    """A portal with two slots; closed after the test."""
    made = Portal(2, shutdown)
    yield made
    made.close(timeout=5)


async def add(deadline: float, a: int, b: int) -> tuple[int, float]:
    """The sum of `a` and `b`, and the deadline the portal handed over."""
    return a + b, deadline


async def forever(deadline: float, entered: threading.Event, left: threading.Event) -> None:
    """Signal `entered`, wait until cancelled, then signal `left`."""
    entered.set()
    try:
        await asyncio.Event().wait()
    finally:
        left.set()


def test_runs_a_coroutine_and_returns_its_value(portal: Portal) -> None:
    """`call(fn, *args)` runs `fn(deadline, *args)` on the loop thread and returns its value."""
    before = time.monotonic()
    total, deadline = portal.call(add, 2, 3, timeout=10)
    assert total == 5
    assert before + 10 <= deadline <= time.monotonic() + 10
    assert portal.busy == 0


def test_runs_on_the_loop_thread(portal: Portal) -> None:
    """The coroutine runs on the portal's thread, never on the caller's."""

    async def thread_name(deadline: float) -> str:
        return threading.current_thread().name

    assert portal.call(thread_name, timeout=5) == "burrow-client"


def test_reraises_the_coroutines_exception(portal: Portal) -> None:
    """An exception raised by the coroutine reaches the caller unchanged, TimeoutError too."""

    async def fail(deadline: float, exc: BaseException) -> None:
        raise exc

    with pytest.raises(KeyError, match="missing"):
        portal.call(fail, KeyError("missing"), timeout=5)
    with pytest.raises(TimeoutError, match="its own"):
        portal.call(fail, TimeoutError("its own"), timeout=5)
    assert portal.busy == 0


def test_times_out_with_the_deadline(portal: Portal, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coroutine that ignores its deadline ends in DeadlineExceeded and is cancelled."""
    monkeypatch.setattr(blocking, "_MARGIN", 0.05)
    entered, left = threading.Event(), threading.Event()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not answer"):
        portal.call(forever, entered, left, timeout=0.1)
    assert time.monotonic() - started >= 0.15
    assert entered.is_set()
    assert left.wait(5)
    assert portal.busy == 0


def test_refuses_a_non_positive_timeout(portal: Portal) -> None:
    """A timeout of zero or less is a ValueError, before anything runs."""
    with pytest.raises(ValueError, match="positive"):
        portal.call(add, 1, 1, timeout=0)


def test_slot_wait_past_the_deadline_is_resource_exhausted(shutdown: Shutdown) -> None:
    """With every slot held, a caller that would wait past its deadline gets ResourceExhausted."""
    portal = Portal(1, shutdown)
    entered, release = threading.Event(), threading.Event()

    async def hold(deadline: float) -> str:
        entered.set()
        await asyncio.to_thread(release.wait)
        return "held"

    try:
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(lambda: portal.call(hold, timeout=10))
            assert entered.wait(5)
            assert portal.busy == 1
            with pytest.raises(ResourceExhausted) as caught:
                portal.call(add, 1, 1, timeout=0.1)
            assert caught.value.details == {"max_in_flight": 1}
            waiting = pool.submit(lambda: portal.call(add, 1, 1, timeout=10))
            release.set()
            assert held.result(5) == "held"
            assert waiting.result(5)[0] == 2
        assert portal.busy == 0
    finally:
        release.set()
        portal.close(timeout=5)


def test_refuses_after_close(portal: Portal, shutdown: Shutdown) -> None:
    """close() awaits `shutdown`; then every call raises ClientUnusable; closing twice is fine."""
    portal.close(timeout=5)
    portal.close(timeout=5)
    assert shutdown.ran
    assert portal.closed
    with pytest.raises(ClientUnusable, match="closed"):
        portal.call(add, 1, 1, timeout=5)
    with pytest.raises(ClientUnusable, match="closed"):
        portal.check()


def test_close_fails_pending_calls_with_connection_lost(portal: Portal) -> None:
    """A call still running when the portal closes fails with ConnectionLost, not a timeout."""
    entered, left = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: portal.call(forever, entered, left, timeout=30))
        assert entered.wait(5)
        portal.close(timeout=5)
        with pytest.raises(ConnectionLost):
            pending.result(5)
    assert left.is_set()


def test_refuses_a_call_from_its_own_loop_thread(portal: Portal) -> None:
    """A blocking call made on the loop thread raises instead of deadlocking it."""

    async def reenter(deadline: float) -> None:
        portal.call(add, 1, 1, timeout=5)

    with pytest.raises(RuntimeError, match="deadlock"):
        portal.call(reenter, timeout=5)


def test_refuses_in_a_forked_child(portal: Portal) -> None:
    """In a child of fork() the inherited portal refuses calls and close() is a no-op."""
    assert portal.call(add, 1, 1, timeout=5)[0] == 2
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a threaded process is risky: that risk is the test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and never returns
        try:
            os.close(read_end)
            outcome: dict[str, object] = {"closed": portal.closed}
            try:
                portal.call(add, 1, 1, timeout=5)
            except ClientUnusable as exc:
                outcome["refused"] = str(exc)
            portal.close(timeout=1)  # must be a quiet no-op in the child
            os.write(write_end, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reported = json.loads(report)
    assert reported["closed"] is True
    assert f"created in pid {os.getpid()} used in pid {pid} after fork()" in reported["refused"]
    assert portal.call(add, 2, 2, timeout=5)[0] == 4


def test_a_thread_reusing_the_ended_loop_threads_ident_may_close_and_is_refused_calls(
    portal: Portal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the loop thread ended, a thread the OS gave the same ident closes again quietly
    and gets ClientUnusable for a call (thread idents are reused; identity is not)."""
    portal.close(timeout=5)
    ended = portal._thread.ident
    assert ended is not None
    monkeypatch.setattr(threading, "get_ident", lambda: ended)
    portal.close(timeout=5)
    with pytest.raises(ClientUnusable, match="closed"):
        portal.call(add, 1, 2, timeout=5)
