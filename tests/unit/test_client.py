"""`Client` on the in-memory broker against a small in-memory `App`: call, typed remote errors,
deadlines, cast, submit, emit, the fallback to submit on a full queue, and delayed delivery."""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service import (
    Client,
    ConfigError,
    ConnectionLost,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Model,
    NotFound,
    QueueFull,
    ResourceExhausted,
    Service,
    ServiceError,
    Settings,
    Unroutable,
)
from service._protocol.registry import Operation
from service._protocol.vocabulary import delay_route
from service.testing import InMemoryBroker, MemoryLink, PublishedMessage
from tests.unit.conftest import ServeApp

__all__: list[str] = []

SLACK = 0.5  # seconds a deadline may be overrun by the loop on a busy machine


class Item(Model):
    """What the shop is asked for."""

    sku: str
    quantity: int = 1


class Placed(Model):
    """What the shop answers (and announces as `shop.placed`)."""

    sku: str
    total_cents: int


class Shop:
    """A small service whose handlers say when they run and can be held at a gate."""

    def __init__(self) -> None:
        self.service = Service("shop")
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered: asyncio.Queue[str] = asyncio.Queue()
        self.notes: asyncio.Queue[Item] = asyncio.Queue()
        self.audited: asyncio.Queue[Placed] = asyncio.Queue()
        svc = self.service
        svc.event("shop.placed", Placed)

        @svc.operation()
        async def place(req: Item) -> Placed:
            """Price an order; a quantity below one is INVALID_ARGUMENT."""
            if req.quantity < 1:
                raise InvalidArgument("quantity must be positive", details={"field": "quantity"})
            return Placed(sku=req.sku, total_cents=450 * req.quantity)

        @svc.operation()
        async def hold(req: Item) -> Placed:
            """Say it entered, then wait at the gate."""
            self.entered.put_nowait(req.sku)
            await self.gate.wait()
            return Placed(sku=req.sku, total_cents=0)

        @svc.operation()
        async def note(req: Item) -> Placed:
            """Record the item (the cast target)."""
            self.notes.put_nowait(req)
            return Placed(sku=req.sku, total_cents=0)

        @svc.operation()
        async def crash(req: Item) -> Placed:
            """Fail with an error that is not a ServiceError."""
            raise RuntimeError("the till is on fire")

        @svc.subscribe("shop.placed", group="audit")
        async def audit(event: Placed) -> None:
            """Record every placed order."""
            self.audited.put_nowait(event)

    @property
    def place(self) -> Operation[Any, Any]:
        """The declared `shop.place` operation."""
        operation = self.service.get("shop.place")
        assert operation is not None
        return operation


Serve = Callable[..., Awaitable[tuple[Client, InMemoryBroker]]]


@pytest.fixture
def serve(serve_app: ServeApp) -> Serve:
    """Run services on a fresh in-memory broker with a connected Client; both stop afterwards."""

    async def start(*services: Service, **overrides: Any) -> tuple[Client, InMemoryBroker]:
        _, client, broker = await serve_app(*services, **overrides)
        return client, broker

    return start


@pytest.fixture
def shop(serve: Serve) -> Iterator[Shop]:
    """A fresh `Shop`; its gate is opened before the app stops (it depends on `serve` for
    that order), so a held handler never holds up the shutdown."""
    found = Shop()
    yield found
    found.gate.set()


async def next_of(queue: asyncio.Queue[Any]) -> Any:
    """The next item a handler put in `queue` (bounded wait)."""
    async with asyncio.timeout(5):
        return await queue.get()


def sent(broker: InMemoryBroker, sku: str) -> list[PublishedMessage]:
    """What the client published carrying `sku` in its body, in order."""
    return [m for m in broker.published if m.link == "client" and m.json().get("sku") == sku]


# -- call ------------------------------------------------------------------------------------


