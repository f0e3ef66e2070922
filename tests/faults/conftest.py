"""Fault-test fixtures: one private RabbitMQ node per session, a proxy, apps, clients, a ledger.

The shared test broker is never touched: `settings` here points every fixture at our own node,
started from the test broker's installation (`tests.brokers`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import aio_pika
import pytest

from service import App, Client, Service, Settings, load_settings
from service._amqp.link import ConsumerSpec
from service._amqp.transport import AmqpLink
from service._protocol.topology import Topology
from tests.conftest import delete_topology
from tests.faults.harness import BrokerStartError, FaultProxy, Ledger, PrivateBroker

__all__ = ["RunApp", "MakeClient", "MakeLink", "make_settings"]

RunApp = Callable[..., Awaitable[App]]
MakeClient = Callable[..., Awaitable[Client]]
MakeLink = Callable[..., Awaitable[AmqpLink]]

_STOP_TIMEOUT = 30.0  # App.stop / Client.close taking longer than this is itself a defect


async def _close_all(what: str, closers: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Close each, in order; one that hangs fails the test instead of hanging the session."""
    for close in closers:
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                await close()
        except TimeoutError:
            pytest.fail(f"{what} did not return within {_STOP_TIMEOUT}s")


async def _delete_declared(topologies: Sequence[Topology], broker: PrivateBroker) -> None:
    """The node lives for the session: without this, every test's queues (quorum: one Raft log
    each) pile up and a later crash recovery (A2) replays all of them. Best effort."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(30):
            await delete_topology(*topologies, url=broker.url)


def make_settings(url: str, namespace: str, **overrides: Any) -> Settings:
    """Settings for fault tests: fast reconnects, a 2 s heartbeat, short timeouts."""
    values: dict[str, Any] = {
        "amqp_url": url,
        "namespace": namespace,
        "http_port": 0,
        "http_host": "127.0.0.1",
        "default_deadline": 5.0,
        "shutdown_grace": 5.0,
        "publish_timeout": 3.0,
        "connect_timeout": 2.0,
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.5,
        "heartbeat": 2,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture(scope="session")
def broker() -> Iterator[PrivateBroker]:
    """A private RabbitMQ node for this session; stopped and deleted at the end."""
    try:
        node = PrivateBroker.start()
    except BrokerStartError as exc:
        pytest.fail(f"cannot start the private RabbitMQ node for fault tests: {exc}", pytrace=False)
    yield node
    node.stop_node()


@pytest.fixture(autouse=True)
async def _heal_broker(broker: PrivateBroker) -> AsyncIterator[None]:
    """After each test, undo the faults it left on the node (app stopped, alarms, users)."""
    yield
    await broker.heal()


@pytest.fixture
def settings(namespace: str, broker: PrivateBroker) -> Settings:
    """This test's settings, on the private node (overrides the shared-node fixture)."""
    return make_settings(broker.url, namespace)


@pytest.fixture
async def amqp_channel(broker: PrivateBroker) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A raw aio-pika channel on the private node (overrides the shared-node fixture)."""
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel(publisher_confirms=True)
    yield channel
    await connection.close()


@pytest.fixture
async def proxy(broker: PrivateBroker) -> AsyncIterator[FaultProxy]:
    """A loopback TCP proxy in front of the private node, passing traffic until told not to."""
    fault_proxy = FaultProxy(broker.port)
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.close()


@pytest.fixture
def ledger() -> Ledger:
    """This test's publish / side-effect ledger."""
    return Ledger()


@pytest.fixture
async def run_app(namespace: str, broker: PrivateBroker) -> AsyncIterator[RunApp]:
    """Start an App on the private node (or `url=`); stopped, bounded, after the test.

    Args (of the factory): services; `url` (default: the node); `wait` for readiness (default
    True); `prepare`, called with the App before it starts (to instrument it); any other
    keyword is a setting.
    """
    apps: list[App] = []

    async def run(
        *services: Service,
        url: str | None = None,
        wait: bool = True,
        prepare: Callable[[App], None] | None = None,
        **overrides: Any,
    ) -> App:
        app = App(*services, settings=make_settings(url or broker.url, namespace, **overrides))
        apps.append(app)
        if prepare is not None:
            prepare(app)
        await app.start()
        if wait:
            await app.wait_ready(20)
        return app

    yield run
    await _close_all("App.stop", [app.stop for app in apps])
    await _delete_declared([app.topology for app in apps], broker)


@pytest.fixture
async def make_client(namespace: str, broker: PrivateBroker) -> AsyncIterator[MakeClient]:
    """Clients on the private node (or `url=`); closed, bounded, after the test.

    Args (of the factory): `url`; `start` (default True: connect before returning); settings.
    """
    clients: list[Client] = []

    async def make(url: str | None = None, *, start: bool = True, **overrides: Any) -> Client:
        client = Client(make_settings(url or broker.url, namespace, **overrides))
        clients.append(client)
        if start:
            await client.start(timeout=20)
        return client

    yield make
    await _close_all("Client.close", [client.close for client in clients])


@pytest.fixture
async def make_link(namespace: str, broker: PrivateBroker) -> AsyncIterator[MakeLink]:
    """Bare Links (the test's producer, or `consumers=`) on the node or `url=`; closed after."""
    links: list[AmqpLink] = []

    async def make(
        name: str = "producer",
        url: str | None = None,
        topology: Topology | None = None,
        consumers: Sequence[ConsumerSpec] = (),
        **overrides: Any,
    ) -> AmqpLink:
        settings = make_settings(url or broker.url, namespace, **overrides)
        link = AmqpLink(name, settings, topology=topology)
        link.replace_consumers(consumers)
        links.append(link)
        link.start()
        await link.wait_ready(20)
        return link

    yield make
    await _close_all("Link.close", [link.close for link in links])
    await _delete_declared([link.topology for link in links], broker)
