"""Fixtures for the H tests: a probe service on the shared broker, watched from every side.

`hostile` starts an App serving `calc` (the `add` every oracle ends with, a `probe` operation
that records what its handler saw, a retryable `flaky` one, a failing `refuse` one, and an
`on_probe` subscription to `hprobe.#`) with each consumer callback wrapped by a `Tracker`, and
returns a `Hostile` that publishes byte-exact messages through `rawamqp` and observes every
possible ending of each: the reply (direct reply-to on the raw connection), the completion
(a collector queue bound to the completion and callback routes), the dead letter (consumers on
the service's and the scheduler's DLQs), the handler run, and how each delivery was settled.
Messages are told apart by a token in their body (`probe_body`), past the 32-byte prefix that
logs may show, so "no body in any log line" can be checked by looking for the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from structlog.testing import capture_logs

from service import App, Context, InvalidArgument, Model, Service, Settings, Unavailable
from service._amqp.link import ConsumerSpec
from service._amqp.tools import delivery_from_message
from service._amqp.transport import AmqpLink
from service._protocol import tracing
from service._protocol.codec import decode_json
from service._protocol.topology import delay_ladder
from service._protocol.types import Delivery, Settle
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_CALLBACK,
    H_CALLBACK_DATA,
    H_JOB_ID,
    H_KIND,
    H_TARGET_EXCHANGE,
    H_TARGET_KEY,
    LEVELS,
    Names,
    delay_route,
)
from service._serving.dead_letters import DeadLetter
from service.testing import delete_entities
from tests.brokers import TEST_BROKER
from tests.conftest import AMQP_URL, delete_topology
from tests.faults.harness import sample, wait_until
from tests.hostile import rawamqp
from tests.hostile.rawamqp import (
    A,
    B,
    D,
    F,
    Field,
    I,
    Props,
    RawAmqp,
    RawMessage,
    S,
    T,
    b,
    d,
    f,
    i,
    l,
    s,
    t,
    u,
    x,
)

__all__ = [
    "TOKEN",
    "new_token",
    "probe_body",
    "token_of",
    "Probe",
    "Seen",
    "Tracker",
    "HandlerCall",
    "HandlerLog",
    "probe_service",
    "Hostile",
    "MakeHostile",
    "Sent",
    "PATHS",
    "rabbit_queue_counts",
    "start_hostile",
    "stop_hostile",
    "Outcome",
    "Check",
    "NORMAL",
    "NOT_UTF8",
    "refused",
    "Case",
    "non_text",
    "text_types",
    "run_cases",
    "assert_logs_clean",
]

TOKEN = re.compile(rb"tok-[0-9a-f]{16}")
SERVICE = "calc"
EVENT = "hprobe.fired"  # matched by the `on_probe` subscription (`hprobe.#`)
CALLBACK_PREFIX = "hcb"  # callback routes of submits, collected with the completions
CALLBACK_DATA = "hcb-data: https://example.test/hook?a=1"  # x-callback-data, when a case sends it
_PAD = "p" * 40  # what a log's 32-byte body prefix may show; the token comes after it
_QUEUE_SETTLE = 12.0  # seconds: more than RabbitMQ's 5 s statistics interval
_WAIT = 20.0  # upper bound on one wait; never reached when the service behaves
PASSWORD_MARKERS = (":guest@", "guest:guest")  # the broker password as a URL would carry it


def new_token() -> str:
    """A token no other message carries."""
    return f"tok-{secrets.token_hex(8)}"


def probe_body(token: str) -> bytes:
    """A valid `calc.probe` request (and `hprobe.*` event) carrying `token` past 32 bytes."""
    return f'{{"pad":"{_PAD}","token":"{token}"}}'.encode()


def token_of(body: bytes) -> str | None:
    """The token a body carries, if any."""
    match = TOKEN.search(body)
    return match.group().decode() if match else None


class Probe(Model):
    """A request or event that only carries its token."""

    pad: str = ""
    token: str


class ProbeReply(Model):
    """The token, echoed."""

    token: str


class AddRequest(Model):
    """Two integers."""

    a: int
    b: int


class AddReply(Model):
    """Their sum."""

    sum: int


@dataclass(frozen=True, slots=True)
class HandlerCall:
    """What one handler run saw."""

    route: str
    headers: dict[str, Any]
    trace_id: str | None
    message_id: str | None
    correlation_id: str | None


class HandlerLog:
    """Handler runs by token (thread-safe: the fuzzer reads it from another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, list[HandlerCall]] = defaultdict(list)

    def record(self, route: str, token: str, ctx: Context) -> None:
        """Remember one run."""
        call = HandlerCall(
            route=route,
            headers=dict(ctx.headers),
            trace_id=tracing.trace_id(tracing.current()),
            message_id=ctx.message_id,
            correlation_id=ctx.correlation_id,
        )
        with self._lock:
            self.calls[token].append(call)

    def runs(self, token: str) -> list[HandlerCall]:
        """The runs for `token` so far."""
        with self._lock:
            return list(self.calls.get(token, ()))