async def test_call_returns_the_reply(serve: Serve, shop: Shop) -> None:
    """A call answers the handler's reply as JSON, as a model with `reply=`, and as the
    declared Operation's reply model."""
    client, broker = await serve(shop.service)
    assert await client.call("shop.place", {"sku": "tea", "quantity": 2}) == {
        "sku": "tea",
        "total_cents": 900,
    }
    typed = await client.call("shop.place", Item(sku="tea"), reply=Placed)
    assert typed == Placed(sku="tea", total_cents=450)
    assert await client.call(shop.place, {"sku": "tea"}) == Placed(sku="tea", total_cents=450)
    await broker.drain()
    [request, *_] = sent(broker, "tea")
    assert (request.exchange, request.routing_key, request.kind) == (
        f"{client.names.namespace}.rpc",
        "shop.place",
        "request",
    )
    assert request.headers["x-burrow-kind"] == "call"
    assert client.rpc.pending == {}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (("shop.place", {"sku": "tea", "quantity": 0}), (InvalidArgument, "quantity must be")),
        (("shop.place", {"sku": "tea", "quantity": "many"}), (InvalidArgument, None)),
        (("shop.nope", {}), (NotFound, "unknown operation")),
        (("ghost.op", {}), (Unroutable, None)),
        (("shop.crash", {"sku": "tea"}), (Internal, None)),
    ],
    ids=["raised", "invalid-request", "unknown-operation", "unknown-service", "crash"],
)
async def test_remote_errors_come_back_typed(
    serve: Serve,
    shop: Shop,
    request_: tuple[str, dict[str, Any]],
    expected: tuple[type[ServiceError], str | None],
) -> None:
    """Each remote failure is raised as its own ServiceError class, at once (no deadline)."""
    client, _ = await serve(shop.service)
    (route, payload), (error, message) = request_, expected
    started = time.monotonic()
    with pytest.raises(error, match=message) as caught:
        await client.call(route, payload, timeout=5)
    assert time.monotonic() - started < 1
    assert type(caught.value) is error
    assert client.rpc.pending == {}


class Receipt(Model):
    """A reply model the shop's answer does not match (it has no `receipt_id`)."""

    receipt_id: str


async def test_reply_not_matching_the_reply_model_is_internal_and_counted(
    serve: Serve, shop: Shop
) -> None:
    """A reply that does not fit `reply=` raises Internal (the answer's fault), counted so."""
    client, _ = await serve(shop.service)
    labels = {"operation": "shop.place", "outcome": "INTERNAL"}
    before = REGISTRY.get_sample_value("burrow_rpc_client_calls_total", labels) or 0.0
    with pytest.raises(Internal, match="does not match the reply model Receipt") as raised:
        await client.call("shop.place", {"sku": "tea"}, reply=Receipt)
    assert raised.value.details["reason"] == "schema"
    assert REGISTRY.get_sample_value("burrow_rpc_client_calls_total", labels) == before + 1
    assert client.rpc.pending == {}


async def test_remote_error_keeps_its_details(serve: Serve, shop: Shop) -> None:
    """The handler's error details reach the caller; an unknown operation is not Unroutable."""
    client, _ = await serve(shop.service)
    with pytest.raises(InvalidArgument) as raised:
        await client.call("shop.place", {"sku": "tea", "quantity": 0})
    assert raised.value.details == {"field": "quantity"}
    with pytest.raises(NotFound) as unknown:
        await client.call("shop.nope", {})
    assert not isinstance(unknown.value, Unroutable)


async def test_no_reply_is_deadline_exceeded_at_the_deadline(serve: Serve, shop: Shop) -> None:
    """A handler that does not answer in time fails the call with DeadlineExceeded when the
    deadline passes, not before and not much later; the late reply is discarded."""
    client, broker = await serve(shop.service)
    shop.gate.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        await client.call("shop.hold", {"sku": "slow"}, timeout=0.3)
    elapsed = loop.time() - started
    assert 0.3 - 0.01 <= elapsed < 0.3 + SLACK
    assert client.rpc.pending == {}
    [request] = sent(broker, "slow")
    assert request.expiration == "300"  # the request itself expires with its deadline
    shop.gate.set()
    await broker.drain()
    assert await client.call("shop.place", {"sku": "tea"}) == {"sku": "tea", "total_cents": 450}


async def test_call_refuses_a_deadline_that_is_not_positive(serve: Serve, shop: Shop) -> None:
    """timeout=0 or below is a ValueError before anything is published."""
    client, broker = await serve(shop.service)
    with pytest.raises(ValueError, match="positive"):
        await client.call("shop.place", {"sku": "tea"}, timeout=0)
    assert sent(broker, "tea") == []


