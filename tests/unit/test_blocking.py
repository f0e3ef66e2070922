"""The blocking client without a broker: an unreachable broker is Unavailable, the loop thread
is a daemon. (Moved from tests/integration/test_blocking.py: neither needs RabbitMQ.)"""

from __future__ import annotations

import asyncio
import threading

import pytest
from pydantic import SecretStr

from service import Settings, Unavailable
from service.blocking import BlockingClient

__all__: list[str] = []


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
