"""`AmqpLink` closed while aio-pika is still connecting: the attempt ends by itself.

aio-pika bounds its connect with `asyncio.wait_for`. On Python 3.11, cancelling that wait while
the broker's refusal arrives loses the refusal: the inner task ends with it, nobody retrieves it,
and asyncio logs "Task exception was never retrieved" at error level (seen in CI when a service
with a bad vhost exited while its second link was connecting). The stand-in below has the same
shape: a `wait_for` around a handshake that, cancelled, fails with the broker's error.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aio_pika
import pytest

from service import Settings
from service._amqp.transport import AmqpLink

__all__: list[str] = []


class _Connect:
    """aio_pika.connect's stand-in: a handshake held until released, then refused (or, with
    `opens`, answered with a connection whose close is recorded)."""

    def __init__(self, opens: bool) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.opens = opens
        self.closed = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wait_for(self._handshake(), timeout=30)

    async def _handshake(self) -> Any:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            # aiormq closes the half-open connection and raises what the broker said.
            raise ConnectionRefusedError("NOT_ALLOWED - vhost not found") from None
        if not self.opens:
            raise ConnectionRefusedError("NOT_ALLOWED - vhost not found")
        return self

    async def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("opens", [False, True], ids=["refused", "opened-late"])
async def test_closing_a_link_mid_connect_loses_no_error_and_no_connection(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, opens: bool
) -> None:
    """A link closed mid-connect leaves no unretrieved error; a late connection is closed."""
    connect = _Connect(opens)
    monkeypatch.setattr(aio_pika, "connect", connect)  # what service._amqp.transport calls
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        link = AmqpLink("connect-test", settings)
        link.start()
        async with asyncio.timeout(5):
            await connect.entered.wait()
        await link.close()  # cancels the link's supervisor while the handshake is held
        connect.release.set()
        if opens:
            async with asyncio.timeout(5):
                await connect.closed.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == []
