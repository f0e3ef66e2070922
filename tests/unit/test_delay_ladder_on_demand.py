"""The delay ladder costs nothing until a delay needs it (issue 26 item 7), on the in-memory
broker: what a namespace with one service holds, the first delayed publish declaring the ladder
(once per connection, again after a reconnect or a deletion), and a namespace nobody serves."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service import App, Client, Model, Service, Settings, Unroutable
from service._protocol.messages import command, schedule
from service._protocol.topology import delay_ladder, service_topology
from service._protocol.vocabulary import LEVELS, Kind, Names, delay_route
from service.testing import InMemoryBroker, MemoryLink
from tests.unit.conftest import ServeApp

__all__: list[str] = []

MAX_QUEUES = 12  # the bound for a namespace with one service and no delayed message


class Note(Model):
    """A command."""

    text: str


def notes_service(seen: asyncio.Queue[str]) -> Service:
    """`notes.add` puts each text it gets in `seen`."""
    notes = Service("notes")

    @notes.operation()
    async def add(req: Note) -> Note:
        """Record the text."""
        seen.put_nowait(req.text)
        return req

    return notes


def ladder_queues(broker: InMemoryBroker, namespace: str) -> list[str]:
    """The delay ladder's holding queues the broker holds for `namespace`."""
    names = Names(namespace)
    return [
        names.delay_queue(level)
        for level in range(LEVELS)
        if names.delay_queue(level) in broker.queues
    ]


def namespace_queues(broker: InMemoryBroker, namespace: str) -> list[str]:
    """Every queue of `namespace`."""
    return sorted(name for name in broker.queues if name.startswith(f"{namespace}."))


async def next_text(seen: asyncio.Queue[str]) -> str:
    """The next text the handler got (bounded wait)."""
    async with asyncio.timeout(5):
        return await seen.get()


def client_link(client: Client) -> MemoryLink:
    """The client's in-memory link."""
    assert isinstance(client.link, MemoryLink)
    return client.link


async def test_one_service_holds_eleven_queues_and_no_ladder(
    serve_app: ServeApp, settings: Settings
) -> None:
    """A namespace with one service and no delayed message holds 11 queues (≤ 12): the
    service's three, the ready queue, the scheduler DLQ and the six retry holding queues."""
    _, _, broker = await serve_app(notes_service(asyncio.Queue()))
    names = Names(settings.namespace)
    held = namespace_queues(broker, settings.namespace)
    assert held == sorted(
        [
            names.request_queue("notes"),
            names.commands_queue("notes"),
            names.dead_letter_queue("notes"),
            names.delay_ready_queue,
            names.scheduler_dead_letter_queue,
            *(names.retry_queue(level) for level in range(settings.retry_levels)),
        ]
    )
    assert len(held) == 11 <= MAX_QUEUES
    assert ladder_queues(broker, settings.namespace) == []


async def test_app_topology_still_names_the_ladder(settings: Settings) -> None:
    """`App.topology` (what `burrow definitions` exports and a clean-up deletes) keeps the
    ladder; only the consumer link's declared topology leaves it out."""
    broker = InMemoryBroker()
    app = App(
        notes_service(asyncio.Queue()),
        settings=settings,
        http=False,
        link_factory=broker.link_factory,
    )
    everything = {queue.name for queue in app.topology.queues}
    declared = {queue.name for queue in app.transport.consumer.topology.queues}  # type: ignore[attr-defined]
    ladder = {queue.name for queue in delay_ladder(settings).queues}
    assert len(ladder) == LEVELS
    assert ladder <= everything
    assert not ladder & declared
    assert everything - ladder == declared
    assert everything == {q.name for q in service_topology(Service("notes"), settings).queues}


