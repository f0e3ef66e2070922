"""`burrow dlq`: list, show, replay and purge a service's dead letters on the real broker."""

from __future__ import annotations

import asyncio

from service import Client, FailedPrecondition, Model, Service
from service.dead_letters import DeadLetterTool
from tests.conftest import AppFactory


class Order(Model):
    """An order to ship."""

    id: int


async def _wait_for(tool: DeadLetterTool, count: int) -> None:
    for _ in range(200):
        if len(await tool.list()) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} dead letters")


async def test_dead_letters_are_listed_shown_replayed_and_purged(
    start_app: AppFactory, client: Client
) -> None:
    """A parked cast is listed with its reason, replayed once the cause is fixed, then gone."""
    shipped: list[int] = []
    broken = True
    svc = Service("shipping")

    @svc.operation()
    async def ship(req: Order) -> Order:
        if broken:
            raise FailedPrecondition("warehouse closed")
        shipped.append(req.id)
        return req

    app = await start_app(svc)
    tool = DeadLetterTool(app.settings, "shipping")
    first = await client.cast("shipping.ship", {"id": 1})
    await client.cast("shipping.ship", {"id": 2})
    await _wait_for(tool, 2)

    letters = await tool.list()
    assert [letter.reason for letter in letters] == ["failed", "failed"]
    assert letters[0].summary()["route"] == "shipping.ship"
    assert letters[0].detail()["error"]["code"] == "FAILED_PRECONDITION"
    assert letters[0].body is None, "list keeps no bodies"
    [shown] = await tool.show([first])
    assert shown.detail()["body"] == {"id": 1}

    broken = False
    report = await tool.replay([first])
    assert (report.replayed, report.skipped, report.missing) == (1, [], [])
    for _ in range(100):
        if shipped:
            break
        await asyncio.sleep(0.05)
    assert shipped == [1]
    assert [letter.summary()["message_id"] for letter in await tool.list()] != [first]
    assert len(await tool.list()) == 1
    assert await tool.purge() == 1
    assert await tool.list() == []
