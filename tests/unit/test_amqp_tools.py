"""The operator tools' broker access (`service._amqp.tools`) speaks Burrow's terms: what the AMQP
library answers or raises becomes a count, a `Delivery` or a Burrow error.

The channel here is a stand-in (`_Channel`) that answers as aiormq's does or raises what aiormq
raises; the real broker behind it is exercised by tests/hostile/test_h7_dlq_tooling.py and
tests/integration/test_dlq_tool.py.
"""

from __future__ import annotations

from typing import Any, cast

import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from service import Settings
from service._amqp.tools import BrokerLost, ToolLink, delete_queues_and_exchanges, tail
from service._protocol.errors import (
    ConnectionLost,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

__all__: list[str] = []


class _Channel:
    """An aiormq channel's stand-in: each call answers `answers[name]`, raising it when it is
    an exception; throwaway channels (`connection.channel()`) are stand-ins too."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.is_closed = False
        self.connection = self
        self.probes: list[_Channel] = []

    async def channel(self, **_: Any) -> _Channel:
        probe = _Channel(**self.answers)
        self.probes.append(probe)
        return probe

    async def close(self) -> None:
        self.is_closed = True

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            answer = self.answers.get(name)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return call


def _tool(channel: _Channel, settings: Settings) -> ToolLink:
    return ToolLink(cast(Any, None), cast(aiormq.Channel, channel), settings)


async def test_count_reads_the_queue_on_a_throwaway_channel(settings: Settings) -> None:
    """`count` is the passive declare's message count, asked on a channel closed afterwards."""
    channel = _Channel(queue_declare=spec.Queue.DeclareOk("q", message_count=7))
    assert await _tool(channel, settings).count("q") == 7
    [probe] = channel.probes
    assert probe.calls == [("queue_declare", ("q",), {"passive": True})]
    assert probe.is_closed
    assert channel.calls == []


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue 'q'"), NotFound),
        (aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - q"), PermissionDenied),
        (aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"), BrokerLost),
        (ConnectionResetError("reset"), BrokerLost),
        (TimeoutError(), BrokerLost),
    ],
)
async def test_count_says_what_went_wrong_as_a_burrow_error(
    settings: Settings, raised: BaseException, expected: type[Exception]
) -> None:
    """A missing queue is NotFound, a refused one PermissionDenied, a connection that goes
    away BrokerLost (a ConnectionLost), each with the library's text on one line."""
    tool = _tool(_Channel(queue_declare=raised), settings)
    with pytest.raises(expected) as caught:
        await tool.count("q")
    assert str(caught.value) == " ".join((str(raised) or type(raised).__name__).split())


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no exchange 'x'"), NotFound),
        (aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - x"), PermissionDenied),
        (aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED"), FailedPrecondition),
        (aiormq.exceptions.ChannelInvalidStateError("closed"), BrokerLost),
    ],
)
async def test_check_exchange_says_what_went_wrong_as_a_burrow_error(
    settings: Settings, raised: BaseException, expected: type[Exception]
) -> None:
    """A missing exchange is NotFound, a refused one PermissionDenied, any other refusal
    FailedPrecondition; the check runs on a throwaway channel."""
    channel = _Channel(exchange_declare=raised)
    with pytest.raises(expected):
        await _tool(channel, settings).check_exchange("x")
    assert [probe.is_closed for probe in channel.probes] == [True]


async def test_check_exchange_takes_the_default_exchange_as_there(settings: Settings) -> None:
    """The default exchange ("") needs no check; an existing exchange passes."""
    channel = _Channel(exchange_declare=spec.Exchange.DeclareOk())
    tool = _tool(channel, settings)
    await tool.check_exchange("")
    assert channel.probes == []
    await tool.check_exchange("x")
    assert channel.probes[0].calls == [("exchange_declare", ("x",), {"passive": True})]


async def test_get_takes_one_message_as_a_delivery_or_none(settings: Settings) -> None:
    """basic.get-ok becomes a `Delivery` holding its tag and queue; basic.get-empty is None."""
    properties = spec.Basic.Properties(message_id="m-1", headers={"a": 1}, app_id="shop")
    taken = DeliveredMessage(
        delivery=spec.Basic.GetOk(delivery_tag=5, exchange="x", routing_key="k", message_count=0),
        header=ContentHeader(0, 2, properties),
        body=b"{}",
        channel=cast(Any, None),
    )
    channel = _Channel(basic_get=taken)
    delivery = await _tool(channel, settings).get("q")
    assert delivery is not None
    assert (delivery.delivery_tag, delivery.queue, delivery.message_id) == (5, "q", "m-1")
    assert (delivery.exchange, delivery.routing_key, delivery.body) == ("x", "k", b"{}")
    assert (delivery.headers, delivery.app_id) == ({"a": 1}, "shop")
    assert channel.calls == [
        ("basic_get", ("q",), {"no_ack": False, "timeout": settings.publish_timeout})
    ]
    empty = DeliveredMessage(
        delivery=spec.Basic.GetEmpty(), header=ContentHeader(), body=b"", channel=cast(Any, None)
    )
    assert await _tool(_Channel(basic_get=empty), settings).get("q") is None


async def test_settling_by_tag_is_the_matching_basic_method(settings: Settings) -> None:
    """ack, requeue (one or all up to a tag) and reject send basic.ack, basic.nack(requeue)
    and basic.reject(no requeue); a channel gone under them is BrokerLost."""
    channel = _Channel()
    tool = _tool(channel, settings)
    await tool.ack(1)
    await tool.requeue(2)
    await tool.requeue(3, multiple=True)
    await tool.reject(4)
    assert channel.calls == [
        ("basic_ack", (1,), {}),
        ("basic_nack", (2,), {"multiple": False, "requeue": True}),
        ("basic_nack", (3,), {"multiple": True, "requeue": True}),
        ("basic_reject", (4,), {"requeue": False}),
    ]
    gone = _Channel(basic_ack=aiormq.exceptions.ChannelInvalidStateError("writer is None"))
    with pytest.raises(BrokerLost, match="writer is None"):
        await _tool(gone, settings).ack(1)


async def test_wait_until_holds_looks_until_the_count_is_back(settings: Settings) -> None:
    """The wait asks the tool's own channel and stops as soon as the queue holds the count,
    or after its tries."""
    channel = _Channel(queue_declare=spec.Queue.DeclareOk("q", message_count=3))
    tool = _tool(channel, settings)
    await tool.wait_until_holds("q", 3)
    assert len(channel.calls) == 1
    await tool.wait_until_holds("q", 4, tries=3, interval=0)
    assert len(channel.calls) == 4


async def test_purge_returns_how_many_there_were(settings: Settings) -> None:
    """`purge` is queue.purge's message count."""
    channel = _Channel(queue_purge=spec.Queue.PurgeOk(message_count=4))
    assert await _tool(channel, settings).purge("q") == 4
    assert channel.calls == [("queue_purge", ("q",), {})]


async def test_broker_lost_is_a_connection_lost() -> None:
    """Whoever catches ConnectionLost catches a tool's BrokerLost too."""
    assert issubclass(BrokerLost, ConnectionLost)


async def test_tail_refuses_what_is_not_a_topic_pattern(settings: Settings) -> None:
    """`tail` checks its pattern before it connects."""
    with pytest.raises(InvalidArgument, match="is not a topic pattern"):
        await anext(tail(settings.model_copy(update={"amqp_url": "amqp://nowhere:1/"}), "a..b"))


async def test_deleting_nothing_opens_no_connection() -> None:
    """With no queue and no exchange to delete, no broker is contacted."""
    await delete_queues_and_exchanges("amqp://guest:guest@nowhere.invalid:1/", [], [])
