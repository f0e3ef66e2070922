"""The delay ladder's arithmetic (docs/protocol.md §9), without a broker: routing keys, binding
patterns, the walk down the declared ladder, and `schedule`'s rounding and headers."""

from __future__ import annotations

import datetime
import math
import time
from functools import cache
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from service import load_settings
from service._protocol.config import Settings
from service._protocol.messages import schedule
from service._protocol.topology import Topology, delay_topology
from service._protocol.types import Delivery, Outgoing, Settle
from service._protocol.vocabulary import Names, delay_route, level_pattern
from service._serving.scheduler import Forwarder, _early_by
from service.testing import InMemoryBroker, topic_matches

__all__: list[str] = []

# The wire contract other clients compute against: 25 binary digits of 100 ms units.
LEVELS = 25
UNIT_MS = 100
LARGEST = (1 << LEVELS) - 1
NAMES = Names("sched")
NOW = 1_700_000_000.0  # seconds since the epoch; a whole number of ms as a float

units_st = st.integers(min_value=0, max_value=LARGEST)


def _units(routing_key: str) -> int:
    """The number a ladder routing key spells (most significant digit first)."""
    words = routing_key.split(".")
    assert len(words) == LEVELS
    assert set(words) <= {"0", "1"}
    return int("".join(words), 2)


@cache
def _ladder() -> Topology:
    return delay_topology(load_settings(namespace=NAMES.namespace))


def _route(topology: Topology, exchange: str, key: str) -> list[str]:
    """The queues a message reaches from `exchange` by the declared bindings (RabbitMQ rules)."""
    if exchange == "":
        return [key]
    found: list[str] = []
    for binding in topology.bindings:
        if binding.exchange != exchange or not topic_matches(binding.key, key):
            continue
        if binding.destination_type == "exchange":
            found += _route(topology, binding.destination, key)
        else:
            found.append(binding.destination)
    return found


def _wait_ms(routing_key: str) -> int:
    """How long a message keyed `routing_key` spends in the declared ladder before it is ready:
    enter at the top exchange, wait each holding queue's TTL, follow its dead-letter route."""
    topology = _ladder()
    queues = {queue.name: queue.arguments for queue in topology.queues}
    exchange, key, waited = NAMES.delay_exchange(LEVELS - 1), routing_key, 0
    for _ in range(LEVELS + 1):
        [queue] = _route(topology, exchange, key)  # exactly one queue at every step
        if queue == NAMES.delay_ready_queue:
            return waited
        arguments = queues[queue]
        waited += arguments["x-message-ttl"]
        exchange = arguments["x-dead-letter-exchange"]
        key = arguments.get("x-dead-letter-routing-key", key)
    raise AssertionError(f"{routing_key} never reached the ready queue")


def _message(**overrides: object) -> Outgoing:
    fields: dict[str, object] = {
        "exchange": "sched.commands",
        "routing_key": "calc.add",
        "body": b'{"a":1}',
        "message_id": "m-1",
        "type": "calc.add",
        "correlation_id": "c-1",
        "reply_to": "somewhere",
        "headers": {"x-burrow-kind": "cast", "traceparent": "00-t-s-01", "custom": [1, "x"]},
        "persistent": False,
        "content_type": "application/json",
        "content_encoding": "identity",
        "app_id": "tests",
        "priority": 3,
        "timestamp": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    }
    fields.update(overrides)
    return Outgoing(**fields)  # type: ignore[arg-type]


def _scheduled(due_at: float, now: float = NOW, message: Outgoing | None = None) -> Outgoing:
    with mock.patch.object(time, "time", return_value=now):
        return schedule(NAMES, message or _message(), due_at)


# -- delay_route and level_pattern -----------------------------------------------------------


def test_delay_route_spells_the_protocol_example() -> None:
    """350 ms is 4 units: 25 words, bit 24 first, only bit 2 set (docs/protocol.md §9)."""
    assert delay_route(4) == ".".join(["0"] * 22 + ["1", "0", "0"])
    assert delay_route(0) == ".".join(["0"] * LEVELS)


@pytest.mark.parametrize("bit", range(LEVELS))
def test_delay_route_sets_exactly_the_digit_of_each_bit(bit: int) -> None:
    """2**bit sets word 24 - bit and no other."""
    words = delay_route(1 << bit).split(".")
    assert [i for i, word in enumerate(words) if word == "1"] == [LEVELS - 1 - bit]


