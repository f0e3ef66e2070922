"""Faults B8 and B9 of RELIABILITY.md: acks that outlive their channel, and a graceful stop.

Both check the ledger oracle: nothing confirmed is lost, redeliveries are counted, not hidden.
"""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from service.topology import Names
from tests.faults.conftest import MakeLink, RunApp
from tests.faults.harness import (
    Ledger,
    PrivateBroker,
    cast,
    publish_until_confirmed,
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
    names = Names(namespace)
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
    await ledger.drain(
        broker.url,
        [names.request_queue("work"), names.commands_queue("work")],
        [names.dead_letter_queue("work")],
    )
    ledger.assert_sound()
    assert not ledger.queued


@pytest.mark.slow
async def test_b9_graceful_stop_under_load(
    broker: PrivateBroker, run_app: RunApp, make_link: MakeLink, ledger: Ledger, namespace: str
) -> None:
    """B9: App.stop under load finishes and acks in-flight work; the rest stays queued."""
    names = Names(namespace)
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
    await ledger.drain(
        broker.url,
        [names.request_queue("work"), names.commands_queue("work")],
        [names.dead_letter_queue("work")],
    )
    summary = ledger.assert_sound()
    assert not (ledger.queued & ledger.processed), f"finished work was not acked: {summary}"
    assert ledger.queued, f"stop came after all the work: nothing tested ({summary})"
    assert not ledger.duplicates()