async def test_payload_json_cannot_carry_is_refused_locally(serve: Serve, shop: Shop) -> None:
    """NaN in a payload is a ValueError at the caller; nothing is sent."""
    client, broker = await serve(shop.service)
    with pytest.raises(ValueError, match="NaN"):
        await client.call("shop.place", {"sku": "tea", "quantity": math.nan})
    assert broker.published == []


async def test_closing_the_client_fails_pending_calls(serve: Serve, shop: Shop) -> None:
    """A call still waiting when the client closes fails with ConnectionLost at once."""
    client, _ = await serve(shop.service)
    shop.gate.clear()
    pending = asyncio.ensure_future(client.call("shop.hold", {"sku": "held"}, timeout=30))
    assert await next_of(shop.entered) == "held"
    await client.close()
    with pytest.raises(ConnectionLost):
        await pending


# -- full queue and fallback_to_submit -------------------------------------------------------


async def test_full_request_queue_fails_fast_or_falls_back_to_submit(
    serve: Serve, shop: Shop
) -> None:
    """With the request queue at its limit a call is QueueFull (a ResourceExhausted) at once;
    with fallback_to_submit it is submitted as a job and answers within the same deadline."""
    client, broker = await serve(shop.service, queue_type="classic", max_queue_length=1, prefetch=1)
    requests = client.names.request_queue("shop")
    shop.gate.clear()
    first = asyncio.ensure_future(client.call("shop.hold", {"sku": "a"}, timeout=10))
    assert await next_of(shop.entered) == "a"  # the only consumer slot is taken
    queued = asyncio.ensure_future(client.call("shop.hold", {"sku": "b"}, timeout=10))
    assert (await client.link.peek(requests, 5)).body == b'{"sku":"b"}'  # the queue is full

    with pytest.raises(QueueFull) as full:
        await client.call("shop.hold", {"sku": "c"}, timeout=10)
    assert isinstance(full.value, ResourceExhausted)
    assert [m.outcome for m in sent(broker, "c")] == ["nacked"]

    fallback = asyncio.ensure_future(
        client.call("shop.hold", {"sku": "d"}, timeout=10, fallback_to_submit=True)
    )
    assert await next_of(shop.entered) == "d"  # run as a job, from the commands queue
    shop.gate.set()
    assert await fallback == {"sku": "d", "total_cents": 0}
    assert await first == {"sku": "a", "total_cents": 0}
    assert await queued == {"sku": "b", "total_cents": 0}
    refused, submitted = sent(broker, "d")
    assert (refused.kind, refused.outcome) == ("request", "nacked")
    assert (submitted.kind, submitted.outcome) == ("command", "confirmed")
    assert submitted.exchange == client.names.commands_exchange
    assert submitted.headers["x-burrow-kind"] == "submit"
    assert submitted.headers["x-job-id"] == submitted.message_id


async def test_fallback_job_not_matching_the_reply_model_is_internal(
    serve: Serve, shop: Shop
) -> None:
    """A fallback job whose result does not fit `reply=` raises Internal, not a pydantic error."""
    client, _ = await serve(shop.service, queue_type="classic", max_queue_length=1, prefetch=1)
    requests = client.names.request_queue("shop")
    shop.gate.clear()
    first = asyncio.ensure_future(client.call("shop.hold", {"sku": "a"}, timeout=10))
    assert await next_of(shop.entered) == "a"
    queued = asyncio.ensure_future(client.call("shop.hold", {"sku": "b"}, timeout=10))
    assert (await client.link.peek(requests, 5)).body == b'{"sku":"b"}'  # the queue is full
    fallback = asyncio.ensure_future(
        client.call("shop.hold", {"sku": "d"}, timeout=10, fallback_to_submit=True, reply=Receipt)
    )
    assert await next_of(shop.entered) == "d"  # run as a job
    shop.gate.set()
    with pytest.raises(Internal, match="does not match the reply model Receipt"):
        await fallback
    await asyncio.gather(first, queued)


# -- cast, submit, emit ----------------------------------------------------------------------


async def test_cast_is_confirmed_and_runs(serve: Serve, shop: Shop) -> None:
    """cast returns the message id once confirmed; the handler then runs once."""
    client, broker = await serve(shop.service)
    message_id = await client.cast("shop.note", {"sku": "tea"})
    [cast] = sent(broker, "tea")
    assert (cast.message_id, cast.outcome, cast.kind) == (message_id, "confirmed", "command")
    assert (cast.exchange, cast.routing_key) == (client.names.commands_exchange, "shop.note")
    assert cast.headers["x-burrow-kind"] == "cast"
    assert (cast.persistent, cast.mandatory) == (True, True)
    assert await next_of(shop.notes) == Item(sku="tea")
    await broker.drain()
    assert shop.notes.empty()


