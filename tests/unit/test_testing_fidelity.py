"""The fidelity scenarios on the in-memory broker: no RabbitMQ involved.

`tests/integration/test_fidelity.py` runs the very same scenarios on RabbitMQ.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from service import App, Client, Service, Settings
from service.testing import InMemoryBroker
from tests.integration.test_fidelity_scenarios import SCENARIOS, Env

__all__: list[str] = []


@pytest.fixture
async def memory_env(settings: Settings) -> AsyncIterator[tuple[Env, InMemoryBroker]]:
    """An environment whose apps, clients and links all live on one in-memory broker."""
    broker = InMemoryBroker()
    apps: list[App] = []
    clients: list[Client] = []

    async def start_app(*services: Service, **overrides: Any) -> App:
        app_settings = settings.model_copy(update=overrides) if overrides else settings
        app = App(*services, settings=app_settings, http=False, link_factory=broker.link_factory)
        apps.append(app)
        await app.start()
        await app.wait_ready(10)
        return app

    async def make_client(**overrides: Any) -> Client:
        client_settings = settings.model_copy(update=overrides) if overrides else settings
        client = Client(client_settings, link_factory=broker.link_factory)
        clients.append(client)
        await client.start()
        return client

    async def depth(queue: str) -> int:
        return len(broker.queue(queue))

    env = Env(
        backend="memory",
        settings=settings,
        start_app=start_app,
        make_client=make_client,
        link_factory=broker.link_factory,
        depth=depth,
    )
    yield env, broker
    await env.close()
    for client in clients:
        await client.close()
    for app in apps:
        await app.stop()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario_on_memory_broker(name: str, memory_env: tuple[Env, InMemoryBroker]) -> None:
    """Each fidelity scenario holds on the in-memory broker, which is then left idle."""
    env, broker = memory_env
    scenario: Callable[[Env], Awaitable[None]] = SCENARIOS[name]
    await scenario(env)
    if not name.startswith("queue_full"):  # held calls there run on past the scenario
        await broker.settled()
