"""Unit-test fixtures: an `App` and a `Client` on a fresh in-memory broker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from service import App, Client, Service, Settings
from service.testing import InMemoryBroker

__all__ = ["ServeApp"]

ServeApp = Callable[..., Awaitable[tuple[App, Client, InMemoryBroker]]]


@pytest.fixture
async def serve_app(settings: Settings) -> AsyncIterator[ServeApp]:
    """Start services (settings overridable per call) with a connected Client on a fresh
    in-memory broker; both stop afterwards, the client first."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*services: Service, **overrides: Any) -> tuple[App, Client, InMemoryBroker]:
            config = settings.model_copy(update=overrides) if overrides else settings
            broker = InMemoryBroker()
            app = App(*services, settings=config, http=False, link_factory=broker.link_factory)
            client = Client(config, link_factory=broker.link_factory)
            await app.start()
            stack.push_async_callback(app.stop)
            await app.wait_ready(5)
            await client.start()
            stack.push_async_callback(client.close)
            return app, client, broker

        yield start