async def test_cast_to_a_service_never_deployed_is_unroutable(serve: Serve, shop: Shop) -> None:
    """A cast nobody consumes is returned by the broker: Unroutable, not a silent loss."""
    client, _ = await serve(shop.service)
    with pytest.raises(Unroutable):
        await client.cast("ghost.note", {"sku": "tea"})


async def test_submit_and_job_result(serve: Serve, shop: Shop) -> None:
    """submit returns a Job once confirmed, declaring nothing; its result is pushed to it, and
    read again through another handle on the same id (which asks the service)."""
    client, broker = await serve(shop.service)
    queues = set(broker.queues)
    job = await client.submit("shop.place", {"sku": "tea", "quantity": 3})
    assert await job.result(timeout=5) == {"sku": "tea", "total_cents": 1350}
    assert set(broker.queues) == queues
    assert await client.job(job.id, "shop.place").result(timeout=5) == {
        "sku": "tea",
        "total_cents": 1350,
    }
    [submitted] = sent(broker, "tea")
    assert submitted.headers["x-burrow-kind"] == "submit"
    assert submitted.headers["x-job-id"] == job.id
    assert submitted.correlation_id == job.id
    assert isinstance(client.link, MemoryLink)
    assert submitted.reply_to == client.link.reply_address  # the client's reply consumer


async def test_failed_job_raises_its_error(serve: Serve, shop: Shop) -> None:
    """A job whose handler failed raises that error, typed, from result()."""
    client, _ = await serve(shop.service)
    job = await client.submit("shop.place", {"sku": "tea", "quantity": 0})
    with pytest.raises(InvalidArgument, match="quantity must be positive"):
        await job.result(timeout=5)


async def test_unknown_job_is_not_found(serve: Serve, shop: Shop) -> None:
    """A job id nobody submitted has no result queue: NotFound."""
    client, _ = await serve(shop.service)
    with pytest.raises(NotFound):
        await client.job("never-submitted").result(timeout=1)


async def test_submit_with_a_bad_callback_is_refused_locally(serve: Serve, shop: Shop) -> None:
    """A callback that is not a routing key is a ValueError; nothing is published."""
    client, broker = await serve(shop.service)
    with pytest.raises(ValueError, match="routing key"):
        await client.submit("shop.place", {"sku": "tea"}, callback="not a key!")
    assert sent(broker, "tea") == []


async def test_unroutable_submit_is_refused_and_forgotten(serve: Serve, shop: Shop) -> None:
    """A submit nobody consumes is Unroutable; no queue is left and no job awaits a push."""
    client, broker = await serve(shop.service)
    before = set(broker.queues)
    with pytest.raises(Unroutable):
        await client.submit("ghost.op", {"sku": "tea"})
    assert set(broker.queues) == before
    assert len(client.rpc.awaiting) == 0


async def test_emit_reaches_a_subscription(serve: Serve, shop: Shop) -> None:
    """emit is True when a subscription queue took the event, and its handler gets it;
    False when nothing subscribes to that key."""
    client, broker = await serve(shop.service)
    assert await client.emit("shop.placed", {"sku": "tea", "total_cents": 450}) is True
    assert await next_of(shop.audited) == Placed(sku="tea", total_cents=450)
    assert await client.emit("shop.refunded", {"sku": "tea"}) is False
    await broker.drain()
    [event] = [m for m in sent(broker, "tea") if m.routing_key == "shop.placed"]
    assert (event.exchange, event.kind, event.outcome) == (
        client.names.events_exchange,
        "event",
        "confirmed",
    )


# -- delayed delivery ------------------------------------------------------------------------

