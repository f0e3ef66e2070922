"""Fault G2 of RELIABILITY.md: a three-node RabbitMQ cluster of our own, quorum queues, and the
node a client is connected to stopped mid-stream; clients fail over through the URL list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from service import Service
from service._amqp.transport import AmqpLink
from service._protocol.topology import service_topology
from service._protocol.vocabulary import Names
from tests.faults.conftest import MakeClient, MakeLink, RunApp, make_settings
from tests.faults.harness import (
    BrokerStartError,
    Ledger,
    PrivateBroker,
    PublishStream,
    assert_calls_sound,
    cast,
    tracked_call,
    watch_loss,
    work_service,
)

__all__: list[str] = []


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[PrivateBroker]]:
    """Three private nodes joined into one cluster; all stopped and deleted afterwards."""
    nodes: list[PrivateBroker] = []
    try:
        for name in ("burrowg2a", "burrowg2b", "burrowg2c"):
            nodes.append(PrivateBroker.start(name=name))
        for node in nodes[1:]:
            for args in (("stop_app",), ("join_cluster", nodes[0].node), ("start_app",)):
                result = node.ctl_sync(*args, timeout=120)
                if result.returncode != 0:
                    raise BrokerStartError(f"{node.node} {args[0]}: {result.stderr[-500:]}")
        yield nodes
    except BrokerStartError as exc:
        pytest.fail(f"cannot build the three-node cluster: {exc}", pytrace=False)
    finally:
        for node in reversed(nodes):
            node.stop_node()


@pytest.mark.slow
async def test_g2_publishers_fail_over_nothing_confirmed_lost(
    cluster: list[PrivateBroker],
    make_link: MakeLink,
    make_client: MakeClient,
    ledger: Ledger,
    namespace: str,
) -> None:
    """G2: stop the node the publishers are connected to mid-stream: they fail over through
    the comma-separated URL list and every confirmed message is in the quorum queue after."""
    first, *others = cluster
    urls = ",".join(node.url for node in cluster)
    names = Names(namespace)
    settings = make_settings(urls, namespace)
    declarer = AmqpLink("setup", settings, topology=service_topology(Service("work"), settings))
    declarer.start()
    await declarer.wait_ready(20)
    await declarer.close()
    producer = await make_link(url=urls)
    client = await make_client(url=urls)
    stream = PublishStream(producer, ledger, lambda i: cast(namespace, f"g2-{i}"))
    try:
        async with stream:
            await stream.confirmed(40, 20, "40 confirmed before")
            client_lost = watch_loss(client.link)
            producer_lost = watch_loss(producer)
            await first.stop_app()  # every link started on the first URL: this is their node
            await stream.confirmed(40, 60, "40 confirmed after")
            async with asyncio.timeout(10):
                await client_lost.wait()
            await client.link.wait_ready(30)  # the caller's link failed over too
        await ledger.drain(others[0].url, [names.commands_queue("work")])
        summary = ledger.assert_sound()
        assert ledger.confirmed <= ledger.queued, summary
        assert producer_lost.is_set(), f"the producer never lost its node: {summary}"
    finally:
        await first.start_app()


@pytest.mark.slow
async def test_g2_service_fails_over_and_rpc_resumes(
    cluster: list[PrivateBroker],
    run_app: RunApp,
    make_client: MakeClient,
    ledger: Ledger,
) -> None:
    """G2: stop the node a serving App is connected to: it fails over through the URL list
    and calls are answered again while that node is still down."""
    first = cluster[0]
    urls = ",".join(node.url for node in cluster)
    app = await run_app(work_service(ledger), url=urls)
    client = await make_client(url=urls)
    assert (await tracked_call(client, 0, deadline=10, ledger=ledger)).outcome == "result"
    try:
        lost = watch_loss(app.transport.consumer)
        await first.stop_app()
        async with asyncio.timeout(10):
            await lost.wait()
        await app.wait_ready(30)
        await client.link.wait_ready(30)
        records = [await tracked_call(client, i, deadline=10, ledger=ledger) for i in (1, 2)]
        assert all(r.outcome == "result" for r in records), records
        assert_calls_sound(records, client)
    finally:
        await first.start_app()
