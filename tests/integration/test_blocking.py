"""Integration tests of the blocking client on the real broker: threads, fork, exit, limits.

The services run on the test's event loop, so every blocking call is made from another thread
(`asyncio.to_thread`): blocking the loop thread would stop the service answering.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import warnings
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from service import (
    DeadlineExceeded,
    InvalidArgument,
    Model,
    NotFound,
    ResourceExhausted,
    Service,
    Settings,
)
from service._protocol.errors import ClientUnusable
from service.blocking import BlockingClient, get_client
from service.example import AddReply, calc
from tests.conftest import AMQP_URL, AppFactory

__all__: list[str] = []

BlockingFactory = Callable[..., BlockingClient]


@pytest.fixture
async def make_blocking(settings: Settings) -> AsyncIterator[BlockingFactory]:
    """BlockingClients on this test's namespace; closed after the test."""
    clients: list[BlockingClient] = []

    def make(**overrides: Any) -> BlockingClient:
        max_in_flight = overrides.pop("max_in_flight", 1000)
        client = BlockingClient(
            settings.model_copy(update=overrides) if overrides else settings,
            max_in_flight=max_in_flight,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await asyncio.to_thread(client.close)


async def test_threads_share_one_client(
    start_app: AppFactory, make_blocking: BlockingFactory
) -> None:
    """50 threads make 2,000 calls on one client and every reply reaches its own caller."""
    await start_app(calc)
    client = make_blocking()
    threads, per_thread = 50, 40

    def worker(t: int) -> list[tuple[int, int, int]]:
        out = []
        for i in range(per_thread):
            a, b = t * 100_000 + i, t
            out.append((a, b, client.call("calc.add", {"a": a, "b": b}, timeout=30)["sum"]))
        return out

    def run_all() -> list[tuple[int, int, int]]:
        with ThreadPoolExecutor(threads) as pool:
            return [row for rows in pool.map(worker, range(threads)) for row in rows]

    results = await asyncio.to_thread(run_all)
    assert len(results) == threads * per_thread
    assert len({(a, b) for a, b, _ in results}) == threads * per_thread
    assert all(total == a + b for a, b, total in results)
    assert client.in_flight == 0


async def test_call_raises_the_async_clients_errors(
    start_app: AppFactory, make_blocking: BlockingFactory
) -> None:
    """Remote errors, unknown operations and deadlines raise the same classes as `Client.call`."""
    await start_app(calc)
    client = make_blocking()

    def run() -> list[BaseException]:
        errors: list[BaseException] = []
        for operation, payload, timeout in [
            ("calc.divide", {"a": 1, "b": 0}, 5.0),
            ("calc.add", {"a": "x"}, 5.0),
            ("calc.nope", {}, 5.0),
            ("calc.slow_square", {"x": 2, "delay_ms": 3000}, 0.3),
        ]:
            try:
                client.call(operation, payload, timeout=timeout)
            except Exception as exc:
                errors.append(exc)
        return errors

    division, schema, unknown, slow = await asyncio.to_thread(run)
    assert isinstance(division, InvalidArgument)
    assert division.details == {"field": "b"}
    assert isinstance(schema, InvalidArgument)
    assert isinstance(unknown, NotFound)
    assert isinstance(slow, DeadlineExceeded)


async def test_typed_reply_is_validated(
    start_app: AppFactory, make_blocking: BlockingFactory
) -> None:
    """`reply=` or a declared Operation validates the answer into its model, as async does."""
    await start_app(calc)
    client = make_blocking()
    reply = await asyncio.to_thread(client.call, "calc.add", {"a": 4, "b": 5}, reply=AddReply)
    assert reply == AddReply(sum=9)
    typed = await asyncio.to_thread(client.call, calc.operations["add"], {"a": 1, "b": 1})
    assert typed == AddReply(sum=2)


async def test_submit_result_blocks_until_done(
    start_app: AppFactory, make_blocking: BlockingFactory
) -> None:
    """`submit` returns a job at once; `result()` blocks until it is done, also by id."""
    await start_app(calc)
    client = make_blocking()

    def run() -> tuple[str, Any, Any]:
        job = client.submit("calc.slow_square", {"x": 7, "delay_ms": 200})
        return job.id, job.result(timeout=10), client.job(job.id).result(timeout=10)

    job_id, first, again = await asyncio.to_thread(run)
    assert first == again == {"square": 49}
    assert len(job_id) == 32


async def test_job_errors(start_app: AppFactory, make_blocking: BlockingFactory) -> None:
    """A failed job raises its error; an unfinished one times out; one no service ever
    recorded is NotFound once the wait is over."""
    await start_app(calc)
    client = make_blocking()

    def run() -> list[BaseException]:
        errors: list[BaseException] = []
        failing = client.submit("calc.divide", {"a": 1, "b": 0})
        slow = client.submit("calc.slow_square", {"x": 1, "delay_ms": 5000})
        for job, timeout in [(failing, 10.0), (slow, 0.3), (client.job("no-such-job"), 1.0)]:
            try:
                job.result(timeout=timeout)
            except Exception as exc:
                errors.append(exc)
        return errors

    failed, pending, unknown = await asyncio.to_thread(run)
    assert isinstance(failed, InvalidArgument)
    assert failed.message == "division by zero"
    assert isinstance(unknown, NotFound)
    assert isinstance(pending, DeadlineExceeded)


async def test_cast_and_emit_are_confirmed(
    start_app: AppFactory, make_blocking: BlockingFactory
) -> None:
    """`cast` returns a message id once confirmed; `emit` tells whether a subscriber matched."""
    await start_app(calc)
    client = make_blocking()

    def run() -> tuple[str, bool, bool]:
        message_id = client.cast("calc.add", {"a": 1, "b": 1})
        matched = client.emit("calc.square.computed", {"x": 2, "square": 4})
        unmatched = client.emit("nobody.listens.here", {})
        return message_id, matched, unmatched

    message_id, matched, unmatched = await asyncio.to_thread(run)
    assert len(message_id) == 32
    assert matched is True
    assert unmatched is False


class Hold(Model):
    """A request that waits until the test lets it go."""

    n: int


async def test_in_flight_limit_raises_resource_exhausted(
    start_app: AppFactory, make_blocking: BlockingFactory
) -> None:
    """A caller that would wait for a slot past its deadline gets ResourceExhausted."""
    entered, release = asyncio.Event(), asyncio.Event()
    gate = Service("gate")

    @gate.operation()
    async def hold(req: Hold) -> Hold:
        """Answer once the test sets `release`."""
        entered.set()
        await release.wait()
        return req

    await start_app(gate)
    client = make_blocking(max_in_flight=1)
    held = asyncio.create_task(asyncio.to_thread(client.call, "gate.hold", {"n": 1}, timeout=20))
    async with asyncio.timeout(10):
        await entered.wait()
    assert client.in_flight == 1
    with pytest.raises(ResourceExhausted) as caught:
        await asyncio.to_thread(client.call, "gate.hold", {"n": 2}, timeout=0.2)
    assert caught.value.details == {"max_in_flight": 1}
    release.set()
    assert await held == {"n": 1}
    assert client.in_flight == 0
    assert await asyncio.to_thread(client.call, "gate.hold", {"n": 3}) == {"n": 3}


async def test_closed_client_refuses_calls(make_blocking: BlockingFactory) -> None:
    """After close() every call raises ClientUnusable; closing again is harmless."""
    client = make_blocking()
    await asyncio.to_thread(client.close)
    await asyncio.to_thread(client.close)
    assert client.closed
    with pytest.raises(ClientUnusable, match="closed"):
        client.call("calc.add", {"a": 1, "b": 2})


async def test_get_client_is_one_per_process(start_app: AppFactory, settings: Settings) -> None:
    """get_client() returns the same client every time until it is closed, then a new one."""
    await start_app(calc)
    first = get_client(settings)
    try:
        assert get_client() is first
        assert await asyncio.to_thread(first.call, "calc.add", {"a": 2, "b": 2}) == {"sum": 4}
    finally:
        await asyncio.to_thread(first.close)
    second = get_client(settings)
    try:
        assert second is not first
        assert not second.closed
    finally:
        await asyncio.to_thread(second.close)


async def test_fork_after_use_is_refused(
    start_app: AppFactory, make_blocking: BlockingFactory, settings: Settings
) -> None:
    """A forked child may not use the inherited client, may make its own; the parent's works."""
    await start_app(calc)
    client = make_blocking()
    assert await asyncio.to_thread(client.call, "calc.add", {"a": 1, "b": 1}) == {"sum": 2}
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a threaded process is risky: that risk is the test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and never returns
        try:
            os.close(read_end)
            outcome: dict[str, Any] = {}
            try:
                client.call("calc.add", {"a": 1, "b": 2})
                outcome["inherited"] = "no error"
            except ClientUnusable as exc:
                outcome["inherited"] = str(exc)
            outcome["closed"] = client.closed
            client.close()  # must be a quiet no-op in the child
            with BlockingClient(settings) as own:
                outcome["own"] = own.call("calc.add", {"a": 20, "b": 22})
            os.write(write_end, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_end)

    def read_all() -> bytes:
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        report = await asyncio.wait_for(asyncio.to_thread(read_all), 30)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    outcome = json.loads(report)
    assert f"created in pid {os.getpid()} used in pid {pid} after fork()" in outcome["inherited"]
    assert outcome["closed"] is True
    assert outcome["own"] == {"sum": 42}
    assert await asyncio.to_thread(client.call, "calc.add", {"a": 3, "b": 4}) == {"sum": 7}


EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit
    import threading

    def report():
        # Registered first, so it runs last: after Burrow's own exit hook.
        alive = [t.name for t in threading.enumerate() if t.name == "burrow-client"]
        print("after-exit", shared.closed, other.closed, alive, flush=True)

    atexit.register(report)

    from service.blocking import BlockingClient, get_client

    shared = get_client()
    other = BlockingClient()
    print("sum", shared.call("calc.add", {"a": 2, "b": 3})["sum"], flush=True)
    job = other.submit("calc.slow_square", {"x": 3, "delay_ms": 10})
    print("square", job.result(10)["square"], flush=True)
    """
)


async def test_exit_without_close_is_clean(start_app: AppFactory, settings: Settings) -> None:
    """A script that never calls close() exits 0, closed by the exit hook, with nothing on
    stderr but Burrow's own info lines (connected, closed): no warning, no traceback."""
    await start_app(calc)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    env |= {"BURROW_AMQP_URL": AMQP_URL, "BURROW_NAMESPACE": settings.namespace}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "always",
        "-c",
        EXIT_SCRIPT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    noise = [line for line in stderr.decode().splitlines() if "[info     ] broker" not in line]
    assert noise == []
    assert "broker connection closed" in stderr.decode()  # the exit hook closed it
    assert process.returncode == 0
    lines = stdout.decode().splitlines()
    assert "sum 5" in lines
    assert "square 9" in lines
    assert "after-exit True True []" in lines