NOW = 1_700_000_000.0  # a frozen wall clock: whole milliseconds as a float


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Freeze `time.time` (the wall clock delays are computed from; the loop's clock runs)."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    return NOW


def _scheduled(broker: InMemoryBroker, sku: str) -> PublishedMessage:
    [message] = [m for m in sent(broker, sku) if m.kind == "scheduled"]
    return message


async def test_delayed_cast_enters_the_ladder_and_arrives_no_earlier(
    serve: Serve, shop: Shop, frozen_clock: float
) -> None:
    """cast(delay=0.25) publishes to the ladder's top exchange keyed 3 units (rounded up from
    2.5), with its real route in the target headers; it runs after at least 300 ms."""
    client, broker = await serve(shop.service)
    loop = asyncio.get_running_loop()
    started = loop.time()
    message_id = await client.cast("shop.note", {"sku": "later"}, delay=0.25)
    scheduled = _scheduled(broker, "later")
    assert scheduled.exchange == f"{client.names.namespace}.delay.24"
    assert scheduled.routing_key == delay_route(3)
    assert (scheduled.mandatory, scheduled.persistent, scheduled.outcome) == (
        True,
        True,
        "confirmed",
    )
    assert scheduled.message_id == message_id
    assert scheduled.headers["x-burrow-target-exchange"] == client.names.commands_exchange
    assert scheduled.headers["x-burrow-target-key"] == "shop.note"
    assert scheduled.headers["x-burrow-due"] == NOW * 1000 + 250
    assert scheduled.headers["x-burrow-kind"] == "cast"
    assert await next_of(shop.notes) == Item(sku="later")
    assert loop.time() - started >= 0.3 - 0.01


async def test_submit_at_a_time_is_delayed_and_its_result_pushed_after_it_ran(
    serve: Serve, shop: Shop, frozen_clock: float
) -> None:
    """submit(at=…) goes through the ladder to its time, keeping the reply address; the result
    reaches the job after it ran."""
    client, broker = await serve(shop.service)
    at = datetime.datetime.fromtimestamp(NOW + 0.15, datetime.UTC)
    job = await client.submit("shop.place", {"sku": "at"}, at=at)
    scheduled = _scheduled(broker, "at")
    assert scheduled.routing_key == delay_route(2)
    assert scheduled.headers["x-burrow-target-key"] == "shop.place"
    assert scheduled.headers["x-job-id"] == job.id
    assert isinstance(client.link, MemoryLink)
    assert scheduled.reply_to == client.link.reply_address
    assert await job.result(timeout=5) == {"sku": "at", "total_cents": 450}


async def test_delayed_emit_is_scheduled_for_the_events_exchange(
    serve: Serve, shop: Shop, frozen_clock: float
) -> None:
    """emit(delay=…) is True once scheduled, targets the events exchange, then reaches the
    subscription."""
    client, broker = await serve(shop.service)
    assert await client.emit("shop.placed", {"sku": "ev", "total_cents": 1}, delay=0.1) is True
    scheduled = _scheduled(broker, "ev")
    assert scheduled.routing_key == delay_route(1)
    assert scheduled.headers["x-burrow-target-exchange"] == client.names.events_exchange
    assert scheduled.headers["x-burrow-target-key"] == "shop.placed"
    assert await next_of(shop.audited) == Placed(sku="ev", total_cents=1)


@pytest.mark.parametrize(
    ("when", "problem"),
    [
        ({"delay": 1.0, "at": datetime.datetime.now(datetime.UTC)}, "not both"),
        ({"at": datetime.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"delay": -1.0}, "negative"),
        ({"delay": 40 * 86400.0}, "cannot schedule more than"),
    ],
    ids=["both", "naive", "negative", "beyond-the-ladder"],
)
async def test_impossible_delays_are_refused_locally(
    serve: Serve, shop: Shop, frozen_clock: float, when: dict[str, Any], problem: str
) -> None:
    """delay and at together, a naive at, a negative delay or one beyond ~38.8 days are a
    ValueError; nothing is published."""
    client, broker = await serve(shop.service)
    with pytest.raises(ValueError, match=problem):
        await client.cast("shop.note", {"sku": "never"}, **when)
    assert sent(broker, "never") == []


# -- starting --------------------------------------------------------------------------------


async def test_unreadable_secret_file_is_a_clear_error(settings: Settings) -> None:
    """A missing password file fails at once and names the variable."""
    update = {"amqp_password_file": "/nonexistent/password"}
    client = Client(settings.model_copy(update=update))
    with pytest.raises(ConfigError, match="BURROW_AMQP_PASSWORD_FILE"):
        await client.start(timeout=5)
    await client.close()
