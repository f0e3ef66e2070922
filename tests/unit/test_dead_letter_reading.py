"""Reading dead letters without a broker: `DeadLetter.from_delivery` (also of aio-pika messages) on
letters Burrow parked, letters the broker dead-lettered, and poisoned letters — which become a
letter with a `problem`, never an exception (docs/protocol.md §8, "Dead letters")."""

from __future__ import annotations

import datetime
import decimal
from typing import Any, cast

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp.header import ContentHeader

from service import Settings
from service._amqp.tools import delivery_from_message
from service._protocol.types import Delivery, Outgoing, Undecodable
from service._protocol.vocabulary import Names
from service._serving.dead_letters import MAX_ERROR_CHARS, DeadLetter, json_line, replay_target
from service.testing import InMemoryBroker

__all__: list[str] = []

DLQ = "rt.orders.dlq"
BODY = b'{"sku":"tea","quantity":2}'
WHEN = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
ERROR = '{"code":"UNAVAILABLE","message":"db down","details":{"attempts":5},"retryable":true}'


def letter(headers: Any = None, **props: Any) -> Delivery:
    """A delivery taken from the DLQ, as the transport builds it."""
    fields: dict[str, Any] = {
        "body": BODY,
        "routing_key": DLQ,
        "exchange": "rt.dlx",
        "message_id": "m-1",
        "correlation_id": "c-1",
        "type": "orders.place",
        "content_type": "application/json",
        "queue": DLQ,
    }
    fields.update(props)
    delivery = Delivery(**fields)
    delivery.headers = headers if headers is not None else {}
    return delivery


def parked(**overrides: Any) -> dict[str, Any]:
    """The headers Burrow adds when it parks a failed cast."""
    headers: dict[str, Any] = {
        "x-burrow-kind": "cast",
        "x-burrow-dead-reason": "retries_exhausted",
        "x-burrow-dead-error": ERROR,
        "x-burrow-original-exchange": "rt.commands",
        "x-burrow-original-routing-key": "orders.place",
        "x-burrow-dead-at": 1_900_000_000_000,
    }
    headers.update(overrides)
    return headers


def broker_death(**entry: Any) -> dict[str, Any]:
    """An x-death entry as RabbitMQ writes it."""
    return {
        "count": 1,
        "reason": "delivery_limit",
        "queue": "rt.orders.commands",
        "exchange": "rt.commands",
        "routing-keys": ["orders.place"],
        "time": WHEN,
        **entry,
    }


def dead_lettered(*deaths: Any, **extra: Any) -> dict[str, Any]:
    """The headers of a letter the broker moved into the DLQ on its own (no x-burrow-*)."""
    return {
        "x-death": list(deaths) or [broker_death()],
        "x-first-death-reason": "delivery_limit",
        "x-first-death-queue": "rt.orders.commands",
        "x-first-death-exchange": "rt.commands",
        **extra,
    }


def _readable(found: DeadLetter) -> None:
    """What `burrow dlq list` and `show` print can always be printed."""
    assert json_line(found.summary())
    assert json_line(found.detail())


# -- parked by Burrow ------------------------------------------------------------------------


