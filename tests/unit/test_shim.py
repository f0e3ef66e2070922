"""The shim: on Burrow's connections, frames pamqp alone would choke on decode to marked values
instead, aiormq's writer coalesces the frames queued together, and the libraries under it are
the ones Burrow was checked against."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import struct
import sys
from importlib import metadata
from typing import Any, cast

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import FrameGenerator
from pamqp import commands, frame, header

from service import ConfigError, Settings
from service._amqp import shim
from service._amqp.shim import MAX_DEPTH, UNDECODABLE_HEADER
from service._amqp.transport import AmqpLink
from service._protocol.types import Undecodable

__all__: list[str] = []


def _header_frame(props: commands.Basic.Properties, *replace: tuple[bytes, bytes]) -> bytes:
    raw = frame.marshal(header.ContentHeader(0, 10, props), 1)
    for old, new in replace:
        assert len(old) == len(new)
        assert raw.count(old) == 1
        raw = raw.replace(old, new)
    return raw


def _read(raw: bytes) -> Any:
    """The frame as a Burrow connection reads it."""
    return shim.read_frame(raw[:7], raw[7:])[2]


def _properties(raw: bytes) -> commands.Basic.Properties:
    decoded = _read(raw)
    assert isinstance(decoded, header.ContentHeader)
    return decoded.properties


def test_the_installed_libraries_are_ones_burrow_was_checked_against() -> None:
    """Every function Burrow re-implements or builds on has a known fingerprint (fails when
    aiormq, pamqp or aio-pika change it: review service/_amqp/shim.py, then add the new one)."""
    shim.check_libraries()
    assert shim.installed_fingerprints().keys() == shim._KNOWN.keys()


def test_a_changed_function_fails_once_naming_the_library_and_what_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fingerprint Burrow does not know makes `check_libraries` raise one ConfigError that
    names the library, its version and the function; the verdict is kept for the process."""
    name = "aiormq.connection:FrameReceiver.get_frame"
    monkeypatch.setattr(shim, "_KNOWN", {**shim._KNOWN, name: {"0" * 16: "7.0.0"}})
    monkeypatch.setattr(shim, "_checked", [])
    with pytest.raises(ConfigError) as raised:
        shim.check_libraries()
    text = str(raised.value)
    assert f"aiormq {metadata.version('aiormq')}: " in text
    assert f"{name} changed" in text
    assert "Burrow knows it from 7.0.0" in text
    monkeypatch.setattr(shim, "_KNOWN", dict(shim._KNOWN) | {name: {"1" * 16: "7.0.0"}})
    with pytest.raises(ConfigError) as again:
        shim.check_libraries()  # computed once: the same verdict, not a second look
    assert again.value is raised.value


async def test_a_link_on_changed_libraries_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """With a library changed under Burrow, a link fails at start (wait_ready raises the
    ConfigError) instead of connecting and failing per delivery."""
    changed = ConfigError("the AMQP libraries changed under Burrow's connections")
    monkeypatch.setattr(shim, "_checked", [changed])
    link = AmqpLink("changed", settings)
    link.start()
    with pytest.raises(ConfigError) as raised:
        await link.wait_ready(1)
    assert raised.value is changed
    await link.close()


def test_a_fingerprint_is_the_source_of_what_it_names() -> None:
    """The fingerprint follows the code: the same source, the same fingerprint."""

    def one() -> int:
        return 1

    def two() -> int:
        return 2

    assert shim.fingerprint(one) != shim.fingerprint(two)
    assert shim.fingerprint(one) == shim.fingerprint(one)
    assert len(shim.fingerprint(FrameGenerator.__anext__)) == 16


def test_non_utf8_short_string_property_is_marked() -> None:
    """A non-UTF-8 correlation_id decodes to an Undecodable that keeps the raw bytes."""
    props = commands.Basic.Properties(correlation_id="AAAA", message_id="m-1")
    decoded = _properties(_header_frame(props, (b"AAAA", b"\xff\xfe\xfd\xfc")))
    value = decoded.correlation_id
    assert isinstance(value, Undecodable)
    assert value.raw == b"\xff\xfe\xfd\xfc"
    assert value == "\\xff\\xfe\\xfd\\xfc"
    assert decoded.message_id == "m-1"