def test_largest_delay_is_all_ones_and_one_more_is_refused() -> None:
    """2**25 - 1 units (about 38.8 days) is every digit set; 2**25 is outside the ladder."""
    assert delay_route(LARGEST) == ".".join(["1"] * LEVELS)
    with pytest.raises(ValueError, match="outside the ladder"):
        delay_route(LARGEST + 1)


@pytest.mark.parametrize("units", [-1, -(1 << 40), 1 << LEVELS, 1 << 64])
def test_delay_route_refuses_negative_and_too_large(units: int) -> None:
    """A negative delay or one beyond the top level is a ValueError, not a wrong key."""
    with pytest.raises(ValueError, match="outside the ladder"):
        delay_route(units)


@given(units_st)
@example(0)
@example(LARGEST)
def test_delay_route_round_trips(units: int) -> None:
    """Reading the digits back gives the number of units."""
    assert _units(delay_route(units)) == units


def test_level_patterns_are_the_documented_binding_keys() -> None:
    """Level L binds `*.` repeated 24 - L times, then its digit and `#`."""
    assert level_pattern(LEVELS - 1, 1) == "1.#"
    assert level_pattern(LEVELS - 1, 0) == "0.#"
    assert level_pattern(0, 1) == "*." * (LEVELS - 1) + "1.#"
    for level in range(LEVELS):
        for bit in (0, 1):
            assert level_pattern(level, bit) == "*." * (LEVELS - 1 - level) + f"{bit}.#"


@given(units_st, st.integers(min_value=0, max_value=LEVELS - 1))
@example(0, 0)
@example(LARGEST, LEVELS - 1)
def test_level_pattern_matches_exactly_its_digit(units: int, level: int) -> None:
    """A level's `1` pattern matches a key iff that bit is set, its `0` pattern iff it is not."""
    key, bit = delay_route(units), (units >> level) & 1
    assert topic_matches(level_pattern(level, bit), key)
    assert not topic_matches(level_pattern(level, 1 - bit), key)


@given(units_st)
@example(0)
@example(1)
@example(LARGEST)
@example(1 << (LEVELS - 1))
def test_the_declared_ladder_waits_exactly_the_units(units: int) -> None:
    """Down the declared exchanges and holding queues, a key waits `units` * 100 ms in all."""
    assert _wait_ms(delay_route(units)) == units * UNIT_MS


# -- schedule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay_ms", "units"),
    [(0, 0), (1, 1), (99, 1), (100, 1), (101, 2), (300, 3), (301, 4), (350, 4), (-5000, 0)],
)
def test_schedule_rounds_up_to_whole_units(delay_ms: int, units: int) -> None:
    """A delay is rounded up to the next 100 ms; one already due (or past) waits 0 units."""
    scheduled = _scheduled((NOW * 1000 + delay_ms) / 1000)
    assert scheduled.routing_key == delay_route(units)


@given(
    now_ms=st.floats(min_value=1e12, max_value=4e12, allow_nan=False),
    delay_ms=st.floats(min_value=-1e6, max_value=LARGEST * UNIT_MS - 1, allow_nan=False),
)
def test_schedule_is_never_early_and_at_most_one_unit_late(now_ms: float, delay_ms: float) -> None:
    """The ladder's wait reaches the due time (ms, rounded up) and overshoots it by < 100 ms."""
    now, due_at = now_ms / 1000, (now_ms + delay_ms) / 1000
    scheduled = _scheduled(due_at, now=now)
    due_ms = scheduled.headers["x-burrow-due"]
    assert isinstance(due_ms, int)
    assert due_at * 1000 <= due_ms < due_at * 1000 + 1
    arrives_ms = now * 1000 + _units(scheduled.routing_key) * UNIT_MS
    assert arrives_ms >= due_ms
    if due_ms > now * 1000:
        assert arrives_ms < due_ms + UNIT_MS