def test_parked_letter_is_read_from_burrows_headers() -> None:
    """Reason, decoded error, original route, time and delivery count come from x-burrow-*;
    a summary keeps no headers, properties or body."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-delivery-count": 2})))
    assert found == DeadLetter(
        message_id="m-1",
        reason="retries_exhausted",
        error={
            "code": "UNAVAILABLE",
            "message": "db down",
            "details": {"attempts": 5},
            "retryable": True,
        },
        original_exchange="rt.commands",
        original_routing_key="orders.place",
        dead_at=1_900_000_000_000,
        size=len(BODY),
        delivery_count=2,
    )
    assert found.summary() == {
        "message_id": "m-1",
        "reason": "retries_exhausted",
        "route": "orders.place",
        "dead_at": 1_900_000_000_000,
        "error": "db down",
        "size": len(BODY),
        "delivery_count": 2,
        "problem": None,
    }


def test_full_letter_keeps_headers_properties_and_body() -> None:
    """`full=True` (for `show`) also keeps every header, the properties and the body."""
    headers = parked()
    found = DeadLetter.from_delivery(letter(headers, app_id="shop"), full=True)
    assert found.headers == headers
    assert found.body == BODY
    assert found.properties is not None
    assert found.properties["message_id"] == "m-1"
    assert found.properties["app_id"] == "shop"
    assert found.properties["routing_key"] == DLQ
    detail = found.detail()
    assert detail["body"] == {"sku": "tea", "quantity": 2}
    assert detail["original_exchange"] == "rt.commands"
    _readable(found)


def test_parked_by_the_default_exchange_has_an_empty_exchange() -> None:
    """A letter first sent through the default exchange replays there (exchange "")."""
    found = DeadLetter.from_delivery(
        letter(parked(**{"x-burrow-original-exchange": "", "x-burrow-original-routing-key": "q"}))
    )
    assert (found.original_exchange, found.original_routing_key, found.problem) == ("", "q", None)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("", None),
        ("not json", "not json"),
        (b'{"code":"INTERNAL"}', {"code": "INTERNAL"}),
        ('{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
    ],
    ids=["empty", "text", "bytes", "big-int"],
)
def test_error_header_is_json_or_its_text(value: object, error: object) -> None:
    """The parked error is decoded JSON (integers exact), else shown as its text."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-burrow-dead-error": value})))
    assert found.error == error
    assert found.problem is None


def test_a_long_error_is_clipped_in_a_summary_only() -> None:
    """`list` keeps at most MAX_ERROR_CHARS of the error; `show` reads it whole."""
    long = '{"message": "' + "x" * MAX_ERROR_CHARS + '"}'
    summary = DeadLetter.from_delivery(letter(parked(**{"x-burrow-dead-error": long})))
    assert summary.error == long[:MAX_ERROR_CHARS] + "…"
    full = DeadLetter.from_delivery(letter(parked(**{"x-burrow-dead-error": long})), full=True)
    assert full.error == {"message": "x" * MAX_ERROR_CHARS}


# -- where a replay puts it ------------------------------------------------------------------

NAMES = Names("rt")


def test_an_event_letter_is_replayed_onto_its_own_queue_only() -> None:
    """An event's x-burrow-original-queue is the replay's target, through the default
    exchange (not the events exchange: every group would get it); `show` prints it."""
    event = parked(**{
        "x-burrow-original-exchange": "rt.events",
        "x-burrow-original-routing-key": "orders.created",
        "x-burrow-original-queue": "rt.billing.on_created.events",
    })  # fmt: skip
    found = DeadLetter.from_delivery(letter(event), full=True)
    assert found.original_queue == "rt.billing.on_created.events"
    assert found.summary()["route"] == "orders.created"
    assert found.detail()["original_queue"] == "rt.billing.on_created.events"
    assert replay_target(found, NAMES, "orders") == ("", "rt.billing.on_created.events")


@pytest.mark.parametrize("queue", ["rt.orders.commands", b"rt.orders.requests"])
def test_a_call_or_cast_letter_keeps_its_route_to_the_same_queue(queue: object) -> None:
    """A letter from the service's own commands or request queue goes to its original
    exchange and routing key (which reach that queue and name the operation when `type` is
    absent)."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-burrow-original-queue": queue})))
    assert found.original_queue == (queue.decode() if isinstance(queue, bytes) else queue)
    assert replay_target(found, NAMES, "orders") == ("rt.commands", "orders.place")


def test_an_event_letter_without_its_queue_is_not_sent_to_every_subscription() -> None:
    """An event parked without x-burrow-original-queue (an earlier Burrow) is not replayed to
    the events exchange; a cast without it still goes to its exchange and routing key."""
    event = parked(**{
        "x-burrow-original-exchange": "rt.events",
        "x-burrow-original-routing-key": "orders.created",
    })  # fmt: skip
    target = replay_target(DeadLetter.from_delivery(letter(event)), NAMES, "orders")
    assert isinstance(target, str)
    assert "every subscription" in target
    cast = DeadLetter.from_delivery(letter(parked()))
    assert cast.original_queue is None
    assert replay_target(cast, NAMES, "orders") == ("rt.commands", "orders.place")


@pytest.mark.parametrize(
    ("queue", "problem"),
    [(5, "not text"), ("", "empty"), ("q" * 256, "255 bytes"), (DLQ, "back into the DLQ")],
    ids=["not-text", "empty", "too-long", "the-dlq"],
)
def test_an_unusable_original_queue_is_a_problem(queue: object, problem: str) -> None:
    """An original queue that is not text, empty, too long or the DLQ itself is not a target."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-burrow-original-queue": queue})))
    target = replay_target(found, NAMES, "orders")
    assert isinstance(target, str)
    assert problem in target
    _readable(found)


