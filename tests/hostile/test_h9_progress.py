"""H9: a consumer whose every prefetch slot is held past the handler timeout is not ready."""

from __future__ import annotations

import asyncio
import contextlib

from service import Client, Model, Service
from service._protocol.vocabulary import Names
from tests.conftest import AppFactory
from tests.faults.harness import wait_until

__all__: list[str] = []


class Number(Model):
    """A number."""

    x: int


def _stubborn(release: asyncio.Event) -> Service:
    svc = Service("stuck")

    async def hold(req: Number) -> Number:
        """Ignore cancellation until released: a handler that cannot be stopped."""
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.02)
        return req

    svc.add_operation(hold)
    return svc


async def test_h9_all_prefetch_slots_stuck_is_not_ready(
    start_app: AppFactory, client: Client, namespace: str
) -> None:
    """Readiness turns false, naming the queue, when every prefetch slot outlives its timeout."""
    release = asyncio.Event()
    app = await start_app(_stubborn(release), prefetch=2, handler_timeout=0.3, publish_timeout=0.3)
    assert app.health.ready
    for x in range(2):
        await client.cast("stuck.hold", {"x": x})
    queue = Names(namespace).commands_queue("stuck")

    def stalled() -> bool:
        return any(
            queue in problem and "no progress" in problem for problem in app.health.problems()
        )

    try:
        await wait_until(stalled, timeout=10, what="readiness to report the stalled consumer")
        assert not app.health.ready
    finally:
        release.set()
    await wait_until(lambda: app.health.ready, timeout=10, what="readiness to come back")


async def test_h9_one_stuck_slot_of_two_is_still_ready(
    start_app: AppFactory, client: Client
) -> None:
    """A single held slot while others progress does not make the service unready."""
    release = asyncio.Event()
    app = await start_app(_stubborn(release), prefetch=2, handler_timeout=0.3, publish_timeout=0.3)
    await client.cast("stuck.hold", {"x": 1})
    await asyncio.sleep(1.0)  # past handler + publish timeout: the slot now counts as stuck
    try:
        assert app.health.ready, app.health.problems()
    finally:
        release.set()