def probe_service(log: HandlerLog, *, flaky_retries: int = 2) -> Service:
    """`calc`: add, probe (records), flaky (records, then fails retryably), refuse (records,
    then fails for good) and the `on_probe` subscription (records)."""
    svc = Service(SERVICE)

    @svc.operation()
    async def add(req: AddRequest) -> AddReply:
        """Add two integers."""
        return AddReply(sum=req.a + req.b)

    @svc.operation()
    async def probe(req: Probe, ctx: Context) -> ProbeReply:
        """Record what arrived; echo the token."""
        log.record("calc.probe", req.token, ctx)
        return ProbeReply(token=req.token)

    @svc.operation(retries=flaky_retries)
    async def flaky(req: Probe, ctx: Context) -> ProbeReply:
        """Record what arrived; fail retryably, every time."""
        log.record("calc.flaky", req.token, ctx)
        raise Unavailable("the probe's dependency is away")

    @svc.operation()
    async def refuse(req: Probe, ctx: Context) -> ProbeReply:
        """Record what arrived; fail for good."""
        log.record("calc.refuse", req.token, ctx)
        raise InvalidArgument("refused by the probe")

    @svc.subscribe("hprobe.#", name="on_probe")
    async def on_probe(event: Probe, ctx: Context) -> None:
        """Record the event."""
        log.record("event", event.token, ctx)

    return svc


@dataclass(slots=True)
class Seen:
    """One delivery to one of the App's consumers, and how its callback ended."""

    queue: str
    token: str | None
    delivery: Delivery
    done: bool = False
    settled: Settle | None = None
    error: BaseException | None = None