def test_a_broker_dead_letter_goes_back_to_the_queue_of_its_latest_death() -> None:
    """No x-burrow-* headers: x-last-death-queue, else the newest x-death entry's queue, else
    x-first-death-queue (not where it first died: a retried message died in a holding queue
    first)."""
    retried = [
        broker_death(reason="rejected", queue="rt.audit.on_created.events"),
        broker_death(queue="rt.retry.0.wait", reason="expired", exchange="rt.retry.0"),
    ]
    headers = dead_lettered(*retried, **{"x-first-death-queue": "rt.retry.0.wait"})
    found = DeadLetter.from_delivery(letter(headers))
    assert replay_target(found, NAMES, "orders") == ("", "rt.audit.on_created.events")
    headers["x-last-death-queue"] = "rt.orders.commands"
    assert DeadLetter.from_delivery(letter(headers)).original_queue == "rt.orders.commands"
    only_first = {"x-first-death-queue": "rt.orders.commands", "x-first-death-reason": "expired"}
    assert DeadLetter.from_delivery(letter(only_first)).original_queue == "rt.orders.commands"


# -- dead-lettered by the broker -------------------------------------------------------------


def test_broker_dead_letter_reads_reason_and_route_from_x_death() -> None:
    """With no x-burrow-* headers the reason is `broker:<first death reason>` and the route
    is the x-death entry's exchange and first routing key."""
    found = DeadLetter.from_delivery(letter(dead_lettered(**{"x-delivery-count": 21})))
    assert found.reason == "broker:delivery_limit"
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.place")
    assert (found.error, found.dead_at, found.problem) == (None, None, None)
    assert found.delivery_count == 21
    _readable(found)


def test_the_oldest_x_death_entry_holds_the_original_route() -> None:
    """RabbitMQ lists the newest death first: the route is the last entry's."""
    headers = dead_lettered(
        broker_death(
            queue="rt.retry.0.wait",
            reason="expired",
            exchange="rt.retry.0",
            **{"routing-keys": ["rt.orders.commands"]},
        ),
        broker_death(reason="rejected", **{"routing-keys": ["orders.place", "cc.key"]}),
    )
    found = DeadLetter.from_delivery(letter(headers))
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.place")


def test_x_death_without_an_exchange_falls_back_to_the_first_death_exchange() -> None:
    """An entry without `exchange` takes x-first-death-exchange."""
    entry = broker_death()
    del entry["exchange"]
    found = DeadLetter.from_delivery(letter(dead_lettered(entry)))
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.place")


@pytest.mark.parametrize(
    "entry",
    [
        {"routing-keys": []},
        {"routing-keys": "orders.place"},
        {"routing-keys": [5]},
        {"routing-keys": [b"\xff\xfe"]},
    ],
    ids=["no-keys", "keys-not-a-list", "key-not-text", "key-not-utf8"],
)
def test_x_death_without_a_readable_route_is_a_problem(entry: dict[str, Any]) -> None:
    """An x-death entry whose routing keys cannot be read leaves the route unknown, with why."""
    found = DeadLetter.from_delivery(letter(dead_lettered(broker_death(**entry))))
    assert found.reason == "broker:delivery_limit"
    assert (found.original_exchange, found.original_routing_key) == (None, None)
    assert found.problem is not None
    assert "x-death has no route" in found.problem


