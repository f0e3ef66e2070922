"""The `burrow` command against a calc service running in the test: call, cast, submit, job,
emit and tail, each run as a real subprocess with the test's namespace in its environment.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import Client
from service.example import calc
from tests.conftest import AMQP_URL, AppFactory
from tests.integration.test_async_support import WAIT, sample, wait_until

BURROW = str(Path(sys.prefix) / "bin" / "burrow")
RUN_TIMEOUT = 60.0  # a CLI run starts a fresh interpreter on a shared machine

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Run:
    """How one `burrow` run ended."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout as one JSON document."""
        return orjson.loads(self.stdout)


def burrow_env(namespace: str) -> dict[str, str]:
    """The environment of a `burrow` subprocess: this test's namespace and broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    env.update(BURROW_NAMESPACE=namespace, BURROW_AMQP_URL=AMQP_URL, BURROW_LOG_FORMAT="json")
    return env


async def burrow(namespace: str, *args: str) -> Run:
    """Run `burrow <args>` to completion without blocking the loop the App serves on."""
    return await run_burrow(*args, env=burrow_env(namespace))


async def run_burrow(*args: str, env: dict[str, str], cwd: Path | None = None) -> Run:
    """Run `burrow <args>` with `env` (in `cwd`) to completion, bounded by RUN_TIMEOUT."""
    process = await asyncio.create_subprocess_exec(
        BURROW,
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def test_call_prints_reply(start_app: AppFactory, namespace: str) -> None:
    """`burrow call calc.add` prints the reply as compact JSON and exits 0."""
    await start_app(calc)
    run = await burrow(namespace, "call", "calc.add", '{"a": 1, "b": 2}')
    assert (run.code, run.stdout) == (0, '{"sum":3}\n'), run.stderr


async def test_call_error_exits_1_with_code(start_app: AppFactory, namespace: str) -> None:
    """A remote error exits 1 and names its wire code on stderr, nothing on stdout."""
    await start_app(calc)
    run = await burrow(namespace, "call", "calc.divide", '{"a": 1, "b": 0}')
    assert run.code == 1
    assert "INVALID_ARGUMENT" in run.stderr
    assert run.stdout == ""


async def test_submit_wait_prints_result(start_app: AppFactory, namespace: str) -> None:
    """`burrow submit --wait` prints the job's result."""
    await start_app(calc)
    run = await burrow(
        namespace, "submit", "calc.slow_square", '{"x": 3, "delay_ms": 100}', "--wait"
    )
    assert (run.code, run.json()) == (0, {"square": 9}), run.stderr


async def test_submit_then_job_prints_result(start_app: AppFactory, namespace: str) -> None:
    """`burrow submit` prints a job id; `burrow job <id>`, another process, prints the result."""
    await start_app(calc)
    submitted = await burrow(namespace, "submit", "calc.slow_square", '{"x": 4, "delay_ms": 100}')
    assert submitted.code == 0, submitted.stderr
    job_id = submitted.json()["job_id"]
    assert isinstance(job_id, str)
    assert job_id

    run = await burrow(namespace, "job", job_id, "--timeout", "20")
    assert (run.code, run.json()) == (0, {"square": 16}), run.stderr


async def test_job_unknown_exits_1(start_app: AppFactory, namespace: str) -> None:
    """`burrow job` with an id nobody submitted exits 1 with NOT_FOUND."""
    await start_app(calc)
    run = await burrow(namespace, "job", "nobody-submitted-this", "--timeout", "5")
    assert run.code == 1
    assert "NOT_FOUND" in run.stderr


async def test_emit_prints_whether_routed(start_app: AppFactory, namespace: str) -> None:
    """`burrow emit` prints routed true for a subscribed event and false for an unheard one."""
    await start_app(calc)
    heard = await burrow(namespace, "emit", "calc.square.computed", '{"x": 2, "square": 4}')
    unheard = await burrow(namespace, "emit", "nobody.listens.here", "{}")
    assert (heard.code, heard.json()) == (0, {"routed": True}), heard.stderr
    assert (unheard.code, unheard.json()) == (0, {"routed": False}), unheard.stderr


async def test_cast_prints_message_id_and_runs(start_app: AppFactory, namespace: str) -> None:
    """`burrow cast` prints the message id once confirmed, and the service handles the command."""
    await start_app(calc)

    def handled() -> float:
        return sample(
            "burrow_messages_handled_total", service="calc", operation="calc.add", outcome="ok"
        )

    before = handled()
    run = await burrow(namespace, "cast", "calc.add", '{"a": 5, "b": 6}')
    assert run.code == 0, run.stderr
    message_id = run.json()["message_id"]
    assert isinstance(message_id, str)
    assert len(message_id) == 32
    await wait_until(lambda: handled() > before)


async def test_tail_prints_matching_events(
    start_app: AppFactory, client: Client, namespace: str
) -> None:
    """`burrow tail 'calc.#'` prints matching events as JSON lines; its queue goes when it exits."""
    await start_app(calc)
    process = await asyncio.create_subprocess_exec(
        BURROW,
        "tail",
        "calc.#",
        env=burrow_env(namespace),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        # calc's own subscription only hears calc.square.computed: this key routes to tail alone,
        # so `routed` turns True exactly when tail's queue is bound.
        async with asyncio.timeout(RUN_TIMEOUT):
            # The subprocess gives no other sign of readiness: poll, bounded.
            while not await client.emit("calc.tail.probe", {"n": 1}):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert await client.emit("calc.square.computed", {"x": 3, "square": 9})
        assert not await client.emit("other.square.computed", {"x": 3, "square": 9})
        lines = []
        for _ in range(2):
            async with asyncio.timeout(WAIT):
                lines.append(orjson.loads(await process.stdout.readline()))
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(WAIT):
            await process.wait()

    assert [(line["event"], line["body"]) for line in lines] == [
        ("calc.tail.probe", {"n": 1}),
        ("calc.square.computed", {"x": 3, "square": 9}),
    ]
    assert process.returncode is not None
    # The exclusive queue dies with tail's connection: nothing is bound for calc.tail.* any more.
    async with asyncio.timeout(WAIT):
        # The broker notices the closed socket on its own time: poll, bounded.
        while await client.emit("calc.tail.probe", {"n": 2}):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
