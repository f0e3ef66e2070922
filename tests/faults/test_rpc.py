"""Faults D1 to D11 of RELIABILITY.md: calls to unknown operations, late, duplicate and stray
replies, callers that left, requests with no or a forged reply_to, many concurrent callers, a
full request queue and handlers that raise.

Each checks the RPC oracle: every call ends once (result, error or timeout) within its deadline
plus ε, answers its own caller only, leaves no pending future, and no request is left unacked.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from structlog.testing import capture_logs

from service import (
    App,
    Client,
    DeadlineExceeded,
    Internal,
    NotFound,
    ResourceExhausted,
    Unroutable,
)
from service._amqp.tools import delivery_from_message
from service._protocol.codec import encode
from service._protocol.vocabulary import H_DEAD_ERROR, H_KIND, H_STATUS, Names
from service._serving.dead_letters import DeadLetter
from tests.faults.conftest import MakeClient, RunApp
from tests.faults.harness import (
    DIRECT_REPLY_TO,
    CallRecord,
    Ledger,
    PrivateBroker,
    RawCaller,
    assert_calls_sound,
    drain_dead_letters,
    drain_service,
    drain_work,
    raw_channel,
    sample,
    tracked_call,
    tracked_route_call,
    wait_until,
    work_service,
)

__all__: list[str] = []

LATE = "burrow_rpc_late_replies_total"
SLACK = 1.5  # seconds of scheduling noise allowed on a shared 2-core machine
_WAIT = 10.0  # upper bound on one wait for the broker; never reached when things work


def _received(operation: str = "work.do") -> float:
    return sample("burrow_messages_received_total", service="work", operation=operation)


def _handled(outcome: str, operation: str = "work.do") -> float:
    return sample(
        "burrow_messages_handled_total", service="work", operation=operation, outcome=outcome
    )


def _dead_lettered(reason: str) -> float:
    return sample("burrow_dead_lettered_total", service="work", reason=reason)


async def _stop_and_drain(broker: PrivateBroker, app: App, ledger: Ledger) -> str:
    """Stop the App (in-flight work settles), drain its queues; nothing may be left unacked."""
    await app.stop()
    summary = await drain_service(broker.url, ledger, app.settings.namespace)
    assert not ledger.queued, f"requests left unacked or requeued: {summary}"
    return summary


async def _park(
    broker: PrivateBroker, app: App, ledger: Ledger
) -> aio_pika.abc.AbstractIncomingMessage:
    """Take the one letter the service parked (exactly one: a loop would park it again)."""
    dlq = Names(app.settings.namespace).dead_letter_queue("work")
    parked = await drain_dead_letters(broker.url, dlq, ledger, expect=1)
    assert len(parked) == 1, [
        DeadLetter.from_delivery(delivery_from_message(m), full=True).summary() for m in parked
    ]
    return parked[0]


async def _queue_depth(raw: RawChannel, queue: str) -> int:
    """Ready messages in `queue` (a passive declare on the channel that may own it)."""
    declared = await raw.queue_declare(queue, passive=True)
    assert declared is not None
    return int(declared.message_count or 0)


async def test_d1_unknown_operation_is_not_found_at_once(
    broker: PrivateBroker, run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """D1: an unknown operation of a live service → NOT_FOUND long before the deadline; the
    request is acked, not left unacked."""
    app = await run_app(work_service(ledger))
    client = await make_client()
    received = _received("unknown")
    record, _ = await tracked_route_call(client, "work.nope", {}, deadline=10)
    assert record.outcome == "error", record
    assert isinstance(record.error, NotFound)
    assert not isinstance(record.error, Unroutable)
    assert "work.nope" in record.error.message
    assert record.elapsed < 1.0 + SLACK
    assert_calls_sound([record], client)
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary
    assert _received("unknown") == received + 1


async def test_d1_unknown_operation_cast_dead_lettered(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, ledger: Ledger
) -> None:
    """D1: an unknown operation with nobody to answer is parked once as `unknown_operation`."""
    app = await run_app(work_service(ledger))
    parked_before = _dead_lettered("unknown_operation")
    caller = RawCaller(await raw_channel(amqp_channel), app.settings.namespace, ledger)
    correlation_id = await caller.publish("work.nope", encode({}), reply_to=None)
    parked = await _park(broker, app, ledger)
    assert DeadLetter.from_delivery(delivery_from_message(parked)).reason == "unknown_operation"
    summary = await _stop_and_drain(broker, app, ledger)
    assert ledger.dead == {correlation_id}, summary
    assert _dead_lettered("unknown_operation") == parked_before + 1


async def test_d2_late_reply_discarded_and_counted(
    broker: PrivateBroker, run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """D2: a slow handler → DeadlineExceeded at the caller's deadline; the reply that leaves
    later is discarded and counted as late."""
    finished = asyncio.Event()

    async def stubborn(_key: str) -> None:
        # Slow the first request only. Cut at the deadline, it finishes its current step
        # before honouring the cancellation: its reply leaves well after the caller gave up.
        if finished.is_set():
            return
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(1.0)
            raise
        finally:
            finished.set()

    app = await run_app(work_service(ledger, before=stubborn))
    client = await make_client()
    late_before = sample(LATE)
    timeout = 1.0
    record = await tracked_call(client, 0, deadline=timeout, ledger=ledger)
    assert record.outcome == "timeout", record
    assert isinstance(record.error, DeadlineExceeded)
    assert record.error.retryable is True
    assert timeout * 0.9 <= record.elapsed < timeout + SLACK
    assert client.rpc.pending == {}
    async with asyncio.timeout(_WAIT):
        await finished.wait()
    await wait_until(lambda: sample(LATE) >= late_before + 1, _WAIT, "the late reply counted")
    assert len(ledger.started) == 1
    assert not ledger.effects, "the cut handler still produced its side effect"
    after = await tracked_call(client, 1, deadline=5, ledger=ledger)
    assert after.outcome == "result", after
    assert_calls_sound([record, after], client)
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary


async def test_d2_expired_request_not_executed_and_counted(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, ledger: Ledger
) -> None:
    """D2: requests whose x-deadline has already passed are not executed, acked and counted
    as expired (the only confirmed messages the oracle finds nowhere)."""
    app = await run_app(work_service(ledger))
    expired = _handled("expired")
    caller = await RawCaller(
        await raw_channel(amqp_channel), app.settings.namespace, ledger
    ).start()
    cast_id = await caller.publish(
        "work.do",
        encode({"key": "d2-cast"}),
        correlation_id="d2-cast",
        deadline_in=-1.0,
        reply_to=None,
    )
    call_id = await caller.publish(
        "work.do", encode({"key": "d2-call"}), correlation_id="d2-call", deadline_in=-1.0
    )
    await wait_until(lambda: _handled("expired") >= expired + 2, _WAIT, "two expired requests")
    assert not ledger.started
    await app.stop()
    await drain_work(broker.url, ledger, app.settings.namespace)
    assert not ledger.started
    assert not ledger.queued, ledger.summary()
    assert not ledger.dead, ledger.summary()
    # Discarded on purpose: exactly the expired cast is confirmed yet nowhere, as counted.
    assert ledger.lost() == {cast_id}, ledger.summary()
    assert not ledger.phantoms()
    assert _handled("expired") == expired + 2
    assert caller.unanswered() == {call_id}, "an expired call must get no answer"
    assert not caller.stray


async def test_d3_caller_gone_before_reply(
    broker: PrivateBroker, run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """D3: the caller's connection closes before the reply: the reply is dropped; no crash,
    no requeue, no loop; the service keeps serving."""
    gate = asyncio.Event()
    app = await run_app(work_service(ledger, gate=gate))
    client = await make_client()
    server = app.servers[0]
    received = _received()
    connection = await aio_pika.connect(broker.url)
    try:
        gone = RawCaller(
            await raw_channel(await connection.channel()), app.settings.namespace, ledger
        )
        await gone.start()
        await gone.publish("work.do", encode({"key": "d3-gone"}), correlation_id="d3-gone")
        await wait_until(lambda: ledger.started["d3-gone"] == 1, _WAIT, "the handler holding")
    finally:
        await connection.close()
    with capture_logs() as logs:
        gate.set()
        async with asyncio.timeout(_WAIT):
            await server.idle.wait()
        after = await tracked_call(client, 1, deadline=5, ledger=ledger)
    assert after.outcome == "result", after
    assert_calls_sound([after], client)
    assert all(link.ready.is_set() for link in app.transport.links)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary
    assert ledger.effects["d3-gone"] == 1, summary
    assert sorted(ledger.effects.values()) == [1, 1], summary
    assert _received() == received + 2, "the orphaned request was delivered again"


class _SpiedCall:
    """A real call to `spy.ask` whose request a test-owned queue takes, so the test reads its
    reply_to and correlation id off it and answers by hand (its own id, another one, none)."""

    def __init__(self, raw: RawChannel) -> None:
        self.raw = raw
        self.requests: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self.reply_to = ""
        self.correlation_id = ""

    async def start(
        self, client: Client, namespace: str, expect: dict[str, Any]
    ) -> asyncio.Future[tuple[CallRecord, Any]]:
        """Make the call; return it, still pending, once its request was taken."""
        spy = f"{namespace}.spy"
        await self.raw.queue_declare(spy, exclusive=True)
        await self.raw.queue_bind(spy, Names(namespace).rpc_exchange, routing_key="spy.*")
        await self.raw.basic_consume(spy, self.requests.put, no_ack=True)
        call = asyncio.ensure_future(
            tracked_route_call(
                client, "spy.ask", {"q": 1}, deadline=15, expect=lambda reply: reply == expect
            )
        )
        async with asyncio.timeout(_WAIT):
            request = await self.requests.get()
        props = request.header.properties
        assert props.reply_to is not None
        assert props.reply_to.startswith(DIRECT_REPLY_TO + ".")
        assert props.correlation_id in client.rpc.pending
        self.reply_to, self.correlation_id = props.reply_to, props.correlation_id
        return call

    async def answer(self, correlation_id: str | None, body: dict[str, Any]) -> None:
        """Publish a reply to the call's reply_to with `correlation_id`."""
        await self.raw.basic_publish(
            encode(body),
            routing_key=self.reply_to,
            properties=Basic.Properties(
                content_type="application/json",
                correlation_id=correlation_id,
                headers={H_STATUS: "ok"},
            ),
        )