async def test_a_letter_the_in_memory_broker_dead_lettered_reads_as_rabbitmqs(
    settings: Settings,
) -> None:
    """A message dropped by a full queue into its DLQ reads as `broker:maxlen`, routed where it
    was first published."""
    broker = InMemoryBroker()
    broker.declare_exchange("rt.commands", "topic")
    broker.declare_exchange("rt.dlx", "direct")
    broker.declare_queue(DLQ)
    broker.bind("rt.dlx", DLQ, DLQ)
    broker.declare_queue(
        "rt.orders.commands",
        {"x-max-length": 1, "x-dead-letter-exchange": "rt.dlx", "x-dead-letter-routing-key": DLQ},
    )
    broker.bind("rt.commands", "rt.orders.commands", "orders.*")
    link = broker.link_factory("pub", settings)
    link.start()
    await link.wait_ready(1)
    try:
        for n in (1, 2):  # the second pushes the first out of the head
            await link.publish(
                Outgoing("rt.commands", "orders.place", BODY, message_id=f"m-{n}"),
                kind="command",
                mandatory=True,
            )
    finally:
        await link.close()
    [moved] = broker.queue(DLQ).messages
    delivery = Delivery(
        body=moved.body,
        routing_key=moved.routing_key,
        exchange=moved.exchange,
        message_id=moved.message_id,
        headers=moved.headers,
        queue=DLQ,
    )
    found = DeadLetter.from_delivery(delivery)
    assert (found.message_id, found.reason) == ("m-1", "broker:maxlen")
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.place")
    assert found.problem is None


# -- poisoned letters ------------------------------------------------------------------------


def test_letter_without_any_header_replays_to_where_it_was_delivered_from() -> None:
    """No x-burrow-* and no x-death: the route is the exchange and key it arrived with."""
    found = DeadLetter.from_delivery(letter({}, exchange="rt.commands", routing_key="orders.x"))
    assert found.reason == "unknown"
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.x")


@pytest.mark.parametrize("deaths", ["x-death as text", 7, {"queue": "q"}], ids=repr)
def test_x_death_that_is_not_a_list_is_ignored(deaths: object) -> None:
    """An x-death of another type is no record: the route falls back to the delivery's, which
    here leads back into the DLQ — a problem, not an exception."""
    found = DeadLetter.from_delivery(letter({"x-death": deaths}))
    assert (found.original_exchange, found.original_routing_key) == (None, None)
    assert found.problem == "no original route (it would go straight back into the DLQ)"


@pytest.mark.parametrize("entry", [1, "entry", None, ["nested"]], ids=repr)
def test_x_death_entries_that_are_not_tables_are_a_problem(entry: object) -> None:
    """A non-table oldest entry has no route; the letter still reads."""
    found = DeadLetter.from_delivery(letter(dead_lettered(entry)))
    assert found.reason == "broker:delivery_limit"
    assert found.original_routing_key is None
    assert found.problem is not None


def test_bytes_headers_are_read_as_their_utf8_text() -> None:
    """pika, Java and amqplib send byte arrays: UTF-8 ones read as text, JSON error too."""
    headers = {
        "x-burrow-dead-reason": b"handler_error",
        "x-burrow-dead-error": bytearray(b'{"code":"INTERNAL","message":"boom"}'),
        "x-burrow-original-exchange": b"rt.commands",
        "x-burrow-original-routing-key": bytearray(b"orders.place"),
    }
    found = DeadLetter.from_delivery(letter(headers))
    assert found.reason == "handler_error"
    assert found.error == {"code": "INTERNAL", "message": "boom"}
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.place")
    assert found.problem is None


def test_non_utf8_route_is_a_problem_not_an_error() -> None:
    """An original route that is not UTF-8 cannot be replayed: said in `problem`."""
    found = DeadLetter.from_delivery(
        letter(parked(**{"x-burrow-original-routing-key": b"\xff\xfeorders"}))
    )
    assert (found.original_exchange, found.original_routing_key) == (None, None)
    assert found.problem == "the original route cannot be read (x-burrow-original-* not text)"
    assert found.reason == "retries_exhausted"


