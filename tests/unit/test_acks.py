"""Held acks (`service._amqp.transport.Acks`): one `basic.ack(multiple)` for many, never an early
one."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable

import pamqp.frame
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec

from service._amqp import shim
from service._amqp.transport import Acks


class _Channel:
    """The attributes of an aiormq channel that `Acks` and `shim.send` read."""

    def __init__(self, queue_size: int = 0) -> None:
        self._Channel__close_event = asyncio.Event()
        self.is_closed = False
        self.write_queue: asyncio.Queue[object] = asyncio.Queue(queue_size)
        self.number = 3


def _acks_sent(channel: _Channel) -> list[tuple[int, bool]]:
    """The (tag, multiple) of every Basic.Ack queued so far, decoded by pamqp."""
    sent = []
    while not channel.write_queue.empty():
        data = channel.write_queue.get_nowait().payload  # type: ignore[attr-defined]
        while data:
            size = struct.unpack_from(">I", data, 3)[0] + 8
            used, number, frame = pamqp.frame.unmarshal(data[:size])
            assert (used, number) == (size, 3)
            assert isinstance(frame, spec.Basic.Ack)
            sent.append((frame.delivery_tag, frame.multiple))
            data = data[size:]
    return sent


def _held(
    delay: float,
    limit: int | None,
    received: Iterable[int],
    acked: Iterable[int] = (),
    queue_size: int = 0,
) -> tuple[_Channel, Acks]:
    """A channel and its `Acks` after these deliveries arrived and these were acked."""
    channel = _Channel(queue_size)
    acks = Acks(channel, delay, limit)  # type: ignore[arg-type]
    for tag in received:
        acks.received(tag)
    for tag in acked:
        acks.ack(tag)
    return channel, acks


async def _turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_acks_wait_for_the_delay_then_go_as_one_multiple_ack() -> None:
    """Acks within the delay are held, then sent as one multiple ack of the highest tag."""
    channel, _ = _held(0.05, 64, received=(1, 2, 3), acked=(2, 1, 3))
    await _turn()
    assert _acks_sent(channel) == []
    await asyncio.sleep(0.08)
    assert _acks_sent(channel) == [(3, True)]


async def test_a_multiple_ack_stops_below_a_delivery_still_handled() -> None:
    """Tags above the lowest one still being handled are acked one by one."""
    channel, acks = _held(1.0, 64, received=range(1, 6), acked=(1, 2, 4, 5))
    acks.flush()
    assert _acks_sent(channel) == [(2, True), (4, False), (5, False)]
    acks.ack(3)
    acks.flush()
    assert _acks_sent(channel) == [(3, False)]


async def test_at_the_prefetch_limit_acks_go_on_the_next_turn() -> None:
    """When the unsettled deliveries reach the prefetch, the broker sends no more: ack now."""
    channel, _ = _held(10.0, 2, received=(1, 2), acked=(1, 2))
    await _turn()
    assert _acks_sent(channel) == [(2, True)]


async def test_no_delay_sends_each_turns_acks_together() -> None:
    """With delay 0 the acks of one loop turn leave on the next one, together."""
    channel, _ = _held(0.0, None, received=(7,), acked=(7,))
    await _turn()
    assert _acks_sent(channel) == [(7, False)]


async def test_rejected_deliveries_do_not_hold_back_acks() -> None:
    """A rejected tag is settled: a multiple ack may pass over it."""
    channel, acks = _held(1.0, 64, received=(1, 2, 3))
    acks.settled(2)
    acks.ack(1)
    acks.ack(3)
    acks.flush()
    assert _acks_sent(channel) == [(3, True)]


async def test_a_closed_channel_gets_no_acks() -> None:
    """On a closed channel nothing is queued: the broker redelivers those messages."""
    channel, acks = _held(1.0, 64, received=(1,), acked=(1,))
    channel.is_closed = True
    acks.flush()
    assert channel.write_queue.empty()


async def test_a_full_write_queue_delays_the_acks_without_losing_them() -> None:
    """While the connection's write queue is full the acks wait for room."""
    channel, acks = _held(1.0, 64, received=(1,), queue_size=1)
    channel.write_queue.put_nowait(shim.send)  # something already queued: the queue is full
    acks.ack(1)
    acks.flush()
    await _turn()
    assert channel.write_queue.get_nowait() is shim.send
    await _turn()
    assert _acks_sent(channel) == [(1, False)]


_OPS = st.lists(
    st.one_of(
        st.just(("deliver", 0)),
        st.tuples(st.sampled_from(["ack", "reject"]), st.integers(0, 40)),
        st.just(("flush", 0)),
    ),
    max_size=80,
)


@given(ops=_OPS)
async def test_acks_settle_exactly_what_handlers_acked(ops: list[tuple[str, int]]) -> None:
    """Any interleaving: the broker, reading the frames, acks every acked tag once and never a
    delivery still being handled or rejected."""
    channel = _Channel()
    acks = Acks(channel, 10.0, None)  # type: ignore[arg-type]
    outstanding: set[int] = set()  # the broker's view: delivered, not acked or rejected
    handling: list[int] = []
    acked: set[int] = set()
    settled_by_broker: set[int] = set()
    next_tag = 1

    def broker_reads() -> None:
        for tag, multiple in _acks_sent(channel):
            covered = {t for t in outstanding if t <= tag} if multiple else {tag}
            assert covered <= outstanding, "an ack of a tag the broker does not hold"
            assert covered <= acked, "an ack of a delivery its handler did not ack"
            outstanding.difference_update(covered)
            settled_by_broker.update(covered)

    for op, pick in ops:
        if op == "deliver":
            acks.received(next_tag)
            outstanding.add(next_tag)
            handling.append(next_tag)
            next_tag += 1
        elif op == "flush":
            acks.flush()
            broker_reads()
        elif handling:
            tag = handling.pop(pick % len(handling))
            if op == "ack":
                acked.add(tag)
                acks.ack(tag)
            else:
                acks.settled(tag)
                outstanding.discard(tag)  # the reject goes out at once
    acks.flush()
    broker_reads()
    assert settled_by_broker == acked
