"""Unit tests of topology: the names in a namespace, RPC queue arguments, definitions export.

These names are the protocol; changing one breaks every deployed caller.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from service import Model, Service
from service._protocol.config import Settings, load_settings
from service._protocol.topology import (
    DLQ_DELIVERY_LIMIT,
    ExchangeDecl,
    QueueDecl,
    Topology,
    retry_topology,
    service_topology,
    to_definitions,
)
from service._protocol.vocabulary import DIRECT_REPLY_TO, Names

__all__: list[str] = []


class Ping(Model):
    """A request and reply."""

    n: int


def _service(name: str) -> Service:
    svc = Service(name)

    async def ping(req: Ping) -> Ping:
        return req

    svc.add_operation(ping)
    return svc


@pytest.fixture
def shop() -> Settings:
    """Settings in namespace `shop`."""
    return load_settings(namespace="shop")


def _queue(topology: Topology, name: str) -> QueueDecl:
    matches = [q for q in topology.queues if q.name == name]
    assert len(matches) == 1, f"{name} declared {len(matches)} times"
    return matches[0]


def _bindings(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(b["source"], b["destination"], b["routing_key"]) for b in doc["bindings"]}


def test_names() -> None:
    """Exchanges and queues are named `<ns>.rpc`, `<ns>.dlx`, `<ns>.<svc>.requests|dlq`."""
    names = Names("shop")
    assert names.rpc_exchange == "shop.rpc"
    assert names.dead_letter_exchange == "shop.dlx"
    assert names.request_queue("calc") == "shop.calc.requests"
    assert names.dead_letter_queue("calc") == "shop.calc.dlq"
    assert DIRECT_REPLY_TO == "amq.rabbitmq.reply-to"


def test_service_topology_exchanges(shop: Settings) -> None:
    """A service declares the RPC topic exchange and the direct dead-letter exchange."""
    topo = service_topology(_service("calc"), shop)
    assert ExchangeDecl("shop.rpc", "topic") in topo.exchanges
    assert ExchangeDecl("shop.dlx", "direct") in topo.exchanges
    assert len({ex.name for ex in topo.exchanges}) == len(topo.exchanges)


def test_service_topology_request_queue_arguments(shop: Settings) -> None:
    """The request queue and the DLQ are quorum queues; a DLQ never dead-letters onwards."""
    topo = service_topology(_service("calc"), shop)
    args = _queue(topo, "shop.calc.requests").arguments
    assert args["x-queue-type"] == "quorum"
    assert isinstance(args.get("x-delivery-limit"), int)  # poison messages cannot loop forever
    assert "x-max-length" not in args
    dlq = _queue(topo, "shop.calc.dlq").arguments
    assert dlq["x-queue-type"] == "quorum"
    assert "x-dead-letter-exchange" not in dlq


def test_service_topology_bindings(shop: Settings) -> None:
    """Calls `calc.*` on `<ns>.rpc` reach the request queue; the DLX routes by the DLQ's name."""
    bindings = _bindings(to_definitions(service_topology(_service("calc"), shop)))
    assert ("shop.rpc", "shop.calc.requests", "calc.*") in bindings
    assert ("shop.dlx", "shop.calc.dlq", "shop.calc.dlq") in bindings


