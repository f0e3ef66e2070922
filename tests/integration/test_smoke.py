"""The first thing a user does: call calc.add on a running service."""

from __future__ import annotations

from service import Client
from service.example import calc
from tests.conftest import AppFactory


async def test_call_add_returns_sum(start_app: AppFactory, client: Client) -> None:
    """calc.add over the real broker returns the sum."""
    await start_app(calc)
    assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}
