"""The shim: frames pamqp alone would choke on decode to marked values instead, and aiormq's
writer coalesces the frames queued together."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import struct
import sys
from typing import Any, cast

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import FrameGenerator
from pamqp import commands, decode, frame, header

from service import shim
from service.shim import MAX_DEPTH, UNDECODABLE_HEADER, Undecodable

__all__: list[str] = []

shim.install()


def _header_frame(props: commands.Basic.Properties, *replace: tuple[bytes, bytes]) -> bytes:
    raw = frame.marshal(header.ContentHeader(0, 10, props), 1)
    for old, new in replace:
        assert len(old) == len(new)
        assert raw.count(old) == 1
        raw = raw.replace(old, new)
    return raw


def _properties(raw: bytes) -> commands.Basic.Properties:
    _, _, decoded = frame.unmarshal(raw)
    assert isinstance(decoded, header.ContentHeader)
    return decoded.properties


def test_installed_on_import_of_the_transport() -> None:
    """Importing the transport installs the shim, and pamqp still dispatches through it."""
    import service.transport  # noqa: F401 - the import is the point

    assert shim.installed()


def test_pamqp_tables_still_hold_what_the_shim_patches() -> None:
    """pamqp still has the decoder tables the shim patches (fails loudly if pamqp changes)."""
    assert {"shortstr", "table", "array", "timestamp"} <= set(decode.METHODS)
    assert {b"F", b"A", b"T", b"S", b"x"} <= set(decode.TABLE_MAPPING)
    assert callable(getattr(commands.Basic.Properties, "unmarshal", None))


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
    _, _, decoded = frame.unmarshal(raw)
    assert isinstance(decoded, commands.Basic.Deliver)
    assert isinstance(decoded.routing_key, Undecodable)


def test_header_floats_are_written_as_doubles() -> None:
    """A float header goes out as a double: exact, and beyond single precision's range."""
    props = commands.Basic.Properties(headers={"d": 0.1, "big": 1e300})
    decoded = _properties(_header_frame(props))
    assert decoded.headers == {"d": 0.1, "big": 1e300}


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
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
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
