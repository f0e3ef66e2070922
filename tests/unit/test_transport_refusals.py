"""A broker's refusal of the handshake is read from what each supported aiormq raises.

aiormq 7.2 on reports a Connection.Close answering Connection.Open as an InvalidFrameError whose
text names neither the reply code nor the reason; a Burrow connection keeps the frame
(`shim.HandshakeRefused`). The stand-in broker here (`_Refusing`) speaks the handshake up to
Connection.Open and answers it with a Connection.Close.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

import aiormq
import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from pamqp import commands as spec
from pamqp.exceptions import AMQPInternalError
from pydantic import SecretStr

from service import Settings
from service._amqp import shim
from service._amqp.transport import AmqpLink, _describe, _vhost_refusal
from service._protocol.config import redact_url
from service._protocol.errors import ConfigError, Unavailable

__all__: list[str] = []

VHOST_NOT_FOUND = "NOT_ALLOWED - vhost shop not found"
CONNECTION_LIMIT = (
    "NOT_ALLOWED - access to vhost '/' refused for user 'u': connection limit (5) is reached"
)


def test_a_refused_vhost_is_read_from_aiormq_before_7_2() -> None:
    """aiormq 7.1 raises pamqp's AMQPInternalError with the broker's Connection.Close among its
    arguments (7.2 on: an InvalidFrameError); both are the broker's refusal."""
    close = spec.Connection.Close(reply_code=530, reply_text=VHOST_NOT_FOUND)
    refused = AMQPInternalError("one of ['Connection.OpenOk']", close)
    assert _vhost_refusal(refused) == VHOST_NOT_FOUND
    assert _describe(refused).startswith("the broker closed the connection: 530 NOT_ALLOWED")


def _close(code: int, text: str) -> spec.Connection.Close:
    """The Connection.Close a broker sends to refuse (no method of the client's at fault)."""
    return spec.Connection.Close(reply_code=code, reply_text=text, class_id=0, method_id=0)


class _Writer:
    """What aiormq's handshake step writes to: the bytes, kept."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        return None


async def _answer_open_with(answer: Any) -> Any:
    """What a Burrow connection's Connection.Open step returns or raises when the broker
    answers `answer`."""
    reader = asyncio.StreamReader()
    reader.feed_data(pamqp.frame.marshal(answer, 0))
    receiver = FrameReceiver(reader)
    receiver.started = True  # past the protocol header, as in a real handshake
    writer = cast(asyncio.StreamWriter, _Writer())
    return await shim._AmqpConnection._rpc(
        spec.Connection.Open(virtual_host="shop"), writer, receiver
    )


# The error aiormq raises for an unexpected handshake answer: InvalidFrameError from 7.2 on
# (whose text drops the frame: Burrow's connection raises shim.HandshakeRefused, which keeps
# it); pamqp's AMQPInternalError, with the frame among its arguments, in 7.1.
_AIORMQ = tuple(int(part) for part in importlib.metadata.version("aiormq").split(".")[:2])
_UNEXPECTED: type[Exception] = (
    aiormq.exceptions.InvalidFrameError if _AIORMQ >= (7, 2) else AMQPInternalError
)


async def test_a_close_answering_connection_open_keeps_the_brokers_frame() -> None:
    """A Connection.Close answering Connection.Open is aiormq's own error that keeps the frame
    (7.2: InvalidFrameError with its own text, as HandshakeRefused), so the refusal reads with
    the broker's code and reason."""
    with pytest.raises(_UNEXPECTED) as raised:
        await _answer_open_with(_close(530, VHOST_NOT_FOUND))
    refused = raised.value
    if _AIORMQ >= (7, 2):
        assert isinstance(refused, shim.HandshakeRefused)
        text = str(refused)
        assert text.startswith("Expected one of ['Connection.OpenOk'], got <Connection.Close")
        assert (refused.close.reply_code, refused.close.reply_text) == (530, VHOST_NOT_FOUND)
    assert _vhost_refusal(refused) == VHOST_NOT_FOUND
    assert _describe(refused) == f"the broker closed the connection: 530 {VHOST_NOT_FOUND}"


async def test_an_expected_answer_and_other_refusals_are_aiormqs_own() -> None:
    """Connection.OpenOk passes through as aiormq returns it; an unexpected frame that is not a
    Connection.Close stays aiormq's plain error, read as no refusal."""
    assert isinstance(await _answer_open_with(spec.Connection.OpenOk()), spec.Connection.OpenOk)
    with pytest.raises(_UNEXPECTED) as raised:
        await _answer_open_with(spec.Connection.Tune())
    assert type(raised.value) is _UNEXPECTED
    assert _vhost_refusal(raised.value) is None


def test_vhost_refusal_reads_only_a_refused_vhost() -> None:
    """A connection limit (also 530), another reply code and a refused socket are not a refused
    vhost: those are retried."""
    for code, text in ((530, CONNECTION_LIMIT), (541, "INTERNAL_ERROR - vhost '/' is down")):
        close = spec.Connection.Close(code, text)
        assert _vhost_refusal(shim.HandshakeRefused("Expected one of …", close)) is None
    assert _vhost_refusal(ConnectionRefusedError(111, "Connection refused")) is None


class _Refusing:
    """A stand-in broker that answers Connection.Open with Connection.Close(530, `reason`)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/shop"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readexactly(8)  # the protocol header
            writer.write(pamqp.frame.marshal(spec.Connection.Start(), 0))
            while True:
                head = await reader.readexactly(7)
                rest = await reader.readexactly(struct.unpack(">I", head[3:])[0] + 1)
                _, _, frame = pamqp.frame.unmarshal(head + rest)
                if isinstance(frame, spec.Connection.StartOk):
                    writer.write(pamqp.frame.marshal(spec.Connection.Tune(heartbeat=0), 0))
                elif isinstance(frame, spec.Connection.Open):
                    writer.write(pamqp.frame.marshal(_close(530, self.reason), 0))
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def _refusing(reason: str) -> AsyncIterator[_Refusing]:
    stand_in = _Refusing(reason)
    stand_in.server = await asyncio.start_server(stand_in.serve, "127.0.0.1", 0)
    async with stand_in.server:
        yield stand_in


async def test_a_link_refused_its_vhost_fails_at_start_with_the_brokers_reason(
    settings: Settings,
) -> None:
    """A link whose virtual host the broker refuses fails at start (no retry), saying the
    broker's reason."""
    async with _refusing(VHOST_NOT_FOUND) as broker:
        url = broker.url
        link = AmqpLink("refused", settings.model_copy(update={"amqp_url": SecretStr(url)}))
        link.start()
        try:
            with pytest.raises(ConfigError) as raised:
                await link.wait_ready(10)
        finally:
            await link.close()
    assert str(raised.value) == (
        f"the broker refused the virtual host of {redact_url(link.settings.login_url(url))}: "
        f"{VHOST_NOT_FOUND} "
        "(check the vhost in BURROW_AMQP_URL and the user's permissions on it)"
    )


async def test_a_link_at_the_connection_limit_retries_saying_the_brokers_reason(
    settings: Settings,
) -> None:
    """A connection limit reached is not fatal: the link keeps trying and its last error is the
    broker's close, code and reason."""
    async with _refusing(CONNECTION_LIMIT) as broker:
        link = AmqpLink("limited", settings.model_copy(update={"amqp_url": SecretStr(broker.url)}))
        link.start()
        try:
            with pytest.raises(Unavailable):
                await link.wait_ready(0.5)
            assert link.fatal is None
            assert link.last_error == f"the broker closed the connection: 530 {CONNECTION_LIMIT}"
        finally:
            await link.close()