def test_route_longer_than_amqp_allows_is_a_problem() -> None:
    """A route of more than 255 bytes could never be published: said in `problem`."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-burrow-original-routing-key": "k" * 256})))
    assert found.original_routing_key is None
    assert found.problem == "the original route cannot be read (longer than 255 bytes)"


def test_route_back_into_the_dlq_is_a_problem() -> None:
    """A replay must not send a letter straight back into its own DLQ."""
    found = DeadLetter.from_delivery(
        letter(parked(**{"x-burrow-original-exchange": "", "x-burrow-original-routing-key": DLQ}))
    )
    assert found.original_routing_key is None
    assert found.problem == "no original route (it would go straight back into the DLQ)"


def test_undecodable_properties_marker_is_the_problem() -> None:
    """When the shim could not decode the properties, its marker is the problem and the route
    is unreadable (the headers are gone)."""
    marker = Undecodable.of(b"", "properties could not be decoded: ValueError")
    found = DeadLetter.from_delivery(letter({"x-burrow-undecodable": marker}))
    assert found.problem is not None
    assert "properties could not be decoded: ValueError" in found.problem
    assert "headers undecodable" in found.problem
    assert found.original_routing_key is None
    _readable(found)


def test_undecodable_message_id_and_header_are_named() -> None:
    """An undecodable property or header is named in `problem`; the id is shown as its escape."""
    bad = Undecodable.of(b"m-\xff", "short string is not UTF-8")
    found = DeadLetter.from_delivery(letter(parked(custom=bad), message_id=bad), full=True)
    assert found.message_id == "m-\\xff"
    assert type(found.message_id) is str
    assert found.problem is not None
    assert "message_id" in found.problem
    assert "'custom'" in found.problem
    assert found.reason == "retries_exhausted"
    _readable(found)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-burrow-dead-at", "soon"),
        ("x-burrow-dead-at", True),
        ("x-burrow-dead-at", 1.5),
        ("x-burrow-dead-at", None),
        ("x-delivery-count", "2"),
        ("x-delivery-count", False),
        ("x-delivery-count", [2]),
    ],
    ids=repr,
)
def test_numbers_of_the_wrong_type_are_unknown(name: str, value: object) -> None:
    """A dead-at or delivery count that is not an integer (booleans included) reads as None."""
    found = DeadLetter.from_delivery(letter(parked(**{name: value})))
    assert found.dead_at is None if name == "x-burrow-dead-at" else found.delivery_count is None
    assert found.reason == "retries_exhausted"


@pytest.mark.parametrize("value", [42, {"code": "X"}, ["a"], b"\xff"], ids=repr)
def test_error_that_is_not_text_is_a_problem(value: object) -> None:
    """An error header of another type (or not UTF-8) is not shown, and that is said."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-burrow-dead-error": value})))
    assert found.error is None
    assert found.problem == "x-burrow-dead-error is not text"


@pytest.mark.parametrize("value", [7, ["retries_exhausted"], b"\xff", None], ids=repr)
def test_reason_that_is_not_text_falls_back(value: object) -> None:
    """An unreadable x-burrow-dead-reason reads as the broker's reason, else `unknown`."""
    assert DeadLetter.from_delivery(letter(parked(**{"x-burrow-dead-reason": value}))).reason == (
        "unknown"
    )
    headers = {**dead_lettered(), "x-burrow-dead-reason": value}
    assert DeadLetter.from_delivery(letter(headers)).reason == "broker:delivery_limit"


@pytest.mark.parametrize("headers", [["x-death"], "headers", 7], ids=repr)
def test_headers_that_are_not_a_table_never_raise(headers: object) -> None:
    """Even headers that are not a table give a letter (id and size kept), never an error."""
    found = DeadLetter.from_delivery(letter(cast(Any, headers)), full=True)
    assert (found.message_id, found.size) == ("m-1", len(BODY))
    _readable(found)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_a_header_holding_nan_or_infinity_still_prints(value: float) -> None:
    """AMQP doubles can be NaN or infinite; `show` must still print the letter."""
    found = DeadLetter.from_delivery(letter(parked(**{"x-weight": value})), full=True)
    _readable(found)


def test_a_huge_reason_and_id_are_clipped() -> None:
    """Ids and reasons are shown at most 255 characters long."""
    found = DeadLetter.from_delivery(
        letter(parked(**{"x-burrow-dead-reason": "r" * 10_000}), message_id="m" * 10_000)
    )
    assert found.reason == "r" * 255
    assert found.message_id == "m" * 255