def test_bounded_request_queue_rejects_publish() -> None:
    """With max_queue_length the request queue is bounded with reject-publish; the DLQ is not."""
    settings = load_settings(namespace="shop", max_queue_length=100, queue_type="classic")
    topo = service_topology(_service("calc"), settings)
    requests = _queue(topo, "shop.calc.requests").arguments
    assert requests["x-max-length"] == 100
    assert requests["x-overflow"] == "reject-publish"
    assert requests["x-queue-type"] == "classic"
    assert "x-max-length" not in _queue(topo, "shop.calc.dlq").arguments


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_retry_ladder_doubles_its_delay_per_level(queue_type: str) -> None:
    """BURROW_RETRY_LEVELS holding queues: level L waits BURROW_RETRY_BASE_DELAY·2^L, then
    dead-letters through the default exchange, i.e. back into the queue named by its key."""
    settings = load_settings(
        namespace="shop", retry_levels=4, retry_base_delay=0.25, queue_type=queue_type
    )
    topo = retry_topology(settings)
    assert [(e.name, e.type) for e in topo.exchanges] == [
        (f"shop.retry.{level}", "fanout") for level in range(4)
    ]
    assert [(b.exchange, b.destination, b.key) for b in topo.bindings] == [
        (f"shop.retry.{level}", f"shop.retry.{level}.wait", "") for level in range(4)
    ]
    queues = [_queue(topo, f"shop.retry.{level}.wait") for level in range(4)]
    assert [q.arguments["x-message-ttl"] for q in queues] == [250, 500, 1000, 2000]
    for queue in queues:
        assert queue.arguments["x-dead-letter-exchange"] == ""
        assert queue.arguments["x-queue-type"] == queue_type
        assert "x-dead-letter-routing-key" not in queue.arguments


def test_service_topology_has_the_retry_ladder(shop: Settings) -> None:
    """A service declares every retry holding queue of the settings, the defaults 1…32 s."""
    ttls = {
        q.name: q.arguments["x-message-ttl"]
        for q in service_topology(_service("calc"), shop).queues
        if q.name.startswith("shop.retry.")
    }
    assert ttls == {f"shop.retry.{level}.wait": 1000 << level for level in range(6)}


def test_merge_removes_duplicates_keeps_order(shop: Settings) -> None:
    """Merging two services shares the exchanges once and keeps both services' queues."""
    calc, cart = service_topology(_service("calc"), shop), service_topology(_service("cart"), shop)
    merged = calc.merge(cart)
    names = [q.name for q in merged.queues]
    assert len(names) == len(set(names))
    assert names.index("shop.calc.requests") < names.index("shop.cart.requests")
    assert [ex.name for ex in merged.exchanges].count("shop.rpc") == 1
    assert len(merged.bindings) == len(set(merged.bindings))
    assert Topology().merge(merged).queues == merged.queues


def test_to_definitions_shape(shop: Settings) -> None:
    """The definitions export has durable, non-auto-delete entities in the given vhost."""
    topo = service_topology(_service("calc"), shop)
    doc = to_definitions(topo, vhost="prod")
    assert set(doc) == {"policies", "exchanges", "queues", "bindings"}
    [policy] = doc["policies"]
    assert policy["vhost"] == "prod"
    assert policy["definition"] == {"delivery-limit": DLQ_DELIVERY_LIMIT}
    assert re.fullmatch(policy["pattern"], "shop.calc.dlq")
    assert re.fullmatch(policy["pattern"], "shop.scheduler.dlq")
    assert not re.fullmatch(policy["pattern"], "shop.calc.requests")
    rpc = next(ex for ex in doc["exchanges"] if ex["name"] == "shop.rpc")
    assert rpc == {
        "name": "shop.rpc",
        "vhost": "prod",
        "type": "topic",
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }
    queue = next(q for q in doc["queues"] if q["name"] == "shop.calc.requests")
    assert queue == {
        "name": "shop.calc.requests",
        "vhost": "prod",
        "durable": True,
        "auto_delete": False,
        "arguments": _queue(topo, "shop.calc.requests").arguments,
    }
    binding = next(b for b in doc["bindings"] if b["routing_key"] == "calc.*")
    assert binding == {
        "source": "shop.rpc",
        "vhost": "prod",
        "destination": "shop.calc.requests",
        "destination_type": "queue",
        "routing_key": "calc.*",
        "arguments": {},
    }
    assert len(doc["queues"]) == len(topo.queues)
    assert len(doc["bindings"]) == len(topo.bindings)
    assert len(doc["exchanges"]) == len(topo.exchanges)


def test_to_definitions_default_vhost(shop: Settings) -> None:
    """Without a vhost, entities go to `/`."""
    doc = to_definitions(service_topology(_service("calc"), shop))
    assert {item["vhost"] for part in doc.values() for item in part} == {"/"}