def test_non_utf8_header_name_is_marked() -> None:
    """A header name that is not UTF-8 becomes an Undecodable key; its value is kept."""
    props = commands.Basic.Properties(headers={"KEYX": 1})
    decoded = _properties(_header_frame(props, (b"KEYX", b"\xffKEY")))
    assert decoded.headers is not None
    ((key, value),) = decoded.headers.items()
    assert isinstance(key, Undecodable)
    assert value == 1


def test_table_nested_past_the_recursion_limit_is_cut_at_max_depth() -> None:
    """A table nested 2000 deep decodes without recursion error, cut at MAX_DEPTH."""
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(2000):
        inner["a"] = {}
        inner = inner["a"]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # only pamqp's encoder needs it, to build the frame
    try:
        raw = _header_frame(commands.Basic.Properties(headers=nested, message_id="after"))
    finally:
        sys.setrecursionlimit(limit)
    decoded = _properties(raw)
    value: Any = decoded.headers
    depth = 0
    while isinstance(value, dict):
        value = value["a"]
        depth += 1
    assert depth == MAX_DEPTH
    assert isinstance(value, Undecodable)
    assert decoded.message_id == "after"  # what follows the table is still read


def test_timestamp_out_of_range_is_marked() -> None:
    """A header timestamp far beyond year 9999 is marked instead of overflowing."""
    props = commands.Basic.Properties(headers={"t": datetime.datetime(2020, 1, 1)})
    stamp = struct.pack(">Q", int(datetime.datetime(2020, 1, 1).timestamp()))
    decoded = _properties(_header_frame(props, (b"T" + stamp, b"T" + struct.pack(">Q", 2**63))))
    assert decoded.headers is not None
    assert isinstance(decoded.headers["t"], Undecodable)


def test_properties_that_cannot_be_decoded_at_all_are_marked() -> None:
    """Properties with an unknown field type become one marker header, never an exception."""
    props = commands.Basic.Properties(headers={"k": 1})
    decoded = _properties(_header_frame(props, (b"kb\x01", b"kZ\x01")))
    assert decoded.headers is not None
    assert isinstance(decoded.headers[UNDECODABLE_HEADER], Undecodable)


def test_non_utf8_routing_key_in_deliver_is_marked() -> None:
    """A Basic.Deliver whose routing key is not UTF-8 decodes, with the key marked."""
    deliver = commands.Basic.Deliver("ctag", 1, False, "ex", "RKEY")
    raw = frame.marshal(deliver, 1).replace(b"RKEY", b"\xffKEY")
    decoded = _read(raw)
    assert isinstance(decoded, commands.Basic.Deliver)
    assert isinstance(decoded.routing_key, Undecodable)


def test_non_utf8_routing_key_in_return_is_marked() -> None:
    """Any other method frame (a Basic.Return here) decodes with Burrow's decoders too."""
    returned = commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="RKEY")
    decoded = _read(frame.marshal(returned, 1).replace(b"RKEY", b"\xffKEY"))
    assert isinstance(decoded, commands.Basic.Return)
    assert isinstance(decoded.routing_key, Undecodable)
    assert (decoded.reply_code, decoded.reply_text) == (312, "NO_ROUTE")


def test_header_floats_are_written_as_doubles() -> None:
    """A float header goes out as a double (at any depth): exact, and beyond single
    precision's range."""
    headers = {"d": 0.1, "big": 1e300, "in": {"table": [0.1, {"x": 1e-300}]}}
    properties = shim.content_properties(headers=headers)
    raw = struct.pack(">BHI", 2, 1, 12 + len(properties))
    raw += struct.pack(">HHQ", 60, 0, 0) + properties + b"\xce"
    assert _properties(raw).headers == headers
    assert b"\x01dd" in properties


async def test_silent_for_reads_aiormq_last_frame_time() -> None:
    """aiormq still keeps the time of the last frame where the shim reads it (fails loudly if
    aiormq renames it: the link's probe would then treat a busy connection as dead)."""
    connection = aiormq.Connection("amqp://guest:guest@127.0.0.1:1/")
    silent = shim.silent_for(connection)
    assert silent is not None
    assert 0 <= silent < 5
    assert shim.silent_for(object()) is None


