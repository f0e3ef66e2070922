"""Burrow touches nothing outside: importing `service` and running a Burrow connection leave
pamqp, aiormq and aio-pika as they were, and a plain aio-pika connection in the same process
decodes and encodes as stock pamqp does (issue 24).

The broker is a stand-in on 127.0.0.1 that speaks just enough AMQP 0-9-1 (`_Broker`): the
handshake, channels, confirms, a consumer that is sent one delivery a stock pamqp cannot
decode, and publishes it records and confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat
from pydantic import SecretStr

from service import Settings
from service._amqp import shim
from service._amqp.link import ConsumerSpec
from service._amqp.transport import AmqpLink
from service._protocol.types import Delivery, Outgoing, Undecodable

__all__: list[str] = []


def _snapshot() -> dict[tuple[str, ...], object]:
    """Every function, class, table entry and class attribute of pamqp, aiormq and aio-pika,
    by where it lives (self-contained: the subprocess test runs this source on its own)."""
    import importlib

    modules = [
        *(f"pamqp.{name}" for name in ("base", "commands", "decode", "encode", "frame", "header")),
        *(f"aiormq.{name}" for name in ("abc", "base", "channel", "connection")),
        *(f"aio_pika.{name}" for name in ("abc", "channel", "connection", "robust_connection")),
    ]
    found: dict[tuple[str, ...], object] = {}

    def walk(owner: object, path: tuple[str, ...], module: str, depth: int) -> None:
        for name, value in list(vars(owner).items()):
            found[(*path, name)] = value
            if isinstance(value, dict):
                found.update({(*path, name, repr(key)): item for key, item in value.items()})
            if isinstance(value, type) and value.__module__ == module and depth < 3:
                walk(value, (*path, name), module, depth + 1)

    for module in modules:
        walk(importlib.import_module(module), (module,), module, 0)
    return found


def _changed(
    before: dict[tuple[str, ...], object], after: dict[tuple[str, ...], object]
) -> list[tuple[str, ...]]:
    return sorted(
        key for key in before.keys() | after.keys() if before.get(key) is not after.get(key)
    )


def test_importing_service_changes_nothing_in_the_amqp_libraries() -> None:
    """In a fresh interpreter, `import service` (transport and shim included) leaves every
    function, class and table of pamqp, aiormq and aio-pika the very object it was."""
    script = textwrap.dedent(inspect.getsource(_snapshot)) + textwrap.dedent(
        """
        before = _snapshot()
        import service, service._amqp.shim, service._amqp.transport, service.testing
        after = _snapshot()
        changed = [k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)]
        print(sorted(changed))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- a stand-in broker ---------------------------------------------------------------------------

_FLOAT = "x-float"


def _hostile_delivery(channel: int, consumer_tag: str) -> bytes:
    """A delivery whose routing key and correlation id are not UTF-8: stock pamqp raises."""
    deliver = spec.Basic.Deliver(consumer_tag, 1, False, "", "RKEY")
    header = ContentHeader(0, 2, spec.Basic.Properties(correlation_id="CORR", message_id="m"))
    raw = pamqp.frame.marshal(deliver, channel).replace(b"RKEY", b"\xffKEY")
    raw += pamqp.frame.marshal(header, channel).replace(b"CORR", b"\xfe\xff\x00C")
    return raw + pamqp.frame.marshal(ContentBody(b"{}"), channel)


