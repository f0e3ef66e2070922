"""Dead-letter queues: parking what cannot be processed, with the reason; inspecting,
replaying and purging them (`burrow dlq`).

Each service has `<ns>.<service>.dlq`. A parked message keeps its body and properties and gains
headers saying why, when, the error, where it was originally routed and the queue it was taken
from: a replay puts it back on that queue, so an event reaches only the subscription it failed
in (docs/protocol.md §8).
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import math
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from service._amqp.link import Link
from service._amqp.tools import BrokerLost, ToolLink, open_tool
from service._protocol import codec
from service._protocol.config import Settings
from service._protocol.envelope import text, undecodable_fields
from service._protocol.errors import (
    ConnectionLost,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    QueueFull,
    ServiceError,
    Unroutable,
)
from service._protocol.messages import dead_letter, forward
from service._protocol.types import Delivery, Undecodable
from service._protocol.vocabulary import (
    BROKER_HEADERS,
    DEAD_LETTER_HEADERS,
    H_ATTEMPT,
    H_DEAD_AT,
    H_DEAD_ERROR,
    H_DEAD_REASON,
    H_DEADLINE,
    H_DEATH,
    H_DELIVERY_COUNT,
    H_FIRST_DEATH_EXCHANGE,
    H_FIRST_DEATH_QUEUE,
    H_FIRST_DEATH_REASON,
    H_LAST_DEATH_QUEUE,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_QUEUE,
    H_ORIGINAL_ROUTING_KEY,
    H_UNDECODABLE,
    Names,
    PublishKind,
)


class DeadLetterQueue:
    """One service's dead-letter queue, written through a publishing link."""

    def __init__(self, names: Names, service: str, publisher: Link) -> None:
        self.names = names
        self.service = service
        self.name = names.dead_letter_queue(service)
        self.publisher = publisher

    async def park(self, delivery: Delivery, reason: str, error: ServiceError | None) -> None:
        """Publish `delivery` into the DLQ with a confirm (the caller acks it afterwards)."""
        message = dead_letter(delivery, self.names, self.service, reason, error)
        await self.publisher.publish(
            message, kind=PublishKind.DEAD_LETTER, mandatory=True, check_size=False
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One parked message as ops see it.

    `list` keeps only this summary (no body, no headers: its size is bounded whatever the
    letter holds); `show` also keeps the headers, properties and body of the letters asked for.
    A letter that cannot be fully read still gets one, with what can be said of it and
    `problem`; `original_exchange`/`original_routing_key` are None when its route is unreadable,
    `original_queue` (where a replay puts it back) when the letter does not say.
    """

    message_id: str | None
    reason: str
    error: Any
    original_exchange: str | None
    original_routing_key: str | None
    dead_at: int | None
    size: int
    # The broker's x-delivery-count (looks and redeliveries); 0 for a first delivery, which
    # RabbitMQ 4.x sends without it; None when the queue does not count (classic queues).
    delivery_count: int | None = None
    problem: str | None = None
    # The queue it was taken from: x-burrow-original-queue, or for a letter the broker
    # dead-lettered, the queue of its latest death; `queue_problem` when the letter names one
    # that cannot be used (it is then not replayed).
    original_queue: str | None = None
    queue_problem: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)  # `show` only (else empty)
    properties: dict[str, Any] | None = None  # `show` only
    body: bytes | None = None  # `show` only

    def summary(self) -> dict[str, Any]:
        """The one-line view for `burrow dlq list`."""
        return {
            "message_id": self.message_id,
            "reason": self.reason,
            "route": self.original_routing_key,
            "dead_at": self.dead_at,
            "error": printable(
                self.error.get("message") if isinstance(self.error, dict) else self.error
            ),
            "size": self.size,
            "delivery_count": self.delivery_count,
            "problem": self.problem,
        }

    def detail(self) -> dict[str, Any]:
        """Everything, for `burrow dlq show`: properties, headers, error and the body."""
        return {
            **self.summary(),
            "original_exchange": self.original_exchange,
            "original_queue": self.original_queue,
            "error": printable(self.error),
            "properties": printable(self.properties),
            "headers": printable(self.headers),
            "body": None if self.body is None else readable_body(self.body),
        }

    @classmethod
    def from_delivery(cls, delivery: Delivery, *, full: bool = False) -> DeadLetter:
        """Read a parked message; never raises (a poisoned letter becomes one with `problem`).

        Args:
            full: keep headers, properties and body too (for `show`).
        """
        try:
            return cls._read(delivery, full)
        except Exception as exc:  # one poisoned letter must never stop the others
            return cls(
                message_id=_short(delivery.message_id),
                reason="unknown",
                error=None,
                original_exchange=None,
                original_routing_key=None,
                dead_at=None,
                size=len(delivery.body),
                problem=f"the letter cannot be read ({type(exc).__name__})",
                body=delivery.body if full else None,
            )

    @classmethod
    def _read(cls, delivery: Delivery, full: bool) -> DeadLetter:
        headers = delivery.headers if isinstance(delivery.headers, dict) else {}
        problems: list[str] = []
        marker = headers.get(H_UNDECODABLE)
        if isinstance(marker, Undecodable):
            problems.append(marker.problem)
        else:
            names = undecodable_fields(delivery)
            if names:
                problems.append("undecodable: " + ", ".join(names[:8]))
        exchange, routing_key, route_problem = _route(delivery, headers)
        if route_problem is not None:
            problems.append(route_problem)
        queue, queue_problem = _queue(delivery, headers)
        if queue_problem is not None:
            problems.append(queue_problem)
        error, error_problem = _error(headers.get(H_DEAD_ERROR), full)
        if error_problem is not None:
            problems.append(error_problem)
        dead_at = headers.get(H_DEAD_AT)
        count = headers.get(H_DELIVERY_COUNT)
        return cls(
            message_id=_short(delivery.message_id),
            reason=_short(text(headers.get(H_DEAD_REASON))) or _broker_reason(headers),
            error=error,
            original_exchange=exchange,
            original_routing_key=routing_key,
            original_queue=queue,
            queue_problem=queue_problem,
            dead_at=dead_at if _is_int(dead_at) else None,
            size=len(delivery.body),
            delivery_count=count if _is_int(count) else _first_look(count, delivery),
            problem="; ".join(problems) or None,
            headers=dict(headers) if full else {},
            properties=_properties(delivery) if full else None,
            body=delivery.body if full else None,
        )


def _first_look(count: object, delivery: Delivery) -> int | None:
    """0 for a letter delivered for the first time without x-delivery-count (RabbitMQ 4.x
    sends none then); None when the count is of another type or the queue does not count."""
    return 0 if count is None and not delivery.redelivered else None


# What a replay leaves out: why it died, the broker's history and Burrow's retry count (so
# delivery attempts and retries count afresh) and its deadline (a replay means "now": the copy
# must run, not expire).
_REPLAY_DROP = frozenset(
    {*DEAD_LETTER_HEADERS, *BROKER_HEADERS, H_ATTEMPT, H_DEADLINE, H_UNDECODABLE}
)

MAX_ERROR_CHARS = 16_384  # of a letter's error header kept by `list` (longer: clipped text)


class DeadLetterTool:
    """Inspect, replay and purge a dead-letter queue: what `burrow dlq` runs.

    It connects exactly as the service does (a `Link`: URL failover, password file, TLS,
    heartbeat). Looking at letters (`list`, `show`) takes them with basic.get and hands them
    back with one explicit basic.nack(requeue) — see docs/operations.md "Dead letters" for what
    that costs on each RabbitMQ version. At most one body is held at a time, except the bodies
    `show` was asked for.
    """

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.service = service
        self.queue_name = self.names.dead_letter_queue(service)

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[tuple[ToolLink, int]]:
        async with open_tool(self.settings, "dlq") as tool:
            try:
                pending = await self._pending(tool)
                yield tool, pending
            except BrokerLost as exc:
                raise ConnectionLost(
                    f"lost the broker while working on {self.queue_name}: {exc.message}; "
                    "letters not yet settled stay in the dead-letter queue"
                ) from None

    async def _pending(self, tool: ToolLink) -> int:
        try:
            return await tool.count(self.queue_name)
        except NotFound:
            raise NotFound(f"no dead-letter queue {self.queue_name}") from None
        except PermissionDenied:
            raise PermissionDenied(f"not allowed to read {self.queue_name}") from None

    async def _give_back(self, tool: ToolLink, last_tag: int | None, expect: int) -> None:
        """Hand the letters still unacked back to the queue, in order, with one explicit nack
        (RabbitMQ 4.3+ does not count it as a delivery attempt; closing the channel would),
        then wait until the queue holds `expect` ready letters again: a quorum queue applies
        the return a moment later, and the next command (`replay --all` right after `list`)
        must find them where they were."""
        if last_tag is None or not tool.is_open:
            return
        with contextlib.suppress(BrokerLost):
            await tool.requeue(last_tag, multiple=True)
            # At most about 2 s: someone else may be consuming the DLQ.
            await tool.wait_until_holds(self.queue_name, expect, tries=100, interval=0.02)

    async def show(self, message_ids: Collection[str], limit: int = 1000) -> list[DeadLetter]:
        """The letters among the first `limit` whose message id is one of `message_ids`, with
        headers, properties and body; they stay in the queue."""
        wanted = frozenset(message_ids)
        return [letter for letter in await self._scan(limit, wanted) if letter.message_id in wanted]

    async def _scan(self, limit: int, full: frozenset[str]) -> list[DeadLetter]:
        async with self._open() as (tool, pending):
            found: list[DeadLetter] = []
            last_tag: int | None = None
            try:
                while len(found) < limit:
                    delivery = await tool.get(self.queue_name)
                    if delivery is None:
                        break
                    last_tag = delivery.delivery_tag
                    letter = DeadLetter.from_delivery(delivery)
                    if letter.message_id in full:
                        letter = DeadLetter.from_delivery(delivery, full=True)
                    del delivery  # only one body at a time
                    found.append(letter)
            finally:
                await self._give_back(tool, last_tag, pending)
            return found

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` parked messages, oldest first, as summaries; they stay in the queue."""
        return await self._scan(limit, frozenset())

    async def replay(self, message_ids: Sequence[str] | None) -> ReplayReport:
        """Put parked messages back on the queue they were taken from (all when `message_ids`
        is None): an event reaches only the subscription it failed in, never every group.

        Each copy is made by `messages.forward` without the dead-letter headers, the broker's
        death history and `x-deadline` (a replay means now), published where `replay_target`
        says, with a confirm, and only then acked out of the DLQ. A letter whose target cannot
        be read, whose queue or exchange is gone or that the broker returns or refuses is
        skipped (left in the DLQ) and reported.
        """
        wanted = None if message_ids is None else frozenset(message_ids)
        report = ReplayReport()
        seen: set[str] = set()
        async with self._open() as (tool, pending):
            checked: dict[tuple[str, str], str | None] = {}
            last_held: int | None = None
            try:
                for _ in range(pending):  # only what was there: re-failures are not re-read
                    delivery = await tool.get(self.queue_name)
                    if delivery is None:
                        break
                    tag = delivery.delivery_tag
                    letter = DeadLetter.from_delivery(delivery)
                    if wanted is not None and letter.message_id not in wanted:
                        last_held = tag
                        continue
                    if letter.message_id is not None:
                        seen.add(letter.message_id)
                    problem = await self._replay_one(tool, delivery, letter, checked)
                    del delivery
                    if problem is not None:
                        report.skipped.append({"message_id": letter.message_id, "problem": problem})
                        last_held = tag
                        continue
                    await tool.ack(tag)
                    report.replayed += 1
            finally:
                await self._give_back(tool, last_held, pending - report.replayed)
        if wanted is not None:
            report.missing = sorted(wanted - seen)
        return report

    async def _replay_one(
        self,
        tool: ToolLink,
        delivery: Delivery,
        letter: DeadLetter,
        checked: dict[tuple[str, str], str | None],
    ) -> str | None:
        """Publish one letter's copy; None when confirmed, else why it stays in the DLQ.

        `checked` remembers, per queue or exchange, why it cannot be used (None: it can)."""
        target = replay_target(letter, self.names, self.service)
        if isinstance(target, str):
            return target
        exchange, routing_key = target
        what = ("exchange", exchange) if exchange else ("queue", routing_key)
        if what not in checked:
            checked[what] = await (
                _exchange_problem(tool, exchange) if exchange else _queue_problem(tool, routing_key)
            )
        problem = checked[what]
        if problem is not None:
            return problem
        copy = forward(delivery, exchange=exchange, routing_key=routing_key, drop=_REPLAY_DROP)
        try:
            await tool.publish(copy, kind=PublishKind.DEAD_LETTER, mandatory=True, check_size=False)
        except Unroutable:
            if not exchange:
                return f"no queue {routing_key[:128]!r}"
            return f"no queue is bound for {routing_key[:128]!r} on {exchange[:128]!r}"
        except QueueFull:
            return "the broker refused the copy (queue full or a resource limit)"
        return None

    async def purge(self) -> int:
        """Delete every parked message; return how many there were."""
        async with self._open() as (tool, _pending):
            return await tool.purge(self.queue_name)


def replay_target(letter: DeadLetter, names: Names, service: str) -> tuple[str, str] | str:
    """Where a replay publishes `letter` from `service`'s DLQ, as (exchange, routing key), or
    why it cannot: always to the queue it was taken from (docs/protocol.md §8).

    An event (or whatever came from a queue other than the service's own request and commands
    queues) goes to the default exchange keyed by that queue: its subscription queue only,
    never the other groups bound to the same event. A call, cast or submit goes to its original
    exchange and routing key, which reach the same queue, the service's own, and keep the
    routing key that names the operation when a sender left out `type`. A letter that does not
    name its queue (parked by an earlier Burrow, or published into the DLQ by hand) goes to its
    original route too, except an event: republished to the events exchange it would reach
    every subscription, so it is skipped.
    """
    if letter.queue_problem is not None:
        return letter.queue_problem
    queue = letter.original_queue
    if queue == names.dead_letter_queue(service):
        return "no original route (it would go straight back into the DLQ)"
    if queue is not None and queue not in (
        names.request_queue(service),
        names.commands_queue(service),
    ):
        return "", queue
    exchange, routing_key = letter.original_exchange, letter.original_routing_key
    if exchange is None or routing_key is None:
        return letter.problem or "the original route cannot be read"
    if exchange == names.events_exchange:
        return (
            "the subscription queue it failed in is unknown (no x-burrow-original-queue): "
            f"republishing to {exchange[:128]!r} would reach every subscription"
        )
    return exchange, routing_key


async def _queue_problem(tool: ToolLink, name: str) -> str | None:
    """Why a copy cannot be put on queue `name`, or None (asked on a throwaway channel)."""
    try:
        await tool.count(name)
    except NotFound:
        return f"no queue {name[:128]!r}"
    except PermissionDenied as exc:
        return f"the queue {name[:128]!r} cannot be used ({exc.message})"
    return None


async def _exchange_problem(tool: ToolLink, name: str) -> str | None:
    """Why a copy cannot be published to exchange `name`, or None (checked first: publishing
    to a missing exchange would close the channel holding the letters)."""
    try:
        await tool.check_exchange(name)
    except NotFound:
        return f"no exchange {name[:128]!r}"
    except (PermissionDenied, FailedPrecondition) as exc:  # e.g. ACCESS_REFUSED
        return f"the exchange {name[:128]!r} cannot be used ({exc.message})"
    return None


@dataclass(slots=True)
class ReplayReport:
    """What `replay` did: how many went back, which stayed in the DLQ and why, which ids asked
    for were not found."""

    replayed: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON line `burrow dlq replay` prints."""
        return {"replayed": self.replayed, "skipped": self.skipped, "missing": self.missing}


def _route(
    delivery: Delivery, headers: dict[str, Any]
) -> tuple[str | None, str | None, str | None]:
    """Where a replay sends the letter: (exchange, routing key, None), or (None, None, why)."""
    if H_ORIGINAL_EXCHANGE in headers or H_ORIGINAL_ROUTING_KEY in headers:
        # Parked by Burrow: its own record of the route.
        exchange = text(headers.get(H_ORIGINAL_EXCHANGE, ""))
        routing_key = text(headers.get(H_ORIGINAL_ROUTING_KEY))
        if exchange is None or routing_key is None:
            return None, None, "the original route cannot be read (x-burrow-original-* not text)"
        return _checked(exchange, routing_key, delivery)
    if isinstance(headers.get(H_UNDECODABLE), Undecodable):
        return None, None, "the original route cannot be read (headers undecodable)"
    deaths = headers.get(H_DEATH)
    if isinstance(deaths, list) and deaths:
        # Dead-lettered by the broker: the oldest x-death entry holds where it was first sent.
        first = deaths[-1]
        keys = first.get("routing-keys") if isinstance(first, dict) else None
        exchange = text(first.get("exchange")) if isinstance(first, dict) else None
        if exchange is None:
            exchange = text(headers.get(H_FIRST_DEATH_EXCHANGE))
        routing_key = text(keys[0]) if isinstance(keys, list) and keys else None
        if exchange is None or routing_key is None:
            return None, None, "the original route cannot be read (x-death has no route)"
        return _checked(exchange, routing_key, delivery)
    exchange, routing_key = text(delivery.exchange), text(delivery.routing_key)
    if exchange is None or routing_key is None:
        return None, None, "the original route cannot be read"
    return _checked(exchange, routing_key, delivery)


def _queue(delivery: Delivery, headers: dict[str, Any]) -> tuple[str | None, str | None]:
    """The queue the letter was taken from, or None; with why it cannot be read, if so.

    Parked by Burrow: x-burrow-original-queue (absent from letters an earlier Burrow parked;
    their x-death, if any, is of the retry holding queues, not where they failed).
    Dead-lettered by the broker: the queue of its latest death (x-last-death-queue, RabbitMQ
    3.13+; else the first x-death entry, the newest; else x-first-death-queue)."""
    if H_ORIGINAL_QUEUE in headers:
        queue = text(headers[H_ORIGINAL_QUEUE])
        if queue is None:
            return None, f"the original queue cannot be read ({H_ORIGINAL_QUEUE} not text)"
        return _checked_queue(queue)
    if H_ORIGINAL_EXCHANGE in headers or H_ORIGINAL_ROUTING_KEY in headers:
        return None, None
    deaths = headers.get(H_DEATH)
    newest = deaths[0] if isinstance(deaths, list) and deaths else None
    candidates = (
        headers.get(H_LAST_DEATH_QUEUE),
        newest.get("queue") if isinstance(newest, dict) else None,
        headers.get(H_FIRST_DEATH_QUEUE),
    )
    for candidate in candidates:
        queue = text(candidate) if candidate is not None else None
        if queue:
            return _checked_queue(queue)
    return None, None


def _checked_queue(queue: str) -> tuple[str | None, str | None]:
    if not queue or len(queue.encode()) > 255:
        return None, "the original queue cannot be read (empty or longer than 255 bytes)"
    return queue, None


def _checked(
    exchange: str, routing_key: str, delivery: Delivery
) -> tuple[str | None, str | None, str | None]:
    if len(exchange.encode()) > 255 or len(routing_key.encode()) > 255:
        return None, None, "the original route cannot be read (longer than 255 bytes)"
    if routing_key == delivery.queue:
        return None, None, "no original route (it would go straight back into the DLQ)"
    return exchange, routing_key, None


def _error(value: object, full: bool) -> tuple[Any, str | None]:
    """The parked error: the decoded JSON of x-burrow-dead-error, or its text."""
    if value is None or value == "":
        return None, None
    found = text(value)
    if found is None:
        return None, f"{H_DEAD_ERROR} is not text"
    if not full and len(found) > MAX_ERROR_CHARS:
        return found[:MAX_ERROR_CHARS] + "…", None
    try:
        return codec.decode_json(found.encode()), None
    except Exception:  # not JSON (or numbers beyond what the decoder keeps): show the text
        return found, None


def _broker_reason(headers: dict[str, Any]) -> str:
    # Parked by the broker itself (delivery limit, expiry), not by Burrow.
    reason = text(headers.get(H_FIRST_DEATH_REASON))
    return f"broker:{_short(reason)}" if reason is not None else "unknown"


def _properties(delivery: Delivery) -> dict[str, Any]:
    return {
        "message_id": delivery.message_id,
        "correlation_id": delivery.correlation_id,
        "reply_to": delivery.reply_to,
        "type": delivery.type,
        "content_type": delivery.content_type,
        "content_encoding": delivery.content_encoding,
        "app_id": delivery.app_id,
        "priority": delivery.priority,
        "timestamp": delivery.timestamp,
        "expiration": delivery.expiration,
        "exchange": delivery.exchange,
        "routing_key": delivery.routing_key,
        "redelivered": delivery.redelivered,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, limit: int = 255) -> str | None:
    """A short text for ids and names: undecodable bytes as their escape, clipped."""
    if value is None:
        return None
    found = value if isinstance(value, str) else text(value)
    return None if found is None else str.__str__(found)[:limit]


def printable(value: Any) -> Any:
    """`value` made of JSON types only: bytes as escaped text, undecodable markers as their
    escape, timestamps in ISO 8601, decimals as text; integers keep their exact value."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, list | tuple):
        return [printable(item) for item in value]
    if isinstance(value, dict):
        return {printable(str(k)): printable(v) for k, v in value.items()}
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity: shown as text ("nan", "inf")
    if isinstance(value, int | float | bool) or value is None:
        return value
    return str(value)


def readable_body(body: bytes) -> Any:
    """A body as JSON when it is JSON, else as escaped text."""
    try:
        return printable(codec.decode_json(body))
    except Exception:  # any foreign body: shown as text, never an error
        return body.decode("utf-8", "backslashreplace")


def json_line(value: Any) -> str:
    """One JSON line for the CLI (integers beyond 64 bits kept exactly)."""
    return codec.encode(printable(value)).decode()
