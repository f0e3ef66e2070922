"""The fidelity scenarios on RabbitMQ: what the in-memory broker promises, the real one does.

`tests/unit/test_testing_fidelity.py` runs the very same scenarios on `service.testing`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest

from service import Settings
from service._amqp.transport import AmqpLink
from tests.conftest import AppFactory, ClientFactory
from tests.integration.test_fidelity_scenarios import SCENARIOS, Env

__all__: list[str] = []


@pytest.fixture
async def rabbit_env(
    settings: Settings,
    start_app: AppFactory,
    make_client: ClientFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> AsyncIterator[Env]:
    """An environment on the real broker, built from the shared fixtures."""
    raw = await amqp_channel.get_underlay_channel()

    async def depth(queue: str) -> int:
        declared = await raw.queue_declare(queue, passive=True)
        return int(declared.message_count or 0)

    env = Env(
        backend="rabbitmq",
        settings=settings,
        start_app=start_app,
        make_client=make_client,
        link_factory=AmqpLink,
        depth=depth,
    )
    yield env
    await env.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario_on_rabbitmq(name: str, rabbit_env: Env) -> None:
    """Each fidelity scenario holds on RabbitMQ exactly as on the in-memory broker."""
    scenario: Callable[[Env], Awaitable[None]] = SCENARIOS[name]
    await scenario(rabbit_env)