async def test_first_delayed_cast_declares_the_ladder_then_arrives(
    serve_app: ServeApp, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first delayed cast declares all 25 holding queues before it is published, enters
    the ladder confirmed, and runs once it is due."""
    seen: asyncio.Queue[str] = asyncio.Queue()
    _, client, broker = await serve_app(notes_service(seen))
    assert ladder_queues(broker, settings.namespace) == []
    now = float(int(time.time()))  # whole seconds: the route is 3 units however slow we run
    monkeypatch.setattr(time, "time", lambda: now)

    await client.cast("notes.add", {"text": "later"}, delay=0.25)

    assert len(ladder_queues(broker, settings.namespace)) == LEVELS
    [scheduled] = [m for m in broker.published if m.kind == "scheduled" and m.link == "client"]
    assert scheduled.outcome == "confirmed"
    assert scheduled.queues == (Names(settings.namespace).delay_queue(1),)  # ⌈2.5⌉ = 0b11
    assert await next_text(seen) == "later"


async def test_ladder_is_declared_once_per_connection(
    serve_app: ServeApp, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten concurrent first delayed casts declare the ladder once; later ones not again."""
    seen: asyncio.Queue[str] = asyncio.Queue()
    _, client, broker = await serve_app(notes_service(seen))
    applied: list[int] = []
    apply = broker.apply

    def counting(topology: Any) -> None:
        applied.append(len(topology.queues))
        apply(topology)

    monkeypatch.setattr(broker, "apply", counting)
    await asyncio.gather(
        *(client.cast("notes.add", {"text": f"n{i}"}, delay=0.1) for i in range(10))
    )
    await client.cast("notes.add", {"text": "n10"}, delay=0.1)
    assert applied == [LEVELS]
    assert sorted([await next_text(seen) for _ in range(11)]) == sorted(f"n{i}" for i in range(11))


async def test_ladder_is_declared_again_after_a_reconnect(
    serve_app: ServeApp, settings: Settings
) -> None:
    """Deleted while the client was disconnected, the ladder is declared again by the first
    delayed cast on the new connection, and that cast arrives."""
    seen: asyncio.Queue[str] = asyncio.Queue()
    _, client, broker = await serve_app(notes_service(seen))
    await client.cast("notes.add", {"text": "first"}, delay=0.1)
    assert await next_text(seen) == "first"

    for name in ladder_queues(broker, settings.namespace):
        broker.delete_queue(name)
    await client_link(client).disconnect()
    assert ladder_queues(broker, settings.namespace) == []

    await client.cast("notes.add", {"text": "second"}, delay=0.1)
    assert len(ladder_queues(broker, settings.namespace)) == LEVELS
    assert await next_text(seen) == "second"


async def test_ladder_deleted_under_a_live_connection_is_declared_again(
    serve_app: ServeApp, settings: Settings
) -> None:
    """A ladder deleted while the link stayed connected: the publish into it comes back
    returned, the link declares the ladder again and publishes once more; it arrives once."""
    seen: asyncio.Queue[str] = asyncio.Queue()
    _, client, broker = await serve_app(notes_service(seen))
    await client.cast("notes.add", {"text": "first"}, delay=0.1)
    assert await next_text(seen) == "first"
    for name in ladder_queues(broker, settings.namespace):
        broker.delete_queue(name)

    await client.cast("notes.add", {"text": "again"}, delay=0.2)

    outcomes = [m.outcome for m in broker.published if m.kind == "scheduled" and m.link == "client"]
    assert outcomes == ["confirmed", "returned", "confirmed"]
    assert len(ladder_queues(broker, settings.namespace)) == LEVELS
    assert await next_text(seen) == "again"
    await broker.drain()
    assert seen.empty()


async def test_delayed_cast_to_a_namespace_nobody_serves_is_unroutable(
    settings: Settings,
) -> None:
    """Without a ready queue (no service ever ran in the namespace) a delayed cast is
    `Unroutable`, counted as returned, and declares nothing: a typo in the namespace does not
    leave 25 queues behind."""
    broker = InMemoryBroker()
    client = Client(settings, link_factory=broker.link_factory)
    returned = {"kind": "scheduled", "outcome": "returned"}
    before = REGISTRY.get_sample_value("burrow_messages_published_total", returned) or 0.0
    await client.start()
    try:
        with pytest.raises(Unroutable, match="service not deployed"):
            await client.cast("notes.add", {"text": "lost"}, delay=1)
    finally:
        await client.close()
    assert namespace_queues(broker, settings.namespace) == []
    assert [m for m in broker.published if m.kind == "scheduled"] == []
    assert REGISTRY.get_sample_value("burrow_messages_published_total", returned) == before + 1


async def test_first_publish_is_routed_for_the_delay_left_after_declaring(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A declaration that takes time does not make the first delayed message late: its route
    is spelled again from `x-burrow-due` after the ladder is declared."""
    broker = InMemoryBroker()
    names = Names(settings.namespace)
    broker.apply(service_topology(Service("notes"), settings, ladder=False))
    link = MemoryLink(broker, "client", settings)
    link.start()
    clock = [1_700_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    message = schedule(
        names,
        command(names, "notes.add", b'{"text":"x"}', Kind.CAST, trace=None),
        due_at=clock[0] + 1.0,
    )
    assert message.routing_key == delay_route(10)
    apply = broker.apply

    def slow(topology: Any) -> None:
        clock[0] += 0.6  # the declaration took 600 ms of wall clock
        apply(topology)

    monkeypatch.setattr(broker, "apply", slow)
    await link.publish(message, kind="scheduled", mandatory=True)
    [published] = broker.published
    assert published.routing_key == delay_route(4)
    await link.close()
