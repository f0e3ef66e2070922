"""H5: bodies far above BURROW_MAX_BODY_BYTES keep `burrow run` below its documented memory bound.

The service runs as a subprocess (its own peak RSS, `VmHWM`, is what is measured) with a small
prefetch; casts of 20 MiB (20 times the default 1 MiB limit), or just below the test broker's
`max_message_size` when that is smaller (RabbitMQ 4's default is 16 MiB, 3's 128 MiB), go to
its commands queue.
docs/operations.md (*Memory*) gives the bound checked here: an oversize cast costs the service at
most three bodies on top of its idle peak, whatever the prefetch, because it is never copied
(the commands queue's own dead-letter exchange moves it, whole, into the DLQ).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from service import Client, Settings
from service._protocol.topology import service_topology
from service._protocol.vocabulary import Names
from service.example import calc
from tests.brokers import TEST_BROKER
from tests.conftest import AMQP_URL, delete_topology

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
_LARGEST = 20 * 1024 * 1024  # one body on the wire, unless the broker refuses that much
COUNT = 8
PREFETCH = 2
BODIES = 3  # docs/operations.md#memory: an oversize cast or event, at any prefetch
_PREFIX = b'{"a": 1, "b": "'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_bytes(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _reason(headers: dict[str, Any], commands: str) -> str | None:
    """Why a letter is in the DLQ: Burrow's reason, or the broker's for a rejected command."""
    burrow = _text(headers.get("x-burrow-dead-reason"))
    if burrow is not None:
        return burrow
    if (
        _text(headers.get("x-first-death-reason")) == "rejected"
        and _text(headers.get("x-first-death-queue")) == commands
    ):
        return "too_large"  # refused by the service, dead-lettered by the queue's DLX
    return None


@contextlib.asynccontextmanager
async def _service(settings: Settings, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        "BURROW_NAMESPACE": settings.namespace,
        "BURROW_AMQP_URL": AMQP_URL,
        "BURROW_HTTP_HOST": "127.0.0.1",
        "BURROW_HTTP_PORT": str(_free_port()),
        "BURROW_PREFETCH": str(PREFETCH),
        "BURROW_LOG_FORMAT": "json",
        "BURROW_LOG_LEVEL": "warning",
    }
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "run", cwd=ROOT, env=env, stderr=stderr
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            await delete_topology(service_topology(calc, settings))


async def _add(client: Client, attempts: int) -> Any:
    for _ in range(attempts - 1):
        try:
            return await client.call("calc.add", {"a": 2, "b": 3}, timeout=1)
        except Exception:
            await asyncio.sleep(0.1)
    return await client.call("calc.add", {"a": 2, "b": 3}, timeout=5)


def _body_size() -> int:
    """The size of each cast: 20 MiB, or 1 MiB below what the test broker accepts."""
    return min(_LARGEST, TEST_BROKER.max_message_size - 1024 * 1024)


async def _publish(channel: aio_pika.abc.AbstractChannel, namespace: str, size: int) -> None:
    exchange = await channel.get_exchange(Names(namespace).commands_exchange, ensure=False)
    body = _PREFIX + b"x" * (size - len(_PREFIX) - 2) + b'"}'
    for i in range(COUNT):
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                type="calc.add",
                message_id=f"h5-{i}",
                headers={"x-burrow-kind": "cast"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="calc.add",
            mandatory=True,
        )


async def _wait_count(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> int:
    found = 0
    for _ in range(200):
        declared = await channel.declare_queue(queue, passive=True)
        found = declared.declaration_result.message_count or 0
        if found >= count:
            break
        await asyncio.sleep(0.1)
    return found


async def _letters(
    channel: aio_pika.abc.AbstractChannel, queue: str, commands: str
) -> list[tuple[str | None, int, str | None]]:
    """(message id, body size, reason) of every letter in `queue`, taken one at a time."""
    declared = await channel.declare_queue(queue, passive=True)
    found = []
    for _ in range(COUNT + 1):
        message = await declared.get(no_ack=True, fail=False)
        if message is None:
            break
        found.append(
            (message.message_id, len(message.body), _reason(dict(message.headers), commands))
        )
        del message
    return found


def _refusals(log: Path) -> tuple[int, bool]:
    """How many `handled` lines say `too_large` for our casts; whether any shows a body."""
    text = log.read_text(encoding="utf-8", errors="replace")
    count = 0
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if (
                isinstance(record, dict)
                and record.get("reason") == "too_large"
                and str(record.get("message_id", "")).startswith("h5-")
            ):
                count += 1
    return count, "x" * 64 in text


@pytest.mark.timeout(90)
async def test_h5_oversize_casts_keep_the_service_under_its_memory_bound(
    settings: Settings, tmp_path: Path
) -> None:
    """8 casts of ≤ 20 MiB, prefetch 2: peak RSS ≤ idle + 3 bodies, all in the DLQ, serving."""
    size = await asyncio.to_thread(_body_size)
    names = Names(settings.namespace)
    commands, dlq = names.commands_queue(calc.name), names.dead_letter_queue(calc.name)
    log = tmp_path / "service.log"
    async with _service(settings, log) as process, Client(settings) as client:
        assert await _add(client, 150) == {"sum": 5}  # consuming, and the answer path is warm
        idle = _status_bytes(process.pid, "VmHWM")
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await _publish(channel, settings.namespace, size)
            assert await _wait_count(channel, dlq, COUNT) == COUNT
            assert await _add(client, 1) == {"sum": 5}
            peak = _status_bytes(process.pid, "VmHWM")
            left = await channel.declare_queue(commands, passive=True)
            assert left.declaration_result.message_count == 0
            letters = await _letters(channel, dlq, commands)
        finally:
            await connection.close()
    assert peak - idle <= BODIES * size, (
        f"peak RSS {peak >> 20} MiB is {(peak - idle) >> 20} MiB above the idle peak of "
        f"{idle >> 20} MiB; the bound is {BODIES * size >> 20} MiB ({BODIES} bodies of "
        f"{size >> 20} MiB)"
    )
    # Nothing lost, nothing twice, every body whole, each with its reason.
    assert sorted(letters) == [(f"h5-{i}", size, "too_large") for i in range(COUNT)]
    logged, leaked = _refusals(log)
    assert logged == COUNT, f"{logged} of {COUNT} refusals logged with reason too_large"
    assert not leaked, "a log line holds the body"