async def test_d4_duplicate_replies_first_wins(
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    """D4: two replies with the call's correlation id: the first is the result, the second is
    discarded and counted; nothing stays pending."""
    app = await run_app(work_service(ledger))
    client = await make_client()
    spy = _SpiedCall(await raw_channel(amqp_channel))
    call = await spy.start(client, app.settings.namespace, expect={"answer": "first"})
    before = sample(LATE)
    await spy.answer(spy.correlation_id, {"answer": "first"})
    async with asyncio.timeout(_WAIT):
        record, reply = await call
    assert reply == {"answer": "first"}
    await spy.answer(spy.correlation_id, {"answer": "second"})
    await wait_until(lambda: sample(LATE) >= before + 1, _WAIT, "the duplicate counted")
    assert client.rpc.pending == {}
    after = await tracked_call(client, 1, deadline=5, ledger=ledger)
    assert after.outcome == "result", after
    assert_calls_sound([record, after], client)
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary


async def test_d5_unknown_or_missing_correlation_id_discarded(
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
) -> None:
    """D5: replies with an unknown or no correlation id are discarded and counted; the pending
    call is unharmed and still gets its own reply."""
    app = await run_app(work_service(ledger))
    client = await make_client()
    spy = _SpiedCall(await raw_channel(amqp_channel))
    call = await spy.start(client, app.settings.namespace, expect={"answer": "mine"})
    before = sample(LATE)
    await spy.answer("not-a-pending-call", {"answer": "unknown"})
    await spy.answer(None, {"answer": "missing"})
    await wait_until(lambda: sample(LATE) >= before + 2, _WAIT, "both strays counted")
    assert not call.done()
    assert list(client.rpc.pending) == [spy.correlation_id]
    await spy.answer(spy.correlation_id, {"answer": "mine"})
    async with asyncio.timeout(_WAIT):
        record, reply = await call
    assert reply == {"answer": "mine"}
    after = await tracked_call(client, 1, deadline=5, ledger=ledger)
    assert after.outcome == "result", after
    assert_calls_sound([record, after], client)
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary


async def test_d6_call_without_reply_to_dead_lettered_not_executed(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, ledger: Ledger
) -> None:
    """D6: x-burrow-kind=call without reply_to → DLQ once (missing_reply_to, PERMISSION_DENIED);
    the handler never runs."""
    app = await run_app(work_service(ledger))
    parked_before = _dead_lettered("missing_reply_to")
    caller = RawCaller(await raw_channel(amqp_channel), app.settings.namespace, ledger)
    await caller.publish(
        "work.do",
        encode({"key": "d6"}),
        correlation_id="d6",
        headers={H_KIND: "call"},
        reply_to=None,
    )
    letter = DeadLetter.from_delivery(
        delivery_from_message(await _park(broker, app, ledger)), full=True
    )
    assert letter.reason == "missing_reply_to"
    assert '"PERMISSION_DENIED"' in str(letter.headers[H_DEAD_ERROR])
    assert not ledger.started
    summary = await _stop_and_drain(broker, app, ledger)
    assert ledger.dead == {"d6"}, summary
    assert not ledger.started
    assert _dead_lettered("missing_reply_to") == parked_before + 1


@pytest.mark.parametrize("kind_header", [True, False], ids=["kind-call", "no-kind"])
async def test_d7_spoofed_reply_to_refused_target_gets_nothing(
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    kind_header: bool,
) -> None:
    """D7: reply_to naming another queue → DLQ once (invalid_reply_to); that queue receives
    nothing and the handler never runs."""
    app = await run_app(work_service(ledger))
    namespace = app.settings.namespace
    parked_before = _dead_lettered("invalid_reply_to")
    raw = await raw_channel(amqp_channel)
    victim = f"{namespace}.victim"
    await raw.queue_declare(victim, exclusive=True)
    await RawCaller(raw, namespace, ledger).publish(
        "work.do",
        encode({"key": "d7"}),
        correlation_id="d7",
        headers={H_KIND: "call"} if kind_header else None,
        reply_to=victim,
    )
    parked = await _park(broker, app, ledger)
    assert DeadLetter.from_delivery(delivery_from_message(parked)).reason == "invalid_reply_to"
    assert parked.reply_to == victim
    assert not ledger.started
    summary = await _stop_and_drain(broker, app, ledger)
    assert ledger.dead == {"d7"}, summary
    assert await _queue_depth(raw, victim) == 0
    assert _dead_lettered("invalid_reply_to") == parked_before + 1


async def test_d7_reply_to_lookalike_prefix_refused(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, ledger: Ledger
) -> None:
    """D7: a reply_to that only resembles direct reply-to (no `.` suffix) is refused."""
    app = await run_app(work_service(ledger))
    caller = RawCaller(await raw_channel(amqp_channel), app.settings.namespace, ledger)
    await caller.publish(
        "work.do", encode({"key": "d7"}), correlation_id="d7", reply_to=DIRECT_REPLY_TO + "-evil"
    )
    parked = await _park(broker, app, ledger)
    assert DeadLetter.from_delivery(delivery_from_message(parked)).reason == "invalid_reply_to"
    assert not ledger.started
    summary = await _stop_and_drain(broker, app, ledger)
    assert ledger.dead == {"d7"}, summary


@pytest.mark.slow
async def test_d9_thousand_concurrent_calls_from_ten_clients_correlate(
    broker: PrivateBroker, run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """D9: 1,000 concurrent calls over 10 clients each get their own reply, once; no future
    leaks; every request ran once."""
    app = await run_app(work_service(ledger))
    clients = [await make_client() for _ in range(10)]
    records = await asyncio.gather(
        *(tracked_call(clients[i % 10], i, deadline=60, ledger=ledger) for i in range(1000))
    )
    assert len(records) == 1000
    for n, client in enumerate(clients):
        counts = assert_calls_sound(records[n::10], client)
        assert counts == {"result": 100}, counts
    assert len(ledger.effects) == 1000
    assert not ledger.duplicates()
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary


async def test_d10_full_request_queue_fails_at_once(
    run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """D10: with the request queue full, a call fails with ResourceExhausted, not a timeout."""
    gate = asyncio.Event()
    app = await run_app(work_service(ledger, gate=gate), max_queue_length=2, prefetch=1)
    client = await make_client()
    held = [asyncio.create_task(tracked_call(client, 0, deadline=30))]
    await wait_until(lambda: app.servers[0].in_flight == 1, 10, "the consumer busy")
    refused = None
    for i in range(1, 8):
        call = asyncio.create_task(tracked_call(client, i, deadline=30))
        done, _ = await asyncio.wait({call}, timeout=2.0)  # accepted calls stay pending
        if done:
            refused = call.result()
            break
        held.append(call)
    assert refused is not None, "no call was refused although the queue holds only 2"
    assert refused.outcome == "error", refused
    assert isinstance(refused.error, ResourceExhausted), refused
    assert refused.error.retryable
    assert len(held) >= 3  # one in flight and the queue's two
    gate.set()
    records = await asyncio.gather(*held)
    assert all(r.outcome == "result" for r in records), records
    assert_calls_sound([*records, refused], client)


async def test_d11_handler_exception_is_internal_without_secrets(
    broker: PrivateBroker, run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """D11: a handler raising Exception('secret /etc/path') → INTERNAL (a stable code), no
    secret, no trace; answered and acked, not parked."""
    raised: list[str] = []

    async def boom(key: str) -> None:
        if not raised:  # the first request only
            raised.append(key)
            raise Exception("secret /etc/path")

    app = await run_app(work_service(ledger, before=boom))
    client = await make_client()
    record = await tracked_call(client, 0, deadline=5, ledger=ledger)
    assert record.outcome == "error", record
    assert isinstance(record.error, Internal)
    assert record.error.code.value == "INTERNAL"
    wire = str(record.error.to_wire())
    for leak in ("secret", "/etc/path", "Traceback", 'File "', ".py"):
        assert leak not in wire
    assert record.error.retryable is False
    assert list(ledger.started.values()) == [1]
    assert not ledger.effects
    after = await tracked_call(client, 1, deadline=5, ledger=ledger)
    assert after.outcome == "result", after
    assert_calls_sound([record, after], client)
    summary = await _stop_and_drain(broker, app, ledger)
    assert not ledger.dead, summary
