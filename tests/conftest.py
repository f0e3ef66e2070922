"""Shared fixtures: a fresh namespace per test on the real broker, apps and clients that clean up.

Every test that touches RabbitMQ gets its own namespace (`bt<run><n>`), so runs never collide;
at the end of the session every queue and exchange of this run's prefix is deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import aio_pika
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import App, Client, Service, Settings, load_settings, testing
from service._protocol import tracing
from service._protocol.topology import Topology
from tests.brokers import AMQP_URL, TEST_BROKER

__all__ = [
    "AMQP_URL",
    "RUN_PREFIX",
    "AppFactory",
    "ClientFactory",
    "quick_settings",
    "delete_topology",
    "Recorded",
]

RUN_PREFIX = f"bt{uuid.uuid4().hex[:6]}"
_counter = itertools.count()

AppFactory = Callable[..., Awaitable[App]]
ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Each test starts with structlog's defaults and no bound context."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test or run uses."""
    return f"{RUN_PREFIX}{next(_counter)}"


def quick_settings(namespace: str, **overrides: Any) -> Settings:
    """Settings for `namespace` against the test broker, with an ephemeral HTTP port and short
    timeouts (the `settings` fixture's; module-scoped fixtures build theirs with it)."""
    quick: dict[str, Any] = {
        "http_port": 0,
        "http_host": "127.0.0.1",
        "default_deadline": 5.0,
        "shutdown_grace": 5.0,
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.5,
        "job_result_ttl": 60.0,  # job queues of a test vanish soon after it
    }
    return load_settings(amqp_url=AMQP_URL, namespace=namespace, **(quick | overrides))


@pytest.fixture
def settings(namespace: str) -> Settings:
    """Settings for this test's namespace, with an ephemeral HTTP port and short timeouts."""
    return quick_settings(namespace)


@pytest.fixture
async def start_app(settings: Settings) -> AsyncIterator[AppFactory]:
    """Start an App for the given services (ready when returned); stopped after the test."""
    apps: list[App] = []

    async def start(*services: Service, **overrides: Any) -> App:
        app_settings = settings.model_copy(update=overrides) if overrides else settings
        app = App(*services, settings=app_settings)
        apps.append(app)
        await app.start()
        await app.wait_ready(10)
        return app

    yield start
    for app in apps:
        await app.stop()
    await delete_topology(*(app.topology for app in apps))


async def delete_topology(*topologies: Topology, url: str = AMQP_URL) -> None:
    """Delete what a test's apps declared, so the broker does not pile up queues."""
    await testing.delete_topology(*topologies, url=url)


@pytest.fixture
async def make_client(settings: Settings) -> AsyncIterator[ClientFactory]:
    """Connected Clients on this test's namespace; closed after the test."""
    clients: list[Client] = []

    async def make(**overrides: Any) -> Client:
        client = Client(settings.model_copy(update=overrides) if overrides else settings)
        clients.append(client)
        await client.start()
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    """One connected Client on this test's namespace."""
    return await make_client()


@pytest.fixture
async def amqp_channel() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A raw aio-pika channel, for publishing hand-made (hostile) messages."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    yield channel
    await connection.close()


def _rabbitmqctl_names(what: str) -> list[str]:
    """This run's queues or exchanges on the test broker, by its CLI (none when it fails)."""
    try:
        return TEST_BROKER.names(what, RUN_PREFIX)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return []


@pytest.fixture(scope="session", autouse=True)
def _delete_run_entities() -> Iterator[None]:
    """After the run, delete every queue and exchange this run declared."""
    yield
    queues, exchanges = _rabbitmqctl_names("list_queues"), _rabbitmqctl_names("list_exchanges")
    asyncio.run(asyncio.wait_for(testing.delete_entities(queues, exchanges, AMQP_URL), 120))


class Recorded(NamedTuple):
    """Where this test's spans go, and the provider that records them."""

    exporter: InMemorySpanExporter
    provider: TracerProvider


@pytest.fixture
def otel() -> Iterator[Recorded]:
    """Burrow's spans recorded in memory for this test only (the global provider untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield Recorded(exporter, provider)
    tracing.use(None)
    provider.shutdown()