class _Broker:
    """Just enough of a broker for one client at a time; records each published content
    header's raw properties."""

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readexactly(8)  # the protocol header
            await self._talk(reader, writer)
        writer.close()

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(channel: int, frame: Any) -> None:
            writer.write(pamqp.frame.marshal(frame, channel))

        capabilities: dict[str, Any] = {"publisher_confirms": True, "basic.nack": True}
        send(0, spec.Connection.Start(server_properties={"capabilities": capabilities}))
        confirms: dict[int, int] = {}
        while True:
            head = await reader.readexactly(7)
            size = struct.unpack(">I", head[3:])[0]
            rest = await reader.readexactly(size + 1)
            if head[0] == 2:  # a content header: its flags and properties, after the fixed part
                self.published.append(rest[12:-1])
            _, channel, frame = pamqp.frame.unmarshal(head + rest)
            if isinstance(frame, ContentHeader) and channel in confirms:
                confirms[channel] += 1
                send(channel, spec.Basic.Ack(delivery_tag=confirms[channel]))
            answer = self._answer(frame, confirms, channel)
            if answer is not None:
                send(channel, answer)
            if isinstance(frame, spec.Basic.Consume):
                writer.write(_hostile_delivery(channel, frame.consumer_tag or "ctag"))
            await writer.drain()
            if isinstance(frame, spec.Connection.Close):
                return

    @staticmethod
    def _answer(frame: Any, confirms: dict[int, int], channel: int) -> Any:
        if isinstance(frame, spec.Confirm.Select):
            confirms[channel] = 0
        answers: dict[type, Any] = {
            spec.Connection.StartOk: spec.Connection.Tune(heartbeat=0),
            spec.Connection.Open: spec.Connection.OpenOk(),
            spec.Connection.Close: spec.Connection.CloseOk(),
            spec.Channel.Open: spec.Channel.OpenOk(),
            spec.Channel.Close: spec.Channel.CloseOk(),
            spec.Confirm.Select: spec.Confirm.SelectOk(),
            spec.Basic.Qos: spec.Basic.QosOk(),
            spec.Exchange.Declare: spec.Exchange.DeclareOk(),
        }
        if isinstance(frame, spec.Basic.Consume):
            return spec.Basic.ConsumeOk(frame.consumer_tag or "ctag")
        if isinstance(frame, ProtocolHeader | Heartbeat | ContentHeader | ContentBody):
            return None
        return answers.get(type(frame))


@pytest.fixture
async def broker() -> AsyncIterator[_Broker]:
    """A stand-in broker listening on 127.0.0.1."""
    stand_in = _Broker()
    stand_in.server = await asyncio.start_server(stand_in.serve, "127.0.0.1", 0)
    async with stand_in.server:
        yield stand_in


async def test_a_burrow_connection_leaves_the_libraries_stock_for_everyone_else(
    broker: _Broker, settings: Settings
) -> None:
    """A Burrow link decodes a delivery stock pamqp cannot (marked values) and writes header
    floats as doubles; afterwards every function and class of pamqp, aiormq and aio-pika is
    the object it was, and a plain aio-pika connection encodes a float as `f` and dies on the
    same delivery, as stock pamqp does."""
    with pytest.raises(PAMQPException):  # what stock pamqp makes of that delivery
        pamqp.frame.unmarshal(_hostile_delivery(1, "ctag"))  # its first frame: the Deliver
    before = _snapshot()

    link = AmqpLink("isolation", settings.model_copy(update={"amqp_url": SecretStr(broker.url)}))
    delivered: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()

    async def consume(delivery: Delivery) -> None:
        delivered.set_result(delivery)

    link.add_consumer(ConsumerSpec("q", consume, no_ack=True))
    link.start()
    try:
        await link.wait_ready(5)
        delivery = await asyncio.wait_for(delivered, 5)
        await link.publish(
            Outgoing("", "q", b"x", "m-1", headers={_FLOAT: 0.5}), kind="event", mandatory=False
        )
    finally:
        await link.close()
    assert isinstance(delivery.routing_key, Undecodable)
    assert isinstance(delivery.correlation_id, Undecodable)
    assert delivery.message_id == "m"
    assert b"\x07x-floatd" in broker.published[-1]  # a double, by Burrow's connection

    connection = await aio_pika.connect(broker.url, timeout=5)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"x", headers={_FLOAT: 0.5}), routing_key="q"
        )
        assert b"\x07x-floatf" in broker.published[-1]  # single precision, as stock pamqp
        raw = await channel.get_underlay_channel()
        assert type(raw) is aiormq.Channel
        underlay = raw.connection
        assert type(underlay) is aiormq.Connection
        await raw.basic_consume("q", lambda _: asyncio.sleep(0))  # the delivery kills it
        await asyncio.wait({underlay.closing}, timeout=5)
        assert underlay.closing.done()
        failure = underlay.closing.exception()
        assert isinstance(failure, aiormq.exceptions.InvalidFrameError | PAMQPException)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
    assert _changed(before, _snapshot()) == []
    assert shim.Connection is not aio_pika.Connection
