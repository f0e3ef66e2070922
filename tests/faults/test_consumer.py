"""Faults B1 to B9 of RELIABILITY.md: crashes before the ack, poison and flaky work, backlog,
slow handlers, double settles, acks that outlive their channel, and a graceful stop.

Each checks the ledger oracle: nothing confirmed is lost, redeliveries are counted, not hidden.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from service import App, DeadlineExceeded, InvalidArgument, Service, Settings, Unavailable
from service._amqp.link import Link
from service._protocol.types import Delivery, DeliveryCallback, Settle
from service._protocol.vocabulary import Names
from service._serving.dead_letters import DeadLetterTool
from service._stores.memory import MemoryStore
from tests.faults.conftest import MakeClient, MakeLink, RunApp
from tests.faults.harness import (
    Ledger,
    PrivateBroker,
    WorkReply,
    WorkRequest,
    assert_calls_sound,
    cast,
    crash_link,
    drain_service,
    drain_work,
    eventually,
    publish_until_confirmed,
    sample,
    tracked_call,
    wait_until,
    watch_loss,
    work_service,
)

__all__: list[str] = []


@pytest.mark.slow
async def test_b8_stale_acks_across_reconnect(
    broker: PrivateBroker, run_app: RunApp, make_link: MakeLink, ledger: Ledger, namespace: str
) -> None:
    """B8: acks for deliveries of a dead channel fail quietly; the broker redelivers them."""
    gate = asyncio.Event()
    app = await run_app(work_service(ledger, gate=gate))
    producer = await make_link()
    keys = [f"b8-{i}" for i in range(10)]
    for key in keys:
        await publish_until_confirmed(producer, ledger, cast(namespace, key), give_up_after=10)
    await wait_until(lambda: set(ledger.started) == set(keys), 20, "10 handlers holding")
    lost = watch_loss(app.transport.consumer)
    with capture_logs() as logs:
        assert await broker.close_connection("burrow:consumer") == 1
        async with asyncio.timeout(10):
            await lost.wait()
        gate.set()  # the held handlers now finish and try to ack on the dead channel
        try:
            await wait_until(
                lambda: all(ledger.started[k] >= 2 and ledger.effects[k] for k in keys),
                30,
                "the redeliveries",
            )
        except AssertionError as exc:
            events = [(e["log_level"], e["event"]) for e in logs]
            raise AssertionError(f"{exc}; {ledger.summary()}; logs: {events[-15:]}") from None
        await app.wait_ready(20)
    assert app.health.ready
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not [e for e in logs if "dispatch failed" in e["event"]]
    # Every held delivery came back (redelivered): reported, not hidden. aiormq cancels the
    # held handlers with their channel, so a second side effect is possible but not required.
    assert all(ledger.started[k] == 2 for k in keys), ledger.started
    assert all(ledger.effects[k] in (1, 2) for k in keys), ledger.effects
    await app.stop()
    await drain_work(broker.url, ledger, namespace)
    ledger.assert_sound()
    assert not ledger.queued


@pytest.mark.slow
async def test_b9_graceful_stop_under_load(
    broker: PrivateBroker, run_app: RunApp, make_link: MakeLink, ledger: Ledger, namespace: str
) -> None:
    """B9: App.stop under load finishes and acks in-flight work; the rest stays queued."""
    app = await run_app(work_service(ledger), prefetch=5)
    producer = await make_link()
    keys = [f"b9-{i}" for i in range(40)]
    for key in keys:
        message = cast(namespace, key, delay_ms=300)
        await publish_until_confirmed(producer, ledger, message, give_up_after=10)
    await wait_until(lambda: len(ledger.started) >= 8, 20, "work under way")
    async with asyncio.timeout(30):
        await app.stop()
    interrupted = set(ledger.started) - ledger.processed
    assert not interrupted, f"handlers cut short by stop: {sorted(interrupted)}"
    await drain_work(broker.url, ledger, namespace)
    summary = ledger.assert_sound()
    assert not (ledger.queued & ledger.processed), f"finished work was not acked: {summary}"
    assert ledger.queued, f"stop came after all the work: nothing tested ({summary})"
    assert not ledger.duplicates()


def _received(operation: str = "work.do") -> float:
    return sample("burrow_messages_received_total", service="work", operation=operation)


async def _publish_all(
    link: Link, ledger: Ledger, namespace: str, keys: list[str], **fields: Any
) -> None:
    for key in keys:
        await publish_until_confirmed(
            link, ledger, cast(namespace, key, **fields), give_up_after=10
        )


class _CrashAfterPut(MemoryStore):
    """An idempotency store that, once, drops the consumer connection right after recording a
    key: the handler's side effect and its record exist, the ack never reaches the broker."""

    def __init__(self, crash: Any) -> None:
        super().__init__()
        self.crash = crash
        self.crashed = False

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """Record, then crash (once)."""
        await super().put(key, answer, ttl)
        if not self.crashed:
            self.crashed = True
            await self.crash()


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "raw"])
async def test_b1_crash_after_side_effect_before_ack(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
    idempotent: bool,
) -> None:
    """B1: the connection dies after the side effect, before the ack: the cast is redelivered;
    with idempotent=True the side effect happens once, without it twice (reported)."""
    holder: dict[str, App] = {}

    async def crash(_key: str = "") -> None:
        await crash_link(broker, holder["app"].transport.consumer)

    crashed: set[str] = set()

    async def crash_once(key: str) -> None:
        if key not in crashed:
            crashed.add(key)
            await crash()

    def prepare(app: App) -> None:
        holder["app"] = app
        if idempotent:
            app.servers[0].store = _CrashAfterPut(crash)

    service = work_service(ledger, idempotent=idempotent, after=None if idempotent else crash_once)
    app = await run_app(service, prepare=prepare)
    producer = await make_link()
    received = _received()
    await _publish_all(producer, ledger, namespace, ["b1-0"])
    await ledger.wait_processed(["b1-0"], 10)
    await wait_until(lambda: _received() >= received + 2, 20, "the redelivery")
    await app.wait_ready(20)
    if idempotent:
        assert ledger.effects["b1-0"] == 1, ledger.effects
        assert ledger.started["b1-0"] == 1, "the duplicate ran the handler again"
    else:
        await wait_until(lambda: ledger.effects["b1-0"] == 2, 10, "the raw second effect")
        assert ledger.duplicates() == {"b1-0": 2}
    await app.stop()
    await drain_service(broker.url, ledger, namespace)
    assert not ledger.queued, ledger.summary()
    assert not ledger.dead, ledger.summary()