class Tracker:
    """Wraps the App's consumer callbacks: every delivery, its token, whether the callback
    settled it before returning, and any exception it raised (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[Seen] = []
        self.by_token: dict[str, list[Seen]] = defaultdict(list)

    def wrap(self, spec: ConsumerSpec) -> ConsumerSpec:
        """The same consumer, watched."""
        inner, queue = spec.callback, spec.queue

        async def watched(delivery: Delivery) -> None:
            record = Seen(queue, token_of(delivery.body), delivery)
            with self._lock:
                self.seen.append(record)
                if record.token is not None:
                    self.by_token[record.token].append(record)
            try:
                await inner(delivery)
            except BaseException as exc:
                record.error = exc
                raise
            finally:
                record.settled = delivery.settled
                record.done = True

        return dataclasses.replace(spec, callback=watched)

    def of(self, token: str) -> list[Seen]:
        """The deliveries of `token` so far."""
        with self._lock:
            return list(self.by_token.get(token, ()))

    def problems(self) -> list[str]:
        """Deliveries whose callback raised, returned without settling, or requeued; and
        redeliveries (a requeue loop)."""
        with self._lock:
            seen = list(self.seen)
        found: list[str] = []
        for record in seen:
            what = f"{record.queue} {record.token or '(no token)'}"
            if record.error is not None:
                found.append(f"{what}: callback raised {record.error!r}")
            elif record.done and record.settled is None:
                found.append(f"{what}: callback returned without settling")
            elif record.settled is Settle.REQUEUE:
                found.append(f"{what}: requeued")
            if record.delivery.redelivered:
                found.append(f"{what}: redelivered")
        return found

    def busy(self) -> list[Seen]:
        """Deliveries whose callback has not returned yet."""
        with self._lock:
            return [record for record in self.seen if not record.done]


@dataclass(slots=True)
class Parked:
    """One message found in a dead-letter queue."""

    queue: str
    reason: str
    message: AbstractIncomingMessage


PATHS = ("call", "cast", "submit", "event", "forward")


@dataclass(slots=True)
class Sent:
    """One published message and what the broker said to it."""

    token: str
    path: str
    correlation_id: str | None
    job_id: str | None
    callback: str | None
    published: rawamqp.Published


class Hostile:
    """The App under test and everything that watches it (see the module docstring)."""

    def __init__(
        self,
        app: App,
        *,
        tracker: Tracker,
        log: HandlerLog,
        amqp: RawAmqp,
        logs: list[MutableMapping[str, Any]],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        self.app = app
        self.logs = logs
        self.caplog = caplog
        self.settings = app.settings
        self.names = Names(app.settings.namespace)
        self.tracker = tracker
        self.log = log
        self.amqp = amqp
        self.replies: dict[str, RawMessage] = {}
        self.stray_replies: list[RawMessage] = []
        self.parked: dict[str, list[Parked]] = defaultdict(list)
        self.completions: dict[str, list[AbstractIncomingMessage]] = defaultdict(list)
        self.markers: set[str] = set()
        self.observed: list[str] = []  # queues watched (markers go there)
        self.collector = f"{self.names.namespace}.hostile.collector"
        self.extra_queues: set[str] = {self.collector}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self.reconnects = self._reconnects()
        self._lock = threading.Lock()

    # -- setup -------------------------------------------------------------------------------

    async def watch(self, *, service_dlq: bool = True) -> None:
        """Consume replies, the DLQs (the service's unless told not to: a test that replays
        letters needs them left there) and the completion collector."""
        await self.amqp.consume(DIRECT_REPLY_TO, self._on_reply)
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        self._channel = channel = await self._connection.channel()
        collector = await channel.declare_queue(
            self.collector, durable=True, arguments={"x-queue-type": "classic"}
        )
        for key in (f"{SERVICE}.*.completed", f"{SERVICE}.*.failed", f"{CALLBACK_PREFIX}.#"):
            await collector.bind(self.names.events_exchange, key)
        await collector.consume(self._on_completion, no_ack=True)
        self.observed = [self.collector, self.names.scheduler_dead_letter_queue]
        if service_dlq:
            self.observed.append(self.names.dead_letter_queue(SERVICE))
        for name in self.observed[1:]:
            queue = await channel.declare_queue(name, passive=True)
            await queue.consume(self._dlq_consumer(name), no_ack=True)

    async def reopen_raw(self) -> None:
        """A new raw connection after the broker closed the old one (it does, with 541, for
        a NaN or infinite float in a header), consuming replies again."""
        await self.amqp.close()
        self.amqp = await RawAmqp.connect()
        await self.amqp.consume(DIRECT_REPLY_TO, self._on_reply)

    async def close(self) -> None:
        """Close the observers (the App is stopped by the fixture)."""
        await self.amqp.close()
        if self._connection is not None:
            await self._connection.close()

    def _reconnects(self) -> dict[str, float]:
        return {
            link: sample("burrow_amqp_reconnects_total", link=link)
            for link in ("consumer", "publisher")
        }

    # -- observers ---------------------------------------------------------------------------

    def _on_reply(self, message: RawMessage) -> None:
        correlation_id = str(message.properties.correlation_id or "")
        with self._lock:
            if correlation_id in self.replies:
                self.stray_replies.append(message)
            else:
                self.replies[correlation_id] = message

    async def _on_completion(self, message: AbstractIncomingMessage) -> None:
        if message.body.startswith(b"marker-"):
            with self._lock:
                self.markers.add(message.body.decode())
            return
        with self._lock:
            self.completions[str(message.correlation_id or "")].append(message)

    def _dlq_consumer(self, queue: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_dead(message: AbstractIncomingMessage) -> None:
            if message.body.startswith(b"marker-"):
                with self._lock:
                    self.markers.add(message.body.decode())
                return
            token = token_of(message.body) or "(no token)"
            reason = DeadLetter.from_delivery(delivery_from_message(message)).reason
            with self._lock:
                self.parked[token].append(Parked(queue, reason, message))

        return on_dead

    # -- publishing --------------------------------------------------------------------------

    def route(self, path: str) -> tuple[str, str]:
        """Exchange and routing key of a path (`forward`: the delay ladder's entry, due now)."""
        names = self.names
        return {
            "call": (names.rpc_exchange, "calc.probe"),
            "cast": (names.commands_exchange, "calc.probe"),
            "submit": (names.commands_exchange, "calc.probe"),
            "event": (names.events_exchange, EVENT),
            "forward": (names.delay_exchange(LEVELS - 1), delay_route(0)),
        }[path]

    def forget(self) -> None:
        """Drop the replies and completions seen so far (before reusing ids)."""
        with self._lock:
            self.replies.clear()
            self.stray_replies.clear()
            self.completions.clear()

    async def job_results(self, job_id: str) -> frozenset[str]:
        """Take what reached a job's queue, as `completed:<ok|CODE>` atoms."""
        assert self._channel is not None
        queue = await self._channel.declare_queue(self.names.job_queue(job_id), passive=True)
        atoms: set[str] = set()
        count = 0
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            atoms.add(f"completed:{_status(message.headers or {}, message.body)}")
            count += 1
        if count > 1:
            atoms.add(f"completedx{count}")
        return frozenset(atoms)

    async def declare_job(self, job_id: str) -> None:
        """Declare a job's result queue, as a pre-0.2 client did before it submitted (its
        probes carry no reply address, so the completion still goes there)."""
        assert self._channel is not None
        name = self.names.job_queue(job_id)
        arguments: dict[str, Any] = {"x-queue-type": "classic", "x-expires": 60_000}
        await self._channel.declare_queue(name, durable=True, arguments=arguments)
        self.extra_queues.add(name)

    async def send(
        self,
        path: str,
        headers: dict[rawamqp.ShortStr, Any] | None = None,
        *,
        token: str | None = None,
        body: bytes | None = None,
        job_id: str | None = None,
        callback: str | None = None,
        target: tuple[Any, Any] | None = None,
        route: tuple[str, str] | None = None,
        defaults: bool = True,
        **props: Any,
    ) -> Sent:
        """Publish one probe on `path` with `headers` (raw field values) and properties.

        Args:
            job_id: for submits: sent as `x-job-id` (a string) and its queue declared.
            target: for `forward`: the raw target exchange and key headers (default: the
                commands exchange and `calc.probe`, i.e. a delayed cast).
            defaults: add the usual kind header (and a submit's job id) unless given.
            props: `rawamqp.Props` fields, overriding the path's defaults.
        """
        token = token or new_token()
        ident = secrets.token_hex(8)  # ids unrelated to the token: ids may be logged, bodies not
        exchange, key = route or self.route(path)
        all_headers: dict[rawamqp.ShortStr, Any] = {}
        correlation_id: str | None = None
        base: dict[str, Any] = {
            "content_type": "application/json",
            "message_id": f"m-{ident}",
            "delivery_mode": 2,
        }
        if path == "call":
            correlation_id = f"c-{ident}"
            base.update(correlation_id=correlation_id, reply_to=DIRECT_REPLY_TO, delivery_mode=1)
            base["type"] = "calc.probe"
        if defaults and path in ("call", "cast", "submit", "forward"):
            kind = {"call": "call", "submit": "submit"}.get(path, "cast")
            all_headers[H_KIND] = rawamqp.S(kind)
        if path == "submit" and job_id is None and defaults:
            job_id = f"j{ident}"
        if job_id is not None:
            all_headers["x-job-id"] = rawamqp.S(job_id)
            await self.declare_job(job_id)
        if callback is not None:
            all_headers["x-callback-route"] = rawamqp.S(callback)
        if path == "forward":
            target_exchange, target_key = target or (
                rawamqp.S(self.names.commands_exchange),
                rawamqp.S("calc.probe"),
            )
            all_headers[H_TARGET_EXCHANGE] = target_exchange
            all_headers[H_TARGET_KEY] = target_key
        all_headers.update(headers or {})
        base.update(props)
        if "correlation_id" in props:
            correlation_id = (
                None if props["correlation_id"] is None else str(props["correlation_id"])
            )
        published = await self.amqp.publish(
            exchange,
            key,
            probe_body(token) if body is None else body,
            Props(headers=all_headers, **base),
            mandatory=True,
        )
        return Sent(token, path, correlation_id, job_id, callback, published)

    # -- waiting -----------------------------------------------------------------------------

    def accounted(self, sent: Sent) -> bool:
        """Whether every delivery of the message was settled and nothing more is on its way:
        refused by the broker, or settled everywhere and not only in the delay ladder."""
        if not sent.published.acked or sent.published.returned is not None:
            return True
        seen = self.tracker.of(sent.token)
        if not seen or not all(record.done for record in seen):
            return False
        if all(record.queue == self.names.delay_ready_queue for record in seen):
            return sent.token in self.parked  # forwarded copies land in a queue we consume
        return True

    async def settle(self, sent: Iterable[Sent], timeout: float = _WAIT) -> None:
        """Wait until every message is accounted for, then until everything the service
        published before that has reached the observers (marker messages behind it)."""
        pending = list(sent)
        with contextlib.suppress(AssertionError):  # the comparison names what is missing
            await wait_until(
                lambda: all(self.accounted(one) for one in pending), timeout, "accounted"
            )
        await self.barrier()

    async def barrier(self) -> None:
        """A call answered after everything published so far, and a marker behind every
        dead letter and completion: what is not observed after this was never published."""
        assert await self.call_add() == {"sum": 3}
        assert self._channel is not None
        wanted = set()
        for queue in self.observed:
            marker = f"marker-{secrets.token_hex(6)}"
            wanted.add(marker)
            await self._channel.default_exchange.publish(
                aio_pika.Message(marker.encode()), routing_key=queue
            )
        await wait_until(lambda: wanted <= self.markers, _WAIT, "markers behind the observers")

    async def call_add(self, timeout: float = _WAIT) -> Any:
        """calc.add over the raw connection: the normal call every oracle ends with."""
        correlation_id = f"add-{secrets.token_hex(6)}"
        sent = await self.amqp.publish(
            self.names.rpc_exchange,
            "calc.add",
            b'{"a": 1, "b": 2}',
            Props(
                content_type="application/json",
                correlation_id=correlation_id,
                message_id=correlation_id,
                reply_to=DIRECT_REPLY_TO,
                type="calc.add",
                delivery_mode=1,
                headers={H_KIND: "call", "x-deadline": int((time.time() + 30) * 1000)},
            ),
            mandatory=True,
        )
        assert sent.acked, sent
        assert sent.returned is None, sent
        await wait_until(lambda: correlation_id in self.replies, timeout, "the calc.add reply")
        return decode_json(self.replies[correlation_id].body)

    # -- reading outcomes --------------------------------------------------------------------

    def outcome(self, sent: Sent) -> frozenset[str]:
        """Every ending observed for one message, as atoms: `ran` (the handler ran),
        `reply:<ok|CODE>`, `completed:<ok|CODE>`, `callback`, `callback+data` (it carried
        `CALLBACK_DATA`), `parked:<reason>` (service DLQ),
        `sched:<reason>` (scheduler DLQ), `broker:<code>` (refused at publish), `returned`."""
        atoms: set[str] = set() if self.accounted(sent) else {"unsettled"}
        published = sent.published
        if published.closed is not None:
            return frozenset({f"broker:{published.closed.code}"})
        if published.returned is not None:
            return frozenset({"returned"})
        runs = self.log.runs(sent.token)
        if runs:
            atoms.add("ran" if len(runs) == 1 else f"ranx{len(runs)}")
        with self._lock:
            # A reply without a correlation id is filed under "" (`_on_reply`).
            reply = self.replies.get(sent.correlation_id or "")
            completions = list(self.completions.get(sent.job_id, ())) if sent.job_id else []
            parked = list(self.parked.get(sent.token, ()))
        if reply is not None:
            status = _status(reply.properties.headers or {}, reply.body)
            # Without a correlation id the caller cannot tell the reply is its own.
            atoms.add(f"reply:{status}" if sent.correlation_id else f"uncorrelated-reply:{status}")
        finished = [m for m in completions if m.routing_key != sent.callback]
        if len(finished) < len(completions):
            atoms.add("callback")
        if any(
            (m.headers or {}).get(H_CALLBACK_DATA) == CALLBACK_DATA
            for m in completions
            if m.routing_key == sent.callback
        ):
            atoms.add("callback+data")
        for message in finished:
            atoms.add(f"completed:{_status(message.headers or {}, message.body)}")
        if len(finished) > 1:
            atoms.add(f"completedx{len(finished)}")
        if sent.correlation_id is not None and any(
            str(m.properties.correlation_id) == sent.correlation_id for m in self.stray_replies
        ):
            atoms.add("replyx2")
        for letter in parked:
            where = "parked" if letter.queue == self.names.dead_letter_queue(SERVICE) else "sched"
            atoms.add(f"{where}:{letter.reason}")
        if len(parked) > 1:
            atoms.add(f"parkedx{len(parked)}")
        return frozenset(atoms)

    def reply_error(self, sent: Sent) -> dict[str, Any]:
        """The error body of a call's reply."""
        reply = self.replies[sent.correlation_id or ""]
        error = decode_json(reply.body)
        assert isinstance(error, dict), error
        return error

    # -- the oracle --------------------------------------------------------------------------

    async def assert_sound(self) -> None:
        """RELIABILITY.md H: every delivery settled by its callback, none requeued, no
        exception in a consumer callback, no reconnect, consumers attached, nothing in
        progress or unacked, the service ready and answering calc.add; logs clean."""
        problems = self.tracker.problems()
        assert not problems, "\n".join(problems[:20])
        await wait_until(
            lambda: not self.tracker.busy(), _WAIT, "every consumer callback to return"
        )
        assert self._reconnects() == self.reconnects, "the service reconnected"
        consumer = self.app.transport.consumer
        assert consumer.attached == len(consumer.consumers), "a consumer was lost"
        assert self.app.health.ready, self.app.health.problems()
        assert sample("burrow_handler_in_progress", service=SERVICE) == 0
        assert await self.call_add() == {"sum": 3}
        work = [self.names.request_queue(SERVICE), self.names.commands_queue(SERVICE)]
        work += [self.names.delay_ready_queue, self.names.subscription_queue(SERVICE, "on_probe")]
        # The broker's counts lag (statistics interval, up to 5 s) and the calc.add just made is
        # acked only after its reply is confirmed: poll, bounded, until nothing is left.
        deadline = time.monotonic() + _QUEUE_SETTLE
        while True:
            counts = await asyncio.to_thread(rabbit_queue_counts, self.names.namespace)
            stuck = {name: counts[name] for name in work if name in counts and any(counts[name])}
            if not stuck or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert not stuck, f"messages left (ready, unacked) in the service's queues: {stuck}"
        assert_logs_clean(self.logs, self.caplog, self.tokens_sent())

    def tokens_sent(self) -> set[str]:
        """Every token the service has seen (their bodies must stay out of the logs)."""
        with self.tracker._lock:
            return set(self.tracker.by_token)


Outcome = frozenset[str]
Check = Callable[[Hostile, Sent], str | None]

NORMAL: dict[str, Outcome] = {
    "call": frozenset({"ran", "reply:ok"}),
    "cast": frozenset({"ran"}),
    "submit": frozenset({"ran", "completed:ok"}),
    "event": frozenset({"ran"}),
    "forward": frozenset({"ran"}),  # a delayed cast
}


def refused(path: str, code: str = "INVALID_ARGUMENT") -> Outcome:
    """What a refusal (reason `invalid`) looks like on each path: answered to a caller, parked
    otherwise."""
    return {
        "call": frozenset({f"reply:{code}"}),
        "submit": frozenset({f"completed:{code}"}),
    }.get(path, frozenset({"parked:invalid"}))


@dataclass(frozen=True)
class Case:
    """One message: what is sent (a header of one field type, properties) on one path, and
    the outcomes any of which is right."""

    path: str
    label: str
    headers: dict[str | bytes, Any]
    expect: Sequence[Outcome]
    job: bool = False  # declare a job queue and send its id as x-job-id (a string)
    job_header: Callable[[str], Field] | None = None  # x-job-id made from the job id instead
    callback: Callable[[str], Field] | None = None  # x-callback-route made from a fresh route
    target: tuple[Field, Field] | None = None
    check: Check | None = None
    props: dict[str, Any] = field(default_factory=dict)  # `rawamqp.Props` fields
    defaults: bool = True  # see `Hostile.send`


def non_text(number: int = 1) -> list[tuple[str, Field]]:
    """Every field type that is not text, with `number` where a type holds a number."""
    return [
        ("t", t(True)),
        ("b", b(number)),
        ("B", B(number)),
        ("s", s(number)),
        ("u", u(number)),
        ("I", I(number)),
        ("i", i(number)),
        ("l", l(number)),
        ("f", f(float(number))),
        ("d", d(float(number))),
        ("D", D(0, number)),
        ("T", T(1_700_000_000)),
        ("F", F({"v": S("x")})),
        ("A", A([S("x")])),
    ]


def text_types(value: str) -> list[tuple[str, Field]]:
    """`value` as a long string and as a byte array (what pika, Java and amqplib send)."""
    return [("S", S(value)), ("x", x(value.encode()))]


NOT_UTF8 = b"\xff\xfe\xc3("


async def run_cases(env: Hostile, cases: Sequence[Case]) -> None:
    """Publish every case, wait until each is accounted for, compare, then the oracle."""
    sent: list[tuple[Case, Sent]] = []
    for case in cases:
        job_id = f"j{secrets.token_hex(8)}" if case.job else None
        route = f"hcb.{secrets.token_hex(6)}" if case.callback else None
        headers = dict(case.headers)
        if case.job_header is not None and job_id is not None:
            headers[H_JOB_ID] = case.job_header(job_id)
        if case.callback is not None and route is not None:
            headers[H_CALLBACK] = case.callback(route)
        one = await env.send(
            case.path,
            headers,
            job_id=job_id,
            callback=route,
            target=case.target,
            defaults=case.defaults,
            **case.props,
        )
        sent.append((case, one))
    await env.settle([one for _, one in sent])
    wrong: list[str] = []
    for case, one in sent:
        got = env.outcome(one)
        if got not in case.expect:
            wanted = " or ".join(str(sorted(e)) for e in case.expect)
            wrong.append(f"{case.path}/{case.label}: got {sorted(got)}, want {wanted}")
        elif case.check is not None and (problem := case.check(env, one)) is not None:
            wrong.append(f"{case.path}/{case.label}: {problem}")
    try:
        await env.assert_sound()
    except AssertionError as exc:
        wrong.append(f"oracle: {exc}")
    assert not wrong, f"{len(wrong)} of {len(sent)} cases wrong:\n" + "\n".join(wrong)


def _status(headers: dict[str, Any], body: bytes) -> str:
    if headers.get("x-status") != "error":
        return "ok"
    try:
        error = decode_json(body)
    except Exception:
        return "unreadable"
    return str(error.get("code")) if isinstance(error, dict) else "unreadable"


def assert_logs_clean(
    logs: Iterable[MutableMapping[str, Any]], caplog: Any, tokens: set[str]
) -> None:
    """No exception in a consumer callback, no dispatch failure, no body (token) and no
    password in any structlog event or stdlib log record."""
    lines = [" ".join(f"{key}={value}" for key, value in event.items()) for event in logs]
    records = list(getattr(caplog, "records", ()))
    lines += [f"{record.name} {record.getMessage()}" for record in records]
    bad = [
        line for line in lines if "Consumer callback failed" in line or "dispatch failed" in line
    ]
    assert not bad, f"a consumer callback failed: {bad[:3]}"
    for line in lines:
        for marker in PASSWORD_MARKERS:
            assert marker not in line, f"password in a log line: {line[:300]}"
        if "tok-" in line:
            leaked = [token for token in TOKEN.findall(line.encode()) if token.decode() in tokens]
            assert not leaked, f"a body reached a log line: {line[:300]}"


def rabbit_queue_counts(namespace: str) -> dict[str, tuple[int, int]]:
    """Ready and unacknowledged counts of this namespace's queues (the test broker's
    rabbitmqctl, read-only)."""
    rows = TEST_BROKER.rows("list_queues", "name", "messages_ready", "messages_unacknowledged")
    return {
        row[0]: (int(row[1]), int(row[2]))
        for row in rows
        if len(row) == 3 and row[0].startswith(f"{namespace}.") and row[1].isdigit()
    }


class MakeHostile(Protocol):
    """Start the probe App (settings overrides as keywords) and its observers (`service_dlq`:
    whether to consume the service's DLQ)."""

    def __call__(
        self, *, service_dlq: bool = True, **overrides: Any
    ) -> Awaitable[Hostile]: ...  # pragma: no cover


@pytest.fixture
def log_records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Stdlib log records (aiormq's "Consumer callback failed" is one) at WARNING and up."""
    caplog.set_level(logging.WARNING)
    return caplog


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event of the test."""
    with capture_logs() as captured:
        yield captured


async def start_hostile(
    settings: Settings,
    *,
    logs: list[MutableMapping[str, Any]],
    caplog: pytest.LogCaptureFixture,
    service_dlq: bool = True,
) -> Hostile:
    """Start the probe App (consumers wrapped by a Tracker) and its observers; cleaned up by
    `stop_hostile` even when this raises after the App started."""
    log, tracker = HandlerLog(), Tracker()
    app = App(probe_service(log), settings=settings, http=False)
    consumer = app.transport.consumer
    consumer.replace_consumers(tracker.wrap(spec) for spec in consumer.consumers)
    await app.start()
    try:
        await app.wait_ready(30)
        # The probes publish into the delay ladder as a foreign client would: it declares the
        # ladder first (docs/protocol.md §9); an App declares it only for its own delays.
        ladder = AmqpLink("ladder", settings, topology=delay_ladder(settings))
        ladder.start()
        try:
            await ladder.wait_ready(30)
        finally:
            await ladder.close()
        amqp = await RawAmqp.connect()
    except BaseException:
        await app.stop()
        await delete_topology(app.topology)
        raise
    env = Hostile(app, tracker=tracker, log=log, amqp=amqp, logs=logs, caplog=caplog)
    try:
        await env.watch(service_dlq=service_dlq)
    except BaseException:
        await stop_hostile([env])
        raise
    return env


async def stop_hostile(envs: Sequence[Hostile]) -> None:
    """Close the observers, stop the Apps, delete what they and the observers declared."""
    for env in envs:
        await env.close()
        await env.app.stop()
    await delete_topology(*(env.app.topology for env in envs))
    await delete_entities({q for env in envs for q in env.extra_queues}, (), AMQP_URL)


@pytest.fixture
async def hostile(
    settings: Settings,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> AsyncIterator[MakeHostile]:
    """Probe Apps on this test's namespace, observed; stopped and deleted after the test."""
    started: list[Hostile] = []

    async def make(*, service_dlq: bool = True, **overrides: Any) -> Hostile:
        app_settings = settings.model_copy(update=overrides) if overrides else settings
        env = await start_hostile(
            app_settings, logs=logs, caplog=log_records, service_dlq=service_dlq
        )
        started.append(env)
        return env

    yield make
    await stop_hostile(started)
