"""Fault D10 of RELIABILITY.md: a full request queue answers the caller at once.

The queue is bounded (`max_queue_length`, reject-publish) and its one consumer is held busy.
"""

from __future__ import annotations

import asyncio

from service import ResourceExhausted
from tests.faults.conftest import MakeClient, RunApp
from tests.faults.harness import Ledger, assert_calls_sound, tracked_call, wait_until, work_service

__all__: list[str] = []


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
