"""Unit tests of Delivery settlement: each delivery is settled at most once (B7).

A fake settle function records what would reach the broker.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from service._protocol.types import Delivery, Settle

__all__: list[str] = []


def _recording() -> tuple[Delivery, list[Settle]]:
    sent: list[Settle] = []

    async def settle_fn(delivery: Delivery, how: Settle) -> None:
        sent.append(how)

    return Delivery(body=b"{}", routing_key="calc.add", settle_fn=settle_fn), sent


async def test_double_ack_is_a_noop() -> None:
    """A second ack reaches the broker never; the first settlement is kept (B7)."""
    delivery, sent = _recording()
    await delivery.ack()
    with capture_logs() as logs:
        await delivery.ack()
    assert sent == [Settle.ACK]
    assert delivery.settled is Settle.ACK
    assert [entry["event"] for entry in logs] == ["delivery already settled"]


@pytest.mark.parametrize(
    ("first", "second"),
    [("ack", "reject"), ("reject", "ack"), ("requeue", "ack"), ("ack", "requeue")],
)
async def test_settle_after_settle_is_ignored(first: str, second: str) -> None:
    """Whatever the order of ack/reject/requeue, only the first reaches the broker."""
    delivery, sent = _recording()
    await getattr(delivery, first)()
    await getattr(delivery, second)()
    assert sent == [Settle(first)]
    assert delivery.settled is Settle(first)


async def test_no_ack_delivery_settles_without_broker() -> None:
    """A delivery without a settle function (no-ack consumer) can be settled safely."""
    delivery = Delivery(body=b"", routing_key="r")
    assert delivery.settled is None
    await delivery.reject()
    await delivery.ack()
    assert delivery.settled is Settle.REJECT


def test_delivery_defaults() -> None:
    """A fresh delivery has empty headers and is unsettled."""
    delivery = Delivery(body=b"x", routing_key="r", headers=None)
    assert delivery.headers == {}
    assert delivery.settled is None
    assert delivery.redelivered is False