def test_schedule_reaches_the_largest_delay_and_refuses_beyond() -> None:
    """Exactly (2**25 - 1) * 100 ms ahead is the all-ones key; 1 ms more is a ValueError."""
    largest = (NOW * 1000 + LARGEST * UNIT_MS) / 1000
    assert _scheduled(largest).routing_key == delay_route(LARGEST)
    with pytest.raises(ValueError, match="cannot schedule more than"):
        _scheduled(largest + 0.001)


def test_schedule_keeps_the_message_and_adds_the_target() -> None:
    """Every property and header is kept; the target headers name the original route; the copy
    enters the ladder at its top exchange, persistent; the original is not changed."""
    original = _message()
    before = dict(original.headers)
    scheduled = _scheduled(NOW + 1.25, message=original)
    assert original.headers == before
    assert (original.exchange, original.routing_key, original.persistent) == (
        "sched.commands",
        "calc.add",
        False,
    )
    assert scheduled.exchange == NAMES.delay_exchange(LEVELS - 1) == "sched.delay.24"
    assert scheduled.routing_key == delay_route(13)
    assert scheduled.persistent is True
    assert scheduled.headers == {
        **before,
        "x-burrow-target-exchange": "sched.commands",
        "x-burrow-target-key": "calc.add",
        "x-burrow-due": math.ceil(NOW * 1000) + 1250,
    }
    for name in (
        "body",
        "message_id",
        "type",
        "correlation_id",
        "reply_to",
        "content_type",
        "content_encoding",
        "app_id",
        "priority",
        "timestamp",
    ):
        assert getattr(scheduled, name) == getattr(original, name), name


def test_schedule_overwrites_forged_target_headers() -> None:
    """Target headers already on the message are replaced by its real route."""
    forged = _message(
        headers={"x-burrow-target-exchange": "elsewhere", "x-burrow-target-key": "evil.op"}
    )
    scheduled = _scheduled(NOW + 1, message=forged)
    assert scheduled.headers["x-burrow-target-exchange"] == "sched.commands"
    assert scheduled.headers["x-burrow-target-key"] == "calc.add"


# -- the forwarder's last millisecond ---------------------------------------------------------


@pytest.mark.parametrize(
    ("due_ms", "held"),
    [
        (NOW * 1000 + 3, 0.004),  # 3 ms early: held those 3 ms and the 1 ms margin
        (NOW * 1000 + UNIT_MS, 0.101),  # a whole unit early is still made up
        (NOW * 1000, 0.0),  # on time
        (NOW * 1000 - 5000, 0.0),  # late
        (NOW * 1000 + UNIT_MS + 1, 0.0),  # further ahead: another clock; not waited for
        (math.inf, 0.0),
        (math.nan, 0.0),
        ("1700000000003", 0.0),
        (True, 0.0),
        (None, 0.0),
    ],
    ids=repr,
)
def test_forwarder_makes_up_only_a_brokers_millisecond(due_ms: object, held: float) -> None:
    """A message out of the ladder up to one unit before `x-burrow-due` is held to it; any
    other value of the header holds nothing."""
    assert _early_by(due_ms, NOW) == pytest.approx(held, abs=1e-6)


async def test_forwarder_never_sends_a_message_before_it_is_due(settings: Settings) -> None:
    """A due message the ladder let out 30 ms early reaches its target no earlier than due."""
    names = Names(settings.namespace)
    broker = InMemoryBroker()
    broker.declare_exchange(names.events_exchange, "topic")
    broker.declare_queue("seen")
    broker.bind(names.events_exchange, "seen", "#")
    link = broker.link_factory("forwarder", settings)
    link.start()
    await link.wait_ready(1)
    settled: list[tuple[Settle, float]] = []

    async def settle(_: Delivery, how: Settle) -> None:
        settled.append((how, time.time()))

    due_ms = math.ceil(time.time() * 1000) + 30
    try:
        await Forwarder(settings, link).on_delivery(
            Delivery(
                body=b"{}",
                routing_key=delay_route(0),
                headers={
                    "x-burrow-target-exchange": names.events_exchange,
                    "x-burrow-target-key": "clock.rang",
                    "x-burrow-due": due_ms,
                },
                settle_fn=settle,
            )
        )
    finally:
        await link.close()
    [sent] = broker.queue("seen").messages
    assert "x-burrow-due" not in sent.headers
    [(how, at)] = settled
    assert how is Settle.ACK
    assert at * 1000 >= due_ms