def _unconnected() -> aiormq.Connection:
    return aiormq.Connection("amqp://guest:guest@127.0.0.1:1/")


async def test_connection_blocked_follows_aiormq_blocked_frames() -> None:
    """aiormq still records Connection.Blocked/Unblocked where the shim reads it (fails loudly
    if aiormq renames it: `Link.blocked` would stay false under a resource alarm)."""
    connection = _unconnected()
    handle = cast(Any, connection)
    await handle._Connection__handle_connection_unblocked(commands.Connection.Unblocked())
    assert not shim.connection_blocked(connection)
    await handle._Connection__handle_connection_blocked(commands.Connection.Blocked("memory"))
    assert shim.connection_blocked(connection)
    with pytest.raises(RuntimeError, match="library changed"):
        shim.connection_blocked(object())


async def test_reader_task_is_where_aiormq_keeps_its_frame_reader() -> None:
    """aiormq still declares `_reader_task` and assigns its reader there on connect (the
    link's dead-broker abort cancels it); None before connecting, loud on anything else."""
    assert "self._reader_task = self.create_task(" in inspect.getsource(aiormq.Connection.connect)
    connection = _unconnected()
    assert shim.reader_task(connection) is None
    reader = connection.create_task(asyncio.sleep(0))  # what aiormq's connect stores there
    cast(Any, connection)._reader_task = reader
    assert shim.reader_task(connection) is reader
    await reader
    with pytest.raises(RuntimeError, match="library changed"):
        shim.reader_task(object())


async def test_expire_heartbeat_grace_writes_aiormq_grace() -> None:
    """The grace aiormq allows a silent broker is still the attribute the shim zeroes, and
    aiormq's heartbeat check still reads it (fails loudly if either changes)."""
    connection = _unconnected()
    shim.expire_heartbeat_grace(connection)
    assert cast(Any, connection)._Connection__heartbeat_grace_timeout == 0
    assert "__heartbeat_grace_timeout" in inspect.getsource(aiormq.Connection)
    with pytest.raises(RuntimeError, match="library changed"):
        shim.expire_heartbeat_grace(object())


# -- the coalescing writer ---------------------------------------------------------------------


def _queued(*frames: ChannelFrame) -> FrameGenerator:
    """aiormq's own frame generator, over a Burrow connection's write queue."""
    queue = shim._WriteQueue()
    for queued in frames:
        queue.put_nowait(queued)
    return FrameGenerator(queue)


async def test_frames_queued_together_are_written_in_one_call() -> None:
    """Every frame queued by the time the writer wakes comes out as one payload, in order, and
    draining it resolves each frame's drain future."""
    loop = asyncio.get_running_loop()
    waits = [loop.create_future(), None, loop.create_future()]
    frames = [
        ChannelFrame(payload=bytes([n]) * 3, should_close=False, drain_future=wait)
        for n, wait in enumerate(waits)
    ]
    generator = _queued(*frames)
    batch = await generator.__anext__()
    assert batch.payload == b"\x00\x00\x00\x01\x01\x01\x02\x02\x02"
    assert batch.should_drain
    assert not batch.should_close
    batch.drain()
    assert all(wait.done() for wait in waits if wait is not None)
    assert generator.queue.empty()


async def test_a_close_frame_ends_its_batch_and_one_frame_stays_itself() -> None:
    """Frames after a connection-close frame are left queued; a lone frame is not wrapped."""
    first = ChannelFrame(payload=b"a", should_close=False)
    close = ChannelFrame(payload=b"c", should_close=True)
    after = ChannelFrame(payload=b"z", should_close=False)
    generator = _queued(first, close, after)
    batch = await generator.__anext__()
    assert (batch.payload, batch.should_close) == (b"ac", True)
    assert await generator.__anext__() is after


async def test_a_batch_stops_growing_at_the_size_bound() -> None:
    """No write carries much more than MAX_BATCH_BYTES: the rest waits for the next one."""
    half = ChannelFrame(payload=b"x" * (shim.MAX_BATCH_BYTES // 2 + 1), should_close=False)
    generator = _queued(half, half, half)
    assert len((await generator.__anext__()).payload) == 2 * len(half.payload)
    assert (await generator.__anext__()) is half
