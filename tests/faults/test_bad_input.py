"""Faults C5 and C8 of RELIABILITY.md, the bad-input cases tests/integration does not cover:
oversize answers and events Burrow is asked to send, and hostile headers.
"""

from __future__ import annotations

import json
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from service import (
    Context,
    InvalidArgument,
    MessageTooLarge,
    Model,
    ResourceExhausted,
    Service,
    Unavailable,
)
from service.codec import H_DEADLINE, H_KIND
from service.dead_letters import DeadLetterTool
from service.jobs import H_CALLBACK, H_JOB_ID
from service.topology import Names
from service.tracing import HEADER as TRACEPARENT
from tests.faults.conftest import MakeClient, RunApp
from tests.faults.harness import PrivateBroker, eventually, sample, wait_until

__all__: list[str] = []

_LIMIT = 2048  # BURROW_MAX_BODY_BYTES for these tests


class Size(Model):
    """How big an answer or event to make."""

    n: int


class Blob(Model):
    """A reply or event of `n` characters."""

    blob: str


def _inflating_service() -> Service:
    svc = Service("inflate")
    svc.event("inflate.made", Blob)

    @svc.operation()
    async def reply(req: Size) -> Blob:
        """Answer with a blob of the requested size."""
        return Blob(blob="x" * req.n)

    @svc.operation()
    async def announce(req: Size, ctx: Context) -> Blob:
        """Emit an event of the requested size, then answer small."""
        await ctx.emit("inflate.made", Blob(blob="y" * req.n))
        return Blob(blob="ok")

    return svc


async def test_c5_oversize_reply_and_event_refused_locally(
    run_app: RunApp, make_client: MakeClient
) -> None:
    """C5: a reply or event above the body limit is refused before publishing with a clear
    error; no channel error, no reconnect, other calls unaffected."""
    app = await run_app(_inflating_service(), max_body_bytes=_LIMIT)
    client = await make_client(max_body_bytes=_LIMIT)
    reconnects = sample("burrow_amqp_reconnects_total", link="publisher")
    events = sample("burrow_messages_published_total", kind="event", outcome="confirmed")

    with pytest.raises(ResourceExhausted) as too_big:
        await client.call("inflate.reply", {"n": 4 * _LIMIT}, timeout=10)
    assert "too large" in too_big.value.message
    with pytest.raises(InvalidArgument) as event_too_big:
        await client.call("inflate.announce", {"n": 4 * _LIMIT}, timeout=10)
    assert "exceeds the limit" in event_too_big.value.message
    assert sample("burrow_messages_published_total", kind="event", outcome="confirmed") == events
    with pytest.raises(MessageTooLarge):
        await client.emit("inflate.made", {"blob": "z" * 4 * _LIMIT})
    with pytest.raises(MessageTooLarge):
        await client.call("inflate.reply", {"n": 1, "pad": "p" * 4 * _LIMIT}, timeout=10)

    assert await client.call("inflate.reply", {"n": 10}, timeout=10) == {"blob": "x" * 10}
    assert await client.call("inflate.announce", {"n": 10}, timeout=10) == {"blob": "ok"}
    assert sample("burrow_amqp_reconnects_total", link="publisher") == reconnects
    assert app.transport.publisher.ready.is_set()
    assert client.link.ready.is_set()


def _flaky_service(calls: list[str]) -> Service:
    svc = Service("hostile")

    @svc.operation(retries=3)
    async def fail(req: Size) -> Size:
        """Always fail retryably."""
        calls.append("fail")
        raise Unavailable("always down")

    @svc.operation()
    async def work(req: Size) -> Size:
        """Succeed."""
        calls.append("work")
        return req

    return svc


def _burrow_label_values() -> list[str]:
    values: list[str] = []
    for family in REGISTRY.collect():
        if family.name.startswith("burrow_"):
            for metric in family.samples:
                values.extend(metric.labels.values())
    return values


async def test_c8_hostile_headers_capped_and_validated(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, namespace: str
) -> None:
    """C8: huge header tables, a forged x-death with an absurd count and 10 kB header values
    are capped or ignored: no retry loop, nothing of them in logs or metric labels."""
    calls: list[str] = []
    app = await run_app(_flaky_service(calls), max_retries=3, retry_base_delay=0.05)
    names = Names(namespace)
    huge = "h" * 10_000
    # As large as a header frame may be (frame_max, 128 kB): the table itself ~50 kB.
    hostile: dict[str, Any] = {
        **{f"x-junk-{i}": "j" * 100 for i in range(500)},
        "x-death": [
            {
                "queue": names.retry_queue(0),
                "reason": "expired",
                "count": 10**15,
                "exchange": names.retry_exchange(0),
                "routing-keys": ["r"],
            }
        ],
        TRACEPARENT: huge,
        H_JOB_ID: huge,
        H_CALLBACK: huge,
        H_DEADLINE: huge,  # not a timestamp: ignored, the request is not expired
        H_KIND: "cast",
    }
    long_id = "i" * 255  # AMQP short strings stop at 255 bytes: the longest id possible

    def message(route: str) -> aio_pika.Message:
        return aio_pika.Message(
            json.dumps({"n": 1}).encode(),
            content_type="application/json",
            message_id=f"{route}-{long_id}"[:255],
            correlation_id=long_id,
            type=route,
            headers=hostile,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    exchange = await amqp_channel.get_exchange(names.commands_exchange)
    with capture_logs() as logs:
        await exchange.publish(message("hostile.work"), routing_key="hostile.work")
        await exchange.publish(message("hostile.fail"), routing_key="hostile.fail")
        dlq = names.dead_letter_queue("hostile")

        async def parked() -> bool:
            return await broker.ready_count(dlq) == 1

        await eventually(parked, 20, "the forged-x-death message in the DLQ")
        await wait_until(lambda: "work" in calls, 10, "the hostile cast processed")
    assert calls.count("work") == 1, calls
    assert calls.count("fail") == 1, f"forged x-death: {calls.count('fail')} runs, want 1"
    [letter] = await DeadLetterTool(app.settings, "hostile").list()
    assert letter.reason == "retries_exhausted"
    assert letter.error["details"]["attempts"] <= 1_000_001  # capped, never 10**15
    for event in logs:
        for key, value in event.items():
            assert len(str(value)) <= 2_000, f"log field {key} of {len(str(value))} chars"
    assert all(len(value) <= 128 for value in _burrow_label_values())
    assert app.health.ready