# Any value pamqp can decode a header into, and the shim's marker, nested.
_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(1 << 200), max_value=1 << 200)
    | st.floats()  # NaN and ±Infinity included: AMQP doubles carry them
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.binary(max_size=20).map(bytearray)
    | st.datetimes(timezones=st.just(datetime.UTC))
    | st.builds(Undecodable.of, st.binary(max_size=10), st.text(max_size=20))
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_names = st.sampled_from(
    [
        "x-death",
        "x-burrow-dead-reason",
        "x-burrow-dead-error",
        "x-burrow-original-exchange",
        "x-burrow-original-routing-key",
        "x-burrow-original-queue",
        "x-last-death-queue",
        "x-burrow-dead-at",
        "x-burrow-undecodable",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-delivery-count",
    ]
) | st.text(max_size=12)
_deaths = st.lists(
    st.dictionaries(
        st.sampled_from(["count", "reason", "queue", "exchange", "routing-keys", "time"]),
        _values,
    )
    | _values,
    max_size=4,
)
_ids = (
    st.none() | st.text(max_size=300) | st.builds(Undecodable.of, st.binary(max_size=10), st.text())
)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(_names, _values, max_size=8),
    deaths=st.none() | _deaths,
    message_id=_ids,
    routing_key=st.text(max_size=300),
    body=st.binary(max_size=64),
)
def test_any_letter_reads_and_prints_without_raising(
    headers: dict[str, Any],
    deaths: list[Any] | None,
    message_id: str | None,
    routing_key: str,
    body: bytes,
) -> None:
    """Whatever a letter holds, reading it (summary or full) gives a DeadLetter that prints."""
    if deaths is not None:
        headers["x-death"] = deaths
    delivery = letter(headers, message_id=message_id, routing_key=routing_key, body=body)
    for full in (False, True):
        found = DeadLetter.from_delivery(delivery, full=full)
        assert found.size == len(body)
        assert found.message_id is None or type(found.message_id) is str
        if found.original_routing_key is not None:
            assert found.original_exchange is not None
            assert len(found.original_routing_key.encode()) <= 255
        _readable(found)


# -- aio-pika messages (delivery_from_message) -----------------------------------------------------


def _incoming(headers: dict[str, Any] | None, **props: Any) -> aio_pika.IncomingMessage:
    """A message as aio-pika hands it over after basic.get on the DLQ (no channel needed)."""
    properties = commands.Basic.Properties(headers=headers, **props)
    delivered = DeliveredMessage(
        delivery=commands.Basic.GetOk(
            delivery_tag=1, redelivered=True, exchange="rt.dlx", routing_key=DLQ, message_count=0
        ),
        header=ContentHeader(0, len(BODY), properties),
        body=BODY,
        channel=cast(Any, None),
    )
    return aio_pika.IncomingMessage(delivered, no_ack=True)


def test_an_aio_pika_message_reads_whole() -> None:
    """A letter received with aio-pika, as a `Delivery`, reads whole with full=True."""
    message = _incoming(
        parked(**{"x-burrow-dead-at": decimal.Decimal(3)}),
        message_id="m-9",
        content_type="application/json",
        app_id="shop",
    )
    found = DeadLetter.from_delivery(delivery_from_message(message), full=True)
    assert (found.message_id, found.reason) == ("m-9", "retries_exhausted")
    assert (found.original_exchange, found.original_routing_key) == ("rt.commands", "orders.place")
    assert found.body == BODY
    assert found.properties is not None
    assert (found.properties["app_id"], found.properties["redelivered"]) == ("shop", True)
    assert found.headers["x-burrow-kind"] == "cast"
    assert found.dead_at is None  # a decimal is not an integer
    assert DeadLetter.from_delivery(delivery_from_message(message)).body is None


def test_an_aio_pika_message_without_headers_or_id_never_raises() -> None:
    """An aio-pika message with no headers and no id still reads."""
    found = DeadLetter.from_delivery(delivery_from_message(_incoming(None)), full=True)
    assert (found.message_id, found.reason, found.size) == (None, "unknown", len(BODY))
    assert (found.headers, found.body) == ({}, BODY)
    _readable(found)