async def test_b2_crash_after_reply_before_ack(
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B2: the reply is out, then the connection dies before the ack: the caller has its reply,
    the redelivery is answered from the idempotency store, the second reply is discarded and
    counted as late."""
    app = await run_app(work_service(ledger, idempotent=True))
    client = await make_client()
    publisher = app.transport.publisher
    original = publisher.publish
    crashed = asyncio.Event()

    async def publish_then_crash(message: Any, **kwargs: Any) -> None:
        await original(message, **kwargs)
        if kwargs.get("kind") == "reply" and not crashed.is_set():
            crashed.set()
            await crash_link(broker, app.transport.consumer)

    monkeypatch.setattr(publisher, "publish", publish_then_crash)
    late = sample("burrow_rpc_late_replies_total")
    received = _received()
    record = await tracked_call(client, 0, deadline=15)
    assert record.outcome == "result", record
    # The caller can have its reply before the service's publish of it returned (the confirm
    # comes after the delivery): wait for the crash rather than assume it already happened.
    await asyncio.wait_for(crashed.wait(), 10)
    await wait_until(
        lambda: sample("burrow_rpc_late_replies_total") >= late + 1, 20, "the second reply"
    )
    assert _received() == received + 2, "the request was not redelivered"
    assert ledger.started == ledger.effects, "the redelivery ran the handler again"
    assert list(ledger.effects.values()) == [1]
    assert_calls_sound([record], client)
    after = await tracked_call(client, 1, deadline=10)
    assert after.outcome == "result", after


async def test_b3_poison_message_bounded_then_dead_lettered(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
    settings: Settings,
) -> None:
    """B3: a cast that always fails retryably runs exactly max_retries+1 times, then is parked
    with reason retries_exhausted; a non-retryable failure is parked after one run."""
    max_retries = 2

    async def poison(key: str) -> None:
        if key.startswith("b3-fatal"):
            raise InvalidArgument("this input can never work")
        raise Unavailable("the dependency says no, every time")

    await run_app(
        work_service(ledger, before=poison), max_retries=max_retries, retry_base_delay=0.05
    )
    producer = await make_link()
    retryable = [f"b3-retry-{i}" for i in range(4)]
    fatal = [f"b3-fatal-{i}" for i in range(2)]
    parked_before = sample("burrow_dead_lettered_total", service="work", reason="retries_exhausted")
    await _publish_all(producer, ledger, namespace, retryable + fatal)
    dlq = Names(namespace).dead_letter_queue("work")

    async def all_parked() -> bool:
        return await broker.ready_count(dlq) == len(retryable) + len(fatal)

    await eventually(all_parked, 30, "every poison message in the DLQ")
    letters = {
        letter.message_id: letter for letter in await DeadLetterTool(settings, "work").list()
    }
    assert set(letters) == set(retryable + fatal)
    for key in retryable:
        assert letters[key].reason == "retries_exhausted", letters[key].summary()
        assert letters[key].error["details"]["attempts"] == max_retries + 1
        assert ledger.started[key] == max_retries + 1, f"{key}: {ledger.started[key]} runs"
    for key in fatal:
        assert letters[key].reason == "failed", letters[key].summary()
        assert letters[key].error["code"] == "INVALID_ARGUMENT"
        assert ledger.started[key] == 1, f"{key} retried although not retryable"
    assert sample(
        "burrow_dead_lettered_total", service="work", reason="retries_exhausted"
    ) == parked_before + len(retryable)
    names = Names(namespace)
    for level in range(3):
        assert await broker.ready_count(names.retry_queue(level)) == 0
    await drain_service(broker.url, ledger, namespace)
    assert ledger.dead == set(retryable + fatal)
    assert not ledger.processed


async def test_b4_transient_dependency_failure_retried_until_back(
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
) -> None:
    """B4: a dependency down for the first attempts: each cast is retried with back-off and
    processed once it is back; nothing dead-lettered, each side effect once."""
    keys = [f"b4-{i}" for i in range(5)]
    back = asyncio.Event()

    async def dependency(_key: str) -> None:
        if not back.is_set():
            raise ConnectionError("database unreachable")

    await run_app(work_service(ledger, before=dependency), max_retries=5, retry_base_delay=0.05)
    producer = await make_link()
    await _publish_all(producer, ledger, namespace, keys)
    await wait_until(lambda: all(ledger.started[k] >= 2 for k in keys), 20, "two failed runs each")
    back.set()
    await ledger.wait_processed(keys, 20)
    assert all(2 <= ledger.started[k] <= 6 for k in keys), ledger.started
    assert not ledger.duplicates()
    await drain_service(broker.url, ledger, namespace)
    assert not ledger.dead, ledger.summary()
    assert not ledger.queued, ledger.summary()


async def test_b5_backlog_in_flight_never_exceeds_prefetch(
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
) -> None:
    """B5: a backlog of 40 slow casts with prefetch=4: never more than 4 handlers at once (the
    rest waits in the broker, not in the process); all processed once."""
    prefetch = 4
    gate = asyncio.Event()
    running = 0
    peak = 0
    svc = Service("work")

    async def do(req: WorkRequest) -> WorkReply:
        """Count concurrent runs around a short sleep."""
        nonlocal running, peak
        ledger.begin(req.key)
        running += 1
        peak = max(peak, running)
        try:
            await gate.wait()
            await asyncio.sleep(req.delay_ms / 1000)
        finally:
            running -= 1
        ledger.effect(req.key)
        return WorkReply(key=req.key)

    svc.add_operation(do, name="do")
    app = await run_app(svc, prefetch=prefetch)
    producer = await make_link()
    keys = [f"b5-{i}" for i in range(40)]
    await _publish_all(producer, ledger, namespace, keys, delay_ms=30)
    await wait_until(lambda: running == prefetch, 10, "prefetch handlers running")
    queue = Names(namespace).commands_queue("work")

    async def held_by_broker() -> bool:
        # The backlog waits in the broker; only `prefetch` deliveries are out, unacked.
        return await broker.queue_counts(queue) == (len(keys) - prefetch, prefetch)

    await eventually(held_by_broker, 15, f"{len(keys) - prefetch} ready and {prefetch} unacked")
    assert running == prefetch
    assert app.servers[0].in_flight == prefetch
    gate.set()
    await ledger.wait_processed(keys, 30)
    assert peak == prefetch, f"{peak} handlers at once with prefetch={prefetch}"
    assert not ledger.duplicates()
    await drain_service(broker.url, ledger, namespace)


@pytest.mark.slow
async def test_b6_handler_timeout_fires_before_consumer_timeout(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
    settings: Settings,
) -> None:
    """B6: a handler longer than its per-handler timeout (below the broker's consumer timeout)
    is cut off: the call gets DEADLINE_EXCEEDED, the cast is retried then parked; the broker
    never has to close the channel."""
    await broker.set_consumer_timeout(3000)
    app = await run_app(work_service(ledger, timeout=0.5, retries=1), retry_base_delay=0.05)
    lost = watch_loss(app.transport.consumer)
    client = await make_client()
    producer = await make_link()
    record = await tracked_call(client, 0, deadline=10, delay_ms=5000)
    assert record.outcome == "timeout", record
    assert isinstance(record.error, DeadlineExceeded)
    assert record.elapsed < 5, "the handler ran to its end: no per-handler timeout"
    await _publish_all(producer, ledger, namespace, ["b6-slow"], delay_ms=5000)
    dlq = Names(namespace).dead_letter_queue("work")

    async def parked() -> bool:
        return await broker.ready_count(dlq) == 1

    await eventually(parked, 20, "the timed-out cast in the DLQ")
    [letter] = await DeadLetterTool(settings, "work").list()
    assert letter.reason == "retries_exhausted"
    assert letter.error["code"] == "DEADLINE_EXCEEDED"
    assert ledger.started["b6-slow"] == 2
    assert not ledger.processed, "a timed-out handler still produced its side effect"
    # Every run was cut at 0.5 s, well inside the broker's 3 s: it never closed the channel.
    assert not lost.is_set(), "the broker closed the channel: the handler timeout came too late"
    assert_calls_sound([record], client)


@pytest.mark.slow
async def test_b6_broker_consumer_timeout_never_crashes_the_service(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
) -> None:
    """B6: misconfigured (handler timeout above the broker's consumer timeout): the broker
    closes the channel, the late ack is dropped quietly, the link recovers and redelivers."""
    await broker.set_consumer_timeout(1500)
    app = await run_app(work_service(ledger, timeout=30), shutdown_grace=0.5)
    lost = watch_loss(app.transport.consumer)
    producer = await make_link()
    client = await make_client()
    with capture_logs() as logs:
        await _publish_all(producer, ledger, namespace, ["b6-held"], delay_ms=60_000)
        async with asyncio.timeout(30):
            await lost.wait()
        await wait_until(lambda: ledger.started["b6-held"] >= 2, 30, "the redelivery")
        await app.wait_ready(20)
        record = await tracked_call(client, 0, deadline=10)
    assert record.outcome == "result", record
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not [e for e in logs if "dispatch failed" in e["event"]]


async def test_b7_second_settle_is_ignored_by_the_broker_too(
    broker: PrivateBroker, run_app: RunApp, make_link: MakeLink, ledger: Ledger, namespace: str
) -> None:
    """B7: a real delivery settled again after Burrow acked it (ack, requeue, reject through
    its Delivery) reaches the broker once: no channel error, nothing redelivered. The same
    second ack sent past the guard does close the channel (the check can fail)."""
    settled: asyncio.Queue[Delivery] = asyncio.Queue()

    def settle_again(callback: DeliveryCallback) -> DeliveryCallback:
        async def on_delivery(delivery: Delivery) -> None:
            await callback(delivery)  # the server handles it and acks
            await delivery.ack()
            await delivery.requeue()
            await delivery.reject()
            await settled.put(delivery)

        return on_delivery

    def prepare(app: App) -> None:
        link = app.transport.consumer
        link.replace_consumers(
            replace(spec, callback=settle_again(spec.callback)) for spec in link.consumers
        )

    # Acks leave on the loop turn after their settle (none held), so the control's second ack
    # below reaches the broker on its own instead of merging into one multiple ack.
    app = await run_app(work_service(ledger), prepare=prepare, ack_delay=0)
    lost = watch_loss(app.transport.consumer)
    reconnects = sample("burrow_amqp_reconnects_total", link="consumer")
    received = _received()
    producer = await make_link()
    deliveries: list[Delivery] = []
    with capture_logs() as logs:
        # One after the other: the second proves the channel outlived the first's extra settles.
        for key in ("b7-0", "b7-1"):
            await publish_until_confirmed(producer, ledger, cast(namespace, key), give_up_after=10)
            async with asyncio.timeout(10):
                deliveries.append(await settled.get())
    assert [d.settled for d in deliveries] == [Settle.ACK, Settle.ACK]
    ignored = [e for e in logs if e["event"] == "delivery already settled"]
    assert [(e["first"], e["second"]) for e in ignored] == 2 * [
        (Settle.ACK, Settle.ACK),
        (Settle.ACK, Settle.REQUEUE),
        (Settle.ACK, Settle.REJECT),
    ]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not lost.is_set(), "the broker closed the channel: a second settle reached it"
    assert sample("burrow_amqp_reconnects_total", link="consumer") == reconnects
    assert app.transport.consumer.ready.is_set()
    assert ledger.started == ledger.effects == {"b7-0": 1, "b7-1": 1}, "redelivered"
    assert _received() == received + 2

    # Control: the same second ack past Delivery's guard is an unknown delivery tag to the
    # broker (PRECONDITION_FAILED), which closes the channel — what the guard prevents.
    first = deliveries[0]
    assert first.settle_fn is not None
    # The acks so far were scheduled at their settle; one loop turn lets them go first (the
    # second delivery may have been settled before this task's publish confirm woke it).
    await asyncio.sleep(0)
    await first.settle_fn(first, Settle.ACK)
    async with asyncio.timeout(10):
        await lost.wait()
    await app.wait_ready(20)
    await app.stop()
    await drain_service(broker.url, ledger, namespace)
    assert not ledger.queued, ledger.summary()
    assert not ledger.dead, ledger.summary()
    assert _received() == received + 2, "an acked delivery came back after the reconnect"
