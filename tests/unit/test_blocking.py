"""The blocking client without a broker: an unreachable broker is Unavailable, the loop thread
is a daemon (moved from tests/integration/test_blocking.py: neither needs RabbitMQ); on the
in-memory broker, every `Client` argument and `headers=` are used."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pydantic import SecretStr

from service import (
    App,
    ConfigError,
    Model,
    Next,
    Publishing,
    PublishNext,
    Request,
    Result,
    Service,
    Settings,
    Unavailable,
)
from service.blocking import BlockingClient
from service.testing import InMemoryBroker

__all__: list[str] = []


class Said(Model):
    """What the echo service is told, and answers."""

    text: str


async def test_unreachable_broker_is_unavailable(settings: Settings) -> None:
    """With no broker to reach, a call fails with Unavailable instead of hanging."""
    # Port 1 on loopback: nothing listens there, so every connect is refused at once.
    unreachable = SecretStr("amqp://guest:guest@127.0.0.1:1/")
    client = BlockingClient(
        settings.model_copy(update={"amqp_url": unreachable, "connect_timeout": 0.5})
    )
    try:
        with pytest.raises(Unavailable):
            await asyncio.to_thread(client.call, "calc.add", {"a": 1, "b": 2}, timeout=3)
    finally:
        await asyncio.to_thread(client.close)


def test_loop_thread_is_a_daemon(settings: Settings) -> None:
    """The loop thread never keeps the interpreter alive; close() ends it."""
    client = BlockingClient(settings)
    threads = [t for t in threading.enumerate() if t.name == "burrow-client"]
    assert threads
    assert all(t.daemon for t in threads)
    client.close()
    assert client.closed


async def test_every_client_argument_is_used(settings: Settings) -> None:
    """`BlockingClient(link_factory=…, outbound=[…])` uses both (outbound was once ignored),
    and call, cast, submit and emit pass `headers=` on: the service's middleware sees them."""
    seen: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def record(request: Request, call_next: Next) -> Result:
        seen.put_nowait(dict(request.delivery.headers))
        return await call_next(request)

    async def sign(publishing: Publishing, call_next: PublishNext) -> None:
        publishing.message.headers["x-signed"] = "by-outbound"
        await call_next(publishing)

    svc = Service("echo", middleware=[record])
    svc.event("echo.said", Said)

    @svc.operation()
    async def say(req: Said) -> Said:
        return req

    @svc.subscribe("echo.said", group="log")
    async def heard(event: Said) -> None:
        pass

    broker = InMemoryBroker()
    app = App(svc, settings=settings, http=False, link_factory=broker.link_factory)
    await app.start()
    await app.wait_ready(5)
    client = BlockingClient(settings, link_factory=broker.link_factory, outbound=[sign])
    try:
        token = {"x-service-token": "secret"}
        said = {"text": "hi"}
        assert await asyncio.to_thread(client.call, "echo.say", said, headers=token) == said
        await asyncio.to_thread(client.cast, "echo.say", said, headers=token)
        job = await asyncio.to_thread(client.submit, "echo.say", said, headers=token)
        assert await asyncio.to_thread(job.result, 5) == said
        assert await asyncio.to_thread(client.emit, "echo.said", said, headers=token)
        for _ in range(4):
            async with asyncio.timeout(5):
                headers = await seen.get()
            assert (headers["x-service-token"], headers["x-signed"]) == ("secret", "by-outbound")
        with pytest.raises(ValueError, match="x-burrow-kind"):
            await asyncio.to_thread(client.call, "echo.say", said, headers={"x-burrow-kind": "x"})
    finally:
        await asyncio.to_thread(client.close)
        await app.stop()


def test_unknown_argument_names_the_closest(settings: Settings) -> None:
    """A misspelt argument is a ConfigError naming the closest setting or argument; no loop
    thread is left behind."""
    threads = threading.active_count()
    with pytest.raises(ConfigError, match="did you mean outbound"):
        BlockingClient(settings, outbond=[])
    with pytest.raises(ConfigError, match="did you mean namespace"):
        BlockingClient(namspace="orders")
    assert threading.active_count() == threads
