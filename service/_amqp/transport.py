"""The AMQP link: a supervised connection that declares topology, restores consumers, publishes.

An `AmqpLink` (a `service._amqp.link.Link`) is one connection with one channel, kept alive by a
reconnect loop with back-off and jitter. On every (re)connect it re-applies confirm mode and
prefetch, declares exchanges → queues → bindings, re-attaches every consumer and counts them
before it reports ready.
aio-pika opens connections and declares; the per-message path (consume, ack, publish) runs on
its aiormq channel to avoid a second task and wrapper object per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import ssl
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from service._amqp import shim
from service._amqp.link import (
    ConsumerSpec,
    Link,
    LinkFactory,
    LinkState,
    PublishOutcome,
    check_body_size,
    record_publish,
)
from service._observe import metrics
from service._observe.log import get_logger
from service._protocol.config import Settings, redact_url
from service._protocol.errors import (
    ConfigError,
    ConnectionLost,
    DeadlineExceeded,
    NotFound,
    TopologyError,
    Unavailable,
)
from service._protocol.topology import QueueDecl, Topology, dead_letter_policy
from service._protocol.types import Delivery, Outgoing, Settle
from service._protocol.vocabulary import ARG_DELIVERY_LIMIT

_log = get_logger("burrow.transport")

# What the AMQP library raises when the connection or channel goes away under a call: the one
# list every user of a connection in service/_amqp/ catches (TimeoutError is an OSError).
# `delete_queue(if_unused/if_empty)`: how often, and how far apart, a queue is looked at
# before it is left in place as busy (at most about 0.4 s).
_IDLE_LOOKS = 5
_IDLE_PAUSE = 0.1
CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: channel closed under us
    ConnectionError,
    OSError,
    asyncio.IncompleteReadError,
)
# What an aiormq failure of a publish means, first match wins (TimeoutError is an OSError);
# any other of _PUBLISH_ERRORS is the connection or channel going away: LOST.
_PUBLISH_OUTCOMES: tuple[tuple[type[BaseException], PublishOutcome], ...] = (
    (TimeoutError, PublishOutcome.NO_CONFIRM),
    # The exchange does not exist (the broker also closes the channel; the link heals).
    (aiormq.exceptions.ChannelNotFoundEntity, PublishOutcome.NO_EXCHANGE),
    (aiormq.exceptions.DeliveryError, PublishOutcome.NACKED),
)
_PUBLISH_ERRORS = (TimeoutError, *CONNECTION_ERRORS)


class AmqpLink(LinkState):
    """One supervised AMQP connection with one confirm-mode channel (a `Link`).

    Args:
        name: `consumer`, `publisher`, `client`… — a metric label and the connection name.
        topology: declared on every connect, before consumers attach.
        prefetch: per-consumer prefetch applied on every connect (None: no QoS).
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        *,
        topology: Topology | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(name, settings, topology=topology, prefetch=prefetch)
        self._connection: AbstractConnection | None = None
        # The aiormq channel only: aio-pika's Channel stays alive through the callbacks its
        # channel holds, and with a plain (not robust) connection nothing of aio-pika is
        # re-declared from weak references, so no declared object needs to be kept.
        self._raw: aiormq.Channel | None = None
        self._acks: Acks | None = None  # the channel's held acks
        self._task: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()  # polite closes of lost connections
        self._closing = False
        self._serving = False  # ready was set since the last loss (`ready` may be cleared early)
        self._connects = 0
        self._failure_said: tuple[str, float] | None = None  # last warned cause, and when
        self._unlimited: set[str] = set()  # dead-letter queues declared before their limit

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; `ready` is set once consumers are attached."""
        if self._task is not None:
            return
        try:
            shim.check_libraries()
        except ConfigError as exc:
            # aiormq, pamqp or aio-pika changed what Burrow's connections build on: no
            # connect can work; say so once, at start, instead of failing per delivery.
            self._set_fatal(exc)
            _log.error("unsupported AMQP library; not connecting", link=self.name, error=str(exc))
            self._lost(exc)
            return
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closing = True
        if self._acks is not None:
            # Written before the connection closes: answered deliveries stay acked.
            await self._acks.drain(self.settings.publish_timeout)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._ready.clear()

    async def cancel_consumers(self) -> None:
        """Stop receiving new deliveries (first step of a graceful shutdown)."""
        self._consumers.clear()
        raw = self._raw
        if raw is None or raw.is_closed:
            return
        for tag in list(raw.consumers):
            with contextlib.suppress(*CONNECTION_ERRORS, asyncio.TimeoutError):
                await raw.basic_cancel(tag, timeout=5)
        self._set_attached(0)

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishing on this connection (resource alarm)."""
        underlay = self._underlay_connection()
        return underlay is not None and shim.connection_blocked(underlay)

    def _underlay_connection(self) -> aiormq.Connection | None:
        transport = None if self._connection is None else self._connection.transport
        return None if transport is None else cast(aiormq.Connection, transport.connection)

    # -- supervision -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        urls = self.settings.amqp_urls()
        while not self._closing:
            try:
                url = self.settings.login_url(urls[attempt % len(urls)])
            except ConfigError as exc:
                self._set_fatal(exc)
                _log.error("cannot read credentials", link=self.name, error=str(exc))
                return
            try:
                await self._connect(url)
                attempt = 0
                await self._until_lost()
                reason: BaseException = ConnectionLost("connection to the broker lost")
            except (
                aiormq.exceptions.ProbableAuthenticationError,
                aiormq.exceptions.AuthenticationError,
                TlsFailure,
                VhostRefused,
            ) as exc:
                fatal: ConfigError
                if isinstance(exc, TlsFailure):
                    event, problem, fatal = "TLS failure", str(exc), exc
                elif isinstance(exc, VhostRefused):
                    event, problem, fatal = "broker refused the virtual host", str(exc), exc
                else:
                    event = problem = "broker refused the login"
                    fatal = ConfigError(
                        f"the broker refused the login at {redact_url(url)} "
                        "(check BURROW_AMQP_URL credentials and permissions)"
                    )
                if self._connects:
                    # Credentials or certificates changed under a running service: keep
                    # trying, slowly, so rotated secrets are picked up without a login storm.
                    reason = exc
                    attempt = max(attempt, 16)
                    self._last_error = problem
                    _log.error(event, link=self.name, url=redact_url(url), error=problem)
                else:
                    # At start, retrying cannot fix a password or a certificate: fail now
                    # (wait_ready raises, `burrow run` exits 1) instead of looping.
                    self._set_fatal(fatal)
                    _log.error(f"{event}; not retrying", link=self.name, error=str(fatal))
                    self._lost(exc)
                    return
            except TopologyError as exc:
                self._set_fatal(exc)
                _log.error("topology conflict; not retrying", link=self.name, error=str(exc))
                self._lost(exc)
                return
            except asyncio.CancelledError:
                self._lost(ConnectionLost("link closed"))
                raise
            except Exception as exc:
                reason = exc
                self._last_error = _describe(exc)
                self._log_failure(url, self._last_error)
            self._lost(reason)
            if self._closing:
                return
            delay = min(
                self.settings.reconnect_max_delay,
                self.settings.reconnect_min_delay * 2 ** min(attempt, 16),
            )
            attempt += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _log_failure(self, url: str, problem: str) -> None:
        """Warn of a failed connect once per cause, and again each minute it lasts: the retry
        loop would otherwise repeat the same line several times a second; repeats go to debug."""
        now = time.monotonic()
        said = self._failure_said
        repeated = said is not None and said[0] == problem and now - said[1] < _REPEAT_WARNING
        if not repeated:
            self._failure_said = (problem, now)
        (_log.debug if repeated else _log.warning)(
            "broker connection failed", link=self.name, url=redact_url(url), error=problem
        )

    async def _connect(self, url: str) -> None:
        context = None
        try:
            if urlsplit(url).scheme == "amqps":
                # Built at every connect, so renewed certificate files are picked up.
                context = await asyncio.to_thread(_tls_context, self.settings)
            attempt = asyncio.ensure_future(
                aio_pika.connect(
                    _with_heartbeat(url, self.settings.heartbeat),
                    timeout=self.settings.connect_timeout,
                    client_properties={"connection_name": f"burrow:{self.name}"},
                    ssl_context=context,
                    # Burrow's own connection classes: tolerant decoding, coalesced writes.
                    connection_class=shim.Connection,
                )
            )
            try:
                connection = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                # Cancelled mid-connect (the link is closing): let the attempt end by itself,
                # within connect_timeout. Cancelling it races aio-pika's `wait_for` on Python
                # 3.11, which then loses the broker's answer ("Task exception was never
                # retrieved", logged at error level) when the refusal arrives at that moment.
                attempt.add_done_callback(self._abandoned)
                raise
        except Exception as exc:
            refusal = _vhost_refusal(exc)
            if refusal is not None:
                raise VhostRefused(
                    f"the broker refused the virtual host of {redact_url(url)}: {refusal} "
                    "(check the vhost in BURROW_AMQP_URL and the user's permissions on it)"
                ) from None
            problem = _tls_problem(exc)
            if problem is None:
                raise
            raise TlsFailure(f"{problem} (broker at {redact_url(url)})") from None
        self._connection = connection
        channel = await connection.channel(publisher_confirms=True)
        raw = cast(aiormq.Channel, await channel.get_underlay_channel())
        shim.check_publishing(raw)
        if self.prefetch is not None:
            await channel.set_qos(prefetch_count=self.prefetch)
        await self._declare(channel)
        self._raw = raw
        self._acks = Acks(raw, self.settings.ack_delay, self.prefetch)
        raw.on_consumer_cancel_callbacks.add(self._on_consumer_cancel)
        wanted = list(self._consumers)
        for consumer in wanted:
            await self._attach(raw, consumer)
        self._set_attached(len(raw.consumers))
        if self._attached != len(wanted):
            raise ConnectionLost(f"{self._attached} of {len(wanted)} consumers attached")
        self._last_error = None
        self._failure_said = None
        self._connects += 1
        if self._connects > 1:
            metrics.AMQP_RECONNECTS.labels(self.name).inc()
        _log.info("broker connected", link=self.name, url=redact_url(url), consumers=self._attached)
        self._serving = True
        self._ready.set()

    async def _declare(self, channel: AbstractChannel, topology: Topology | None = None) -> None:
        """Declare `topology` (default: the link's own) on `channel`."""
        topology = self.topology if topology is None else topology
        passive = self.settings.passive_topology
        queue: QueueDecl | None = None
        try:
            for ex in topology.exchanges:
                await channel.declare_exchange(ex.name, ex.type, durable=True, passive=passive)
            for queue in topology.queues:
                # A dead-letter queue declared before Burrow gave it a delivery limit cannot
                # take one now: it is kept as it is (see `_without_limit`).
                kept = queue.name in self._unlimited
                await channel.declare_queue(
                    queue.name,
                    durable=True,
                    arguments=None if kept else queue.arguments,
                    passive=passive or kept,
                )
            queue = None
            if passive:
                return  # least privilege: bindings come with the pre-provisioned definitions
            raw = await channel.get_underlay_channel()
            for binding in topology.bindings:
                if binding.destination_type == "exchange":
                    await raw.exchange_bind(
                        binding.destination, binding.exchange, routing_key=binding.key
                    )
                else:
                    await raw.queue_bind(
                        binding.destination, binding.exchange, routing_key=binding.key
                    )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if queue is not None and queue.look_only and ARG_DELIVERY_LIMIT in str(exc):
                raise self._without_limit(queue.name) from None
            raise TopologyError(
                f"the broker holds an entity declared with other arguments: {_describe(exc)}; "
                "delete it or align the settings"
            ) from None
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            if not passive:
                # e.g. a queue whose cluster node is down: retry, other nodes may serve it.
                raise ConnectionLost(f"declare failed: {_describe(exc)}") from None
            raise TopologyError(
                f"passive declare found nothing: {_describe(exc)}; import "
                "deploy/rabbitmq/definitions.json (burrow definitions) before starting"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise TopologyError(
                f"not allowed to declare: {_describe(exc)}; grant configure permission or set "
                "BURROW_PASSIVE_TOPOLOGY=true with pre-provisioned definitions"
            ) from None

    def _without_limit(self, queue: str) -> ConnectionLost:
        """A dead-letter queue declared by an earlier Burrow, without the delivery limit that
        keeps looking at letters from using them up: its redeclare was refused (and its channel
        closed), so the link reconnects at once and keeps the queue as it is. The operator is
        told once how to protect its letters (on RabbitMQ 4.x they are dropped after 20 looks)."""
        self._unlimited.add(queue)
        if queue not in _WARNED_UNLIMITED:
            _WARNED_UNLIMITED.add(queue)
            self._warn_unlimited(queue)
        return ConnectionLost(f"{queue} has no delivery limit; declaring it as it is")

    def _warn_unlimited(self, queue: str) -> None:
        shipped = dead_letter_policy(Topology(queues=[QueueDecl(queue, look_only=True)]))
        assert shipped is not None  # one look-only queue: always a policy
        policy = (
            f"rabbitmqctl set_policy {shipped['name']} '{shipped['pattern']}' "
            f"'{json.dumps(shipped['definition'])}' --apply-to {shipped['apply-to']} "
            f"--priority {shipped['priority']}"
        )
        _log.warning(
            "dead-letter queue declared without a delivery limit: on RabbitMQ 4.x every look "
            "(burrow dlq list/show) uses one of 20 delivery attempts and the letter is then "
            "dropped; apply the policy shipped in deploy/rabbitmq/definitions.json, or "
            "run the fix",
            link=self.name,
            queue=queue,
            fix=policy,
        )

    async def _attach(self, raw: aiormq.Channel, consumer: ConsumerSpec) -> None:
        acks = self._acks
        assert acks is not None
        settle = None if consumer.no_ack else _settler(raw, acks)
        received = None if consumer.no_ack else acks.received
        callback, queue = consumer.callback, consumer.queue

        async def on_message(message: DeliveredMessage) -> None:
            delivery = delivery_of(message, queue=queue, settle=settle)
            if received is not None:
                received(delivery.delivery_tag)  # before any await: tasks start in tag order
            try:
                await callback(delivery)
            except Exception:
                # Never leave a delivery unsettled (its prefetch slot would be lost until the
                # connection closes): reject it to the queue's dead-letter exchange, no requeue.
                _log.exception("consumer callback failed; rejecting", queue=queue)
                if delivery.settled is None:
                    await delivery.reject()

        registered: Callable[[DeliveredMessage], Any] = on_message
        inline = consumer.inline
        if inline is not None and consumer.no_ack:

            def handle(message: DeliveredMessage) -> None:
                inline(delivery_of(message, queue=queue))

            # Called in the channel's frame reader (shim), no task per delivery.
            registered = shim.inline_consumer(on_message, handle)
        await raw.basic_consume(
            consumer.queue, registered, no_ack=consumer.no_ack, exclusive=consumer.exclusive
        )

    async def _until_lost(self) -> None:
        underlay = self._underlay_connection()
        assert underlay is not None
        assert self._raw is not None
        connection_closed = underlay.closing
        channel_closed = self._raw.closing
        probe = asyncio.ensure_future(self._probe(self._raw))
        watched = {connection_closed, channel_closed, probe}
        await asyncio.wait(watched, return_when="FIRST_COMPLETED")
        for fut in watched:
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved
            else:
                fut.cancel()
        failure = probe.exception() if probe.done() and not probe.cancelled() else None
        if failure is not None:
            # A bug, not the broker (e.g. aiormq changed under service/shim.py): say so loudly.
            _log.error("link probe failed; reconnecting", link=self.name, exc_info=failure)

    async def _probe(self, raw: aiormq.Channel) -> None:
        """Return when the broker stops answering: a black hole (no RST) is found within about
        two heartbeat intervals instead of aiormq's three-plus."""
        interval = self.settings.heartbeat
        if not interval:
            await asyncio.Future()  # heartbeats off: never decide on our own
        while True:
            await asyncio.sleep(interval / 2)
            if self.blocked:
                continue  # a resource alarm stops the broker reading us: silence, not death
            try:
                # A passive declare of a built-in exchange: a round trip that changes nothing.
                await raw.exchange_declare(
                    "amq.direct", exchange_type="direct", passive=True, timeout=interval
                )
            except TimeoutError:
                if self._heard_within(interval):
                    continue  # frames keep coming (a backlog of large bodies): busy, not dead
                _log.warning("broker stopped answering; reconnecting", link=self.name)
                await self._abandon()
                return
            except CONNECTION_ERRORS:
                return

    def _heard_within(self, seconds: float) -> bool:
        """Whether any frame arrived from the broker in the last `seconds`."""
        silent = shim.silent_for(self._underlay_connection())
        return silent is not None and silent < seconds

    async def _abandon(self) -> None:
        """Drop a dead connection the way aiormq does on its own heartbeat timeout: mark it
        stuck and stop its reader, so the socket is aborted rather than closed politely (a
        polite close would wait for an answer that never comes)."""
        underlay = self._underlay_connection()
        reader = None if underlay is None else shim.reader_task(underlay)
        if underlay is None or reader is None:
            return
        shim.expire_heartbeat_grace(underlay)
        reader.cancel()
        closing = underlay.closing
        await asyncio.wait({closing}, timeout=2)
        if closing.done() and not closing.cancelled():
            closing.exception()
        else:
            closing.cancel()

    async def _on_consumer_cancel(self, frame: spec.Basic.Cancel) -> None:
        # The broker cancelled a consumer (queue deleted, node down): rebuild the whole link so
        # the queue is re-declared and every consumer re-attached — never a zombie consumer.
        _log.warning("consumer cancelled by the broker; re-declaring", link=self.name)
        if self._acks is not None:
            self._acks.flush()  # queued before the channel's close
        if self._raw is not None:
            self._raw.create_task(self._raw.close())

    def _lost(self, reason: BaseException) -> None:
        was_ready, self._serving = self._serving, False
        self._ready.clear()
        self._set_attached(0)
        self._raw = None
        if self._acks is not None:
            self._acks.flush()  # still worth sending when only the channel is gone
            self._acks = None
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            self._close_later(connection)
        if was_ready and self._closing:
            _log.info("broker connection closed", link=self.name)  # asked for: not a loss
        elif was_ready:
            _log.warning("broker connection lost", link=self.name, error=_describe(reason))
        self._notify_lost(reason)

    def _close_later(self, connection: AbstractConnection) -> None:
        closer = asyncio.get_running_loop().create_task(_quiet_close(connection))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    def _abandoned(self, attempt: asyncio.Future[Any]) -> None:
        """A connect this link gave up on has ended: its error is not worth reporting (the
        link is closing), and a connection it opened after all is closed."""
        if attempt.cancelled() or attempt.exception() is not None:
            return
        self._close_later(attempt.result())

    # -- one-off operations -----------------------------------------------------------------

    async def _live_raw(self, timeout: float) -> aiormq.Channel:
        if self._raw is not None and self._raw.is_closed:
            # The broker closed the channel (say, a publish to a missing exchange) and the
            # supervisor is about to rebuild the link: wait for that, not fail on a dead channel.
            self._ready.clear()
        await self._wait_live(timeout)
        assert self._raw is not None  # ready: connected, channel open
        return self._raw

    async def declare_queue(self, queue: QueueDecl, timeout: float | None = None) -> None:
        """Declare a queue once (not re-declared on reconnect), e.g. a job's result queue."""
        raw = await self._live_raw(self.settings.publish_timeout if timeout is None else timeout)
        try:
            await raw.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        except CONNECTION_ERRORS as exc:
            raise ConnectionLost(f"could not declare {queue.name}: {_describe(exc)}") from None

    async def _declare_on_demand(
        self, topology: Topology, *, requires: str, timeout: float
    ) -> bool:
        """Declare `topology` on a channel of its own (a refused declare closes only that one),
        once queue `requires` is found to exist (a passive declare); False when it does not."""
        await self._live_raw(timeout)
        connection = self._connection
        assert connection is not None  # ready: connected
        try:
            async with asyncio.timeout(timeout):
                channel = await connection.channel(publisher_confirms=False)
                try:
                    raw = cast(aiormq.Channel, await channel.get_underlay_channel())
                    try:
                        await raw.queue_declare(requires, passive=True)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        return False
                    await self._declare(channel, topology)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
        except TimeoutError:
            raise ConnectionLost(f"declaring took longer than {timeout:.1f}s") from None
        except CONNECTION_ERRORS as exc:
            raise ConnectionLost(f"declare failed: {_describe(exc)}") from None
        return True

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> bool:
        """Delete a queue, best effort (it may be gone already); True if this call deleted it.

        With `if_unused` / `if_empty` the queue is looked at first (a passive declare on a
        throwaway channel, after this link's held acks are written) and deleted only when no
        consumer is attached / no message is ready; a busy answer is asked again up to
        `_IDLE_LOOKS` times (a quorum queue's counts trail its state). Not the flags of
        `queue.delete`: quorum queues refuse them with a connection error (540
        NOT_IMPLEMENTED, RabbitMQ 3.10 to 4.x). So a consumer attaching between the look and
        the delete is cancelled by the broker (its link re-declares the queue), and a message
        published in between goes with the queue.
        """
        raw = self._raw
        if raw is None or raw.is_closed:
            return False
        timeout = self.settings.publish_timeout
        if not (if_unused or if_empty):
            with contextlib.suppress(*CONNECTION_ERRORS, asyncio.TimeoutError):
                await raw.queue_delete(name, timeout=timeout)
                return True
            return False
        if self._acks is not None:
            await self._acks.drain(timeout)  # settled deliveries leave the queue first
        connection = self._connection
        if connection is None:
            return False
        try:
            # A passive declare of a missing queue closes its channel: a throwaway one.
            channel = await connection.channel(publisher_confirms=False)
        except (TimeoutError, *CONNECTION_ERRORS):
            return False
        try:
            probe = cast(aiormq.Channel, await channel.get_underlay_channel())
            for look in range(_IDLE_LOOKS):
                # A quorum queue's counts trail its state a little (RabbitMQ 4.x still counted
                # a consumer cancelled a moment ago): a busy answer is asked again, briefly.
                declared = await probe.queue_declare(name, passive=True, timeout=timeout)
                used = if_unused and (declared.consumer_count or 0) > 0
                if not used and not (if_empty and (declared.message_count or 0) > 0):
                    await probe.queue_delete(name, timeout=timeout)
                    return True
                if look + 1 < _IDLE_LOOKS:
                    await asyncio.sleep(_IDLE_PAUSE)
            return False
        except (TimeoutError, *CONNECTION_ERRORS) as exc:
            # Gone already (404), not ours to delete (403), or the connection went away.
            _log.debug("queue not deleted", link=self.name, queue=name, error=_describe(exc))
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def peek(self, queue: str, timeout: float) -> Delivery:
        """Wait for the first message of `queue` and leave it there (read, then requeued).

        Raises:
            NotFound: the queue does not exist.
            DeadlineExceeded: nothing arrived within `timeout` seconds.
        """
        raw = await self._live_raw(timeout)
        # A passive declare of a missing queue closes its channel: use a throwaway one.
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            probe = cast(aiormq.Channel, await channel.get_underlay_channel())
            try:
                await probe.queue_declare(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise NotFound(f"no such job or its result expired ({queue})") from None
            arrived: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()

            async def first(message: DeliveredMessage) -> None:
                if not arrived.done():
                    arrived.set_result(message)

            await probe.basic_consume(queue, first, no_ack=False)
            try:
                async with asyncio.timeout(timeout):
                    message = await arrived
            except TimeoutError:
                raise DeadlineExceeded(f"nothing in {queue} within {timeout:.1f}s") from None
            return delivery_of(message, queue=queue)
        finally:
            del raw
            with contextlib.suppress(Exception):
                await channel.close()  # unacked: the message stays for the next reader

    # -- publishing --------------------------------------------------------------------------

    async def _send(
        self,
        message: Outgoing,
        *,
        kind: str,
        mandatory: bool,
        timeout: float | None,
        check_size: bool,
    ) -> None:
        """Publish with a broker confirm; raise what `link.PUBLISH_OUTCOMES` says on failure.

        Args:
            kind: `request`, `reply`, `dead_letter` or `event` (metric label only).
            mandatory: have the broker return the message when no queue matches its route.
            timeout: seconds to wait for the link and the confirm (default: publish_timeout).
            check_size: refuse bodies above max_body_bytes (off when parking what we received).
        """
        if check_size:
            check_body_size(message, kind=kind, limit=self.settings.max_body_bytes)
        timeout = self.settings.publish_timeout if timeout is None else timeout
        raw = self._raw
        if raw is None or raw.is_closed or not self._ready.is_set():
            raw = await self._live_raw(timeout)
        # The frames are built in one pass and join the connection's write queue (coalesced,
        # shim.py); nothing waits for the socket, the confirm is what we await.
        frames = shim.publish_frames(
            raw.number,
            exchange=message.exchange,
            routing_key=message.routing_key,
            mandatory=mandatory,
            properties=shim.content_properties(
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers=message.headers or None,
                delivery_mode=2 if message.persistent else 1,
                priority=message.priority,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                expiration=None if message.expiration_ms is None else str(message.expiration_ms),
                message_id=message.message_id,
                timestamp=message.timestamp,
                message_type=message.type,
                app_id=message.app_id,
            ),
            body=message.body,
            max_content=raw.max_content_size,
        )
        detail = ""
        try:
            result = None
            confirmation = await shim.publish(raw, frames, message.message_id)
            if confirmation is not None:
                async with asyncio.timeout(timeout):
                    result = await confirmation
        except _PUBLISH_ERRORS as exc:
            outcome, detail = _publish_outcome(exc), _describe(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller cancelled us
            # aiormq cancels pending confirms when it drops the connection.
            outcome, detail = PublishOutcome.LOST, "no confirm before the connection dropped"
        else:
            returned = isinstance(result, DeliveredMessage)
            outcome = PublishOutcome.RETURNED if returned else PublishOutcome.CONFIRMED
        record_publish(outcome, message, kind=kind, timeout=timeout, detail=detail)


def _publish_outcome(exc: BaseException) -> PublishOutcome:
    for caught, outcome in _PUBLISH_OUTCOMES:
        if isinstance(exc, caught):
            return outcome
    return PublishOutcome.LOST


class Transport:
    """The service side's two links: consume on one connection, publish on another.

    Args:
        link_factory: builds each link; `service.testing` passes its in-memory one here.
    """

    def __init__(
        self, settings: Settings, topology: Topology, *, link_factory: LinkFactory = AmqpLink
    ) -> None:
        self.consumer = link_factory(
            "consumer", settings, topology=topology, prefetch=settings.prefetch
        )
        # Only the consumer link declares: the publisher's targets exist once it consumes.
        self.publisher = link_factory("publisher", settings)

    @property
    def links(self) -> tuple[Link, Link]:
        """Both links, for health checks."""
        return (self.consumer, self.publisher)

    def start(self) -> None:
        """Start both links connecting."""
        for link in self.links:
            link.start()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until both links are ready."""
        await asyncio.gather(*(link.wait_ready(timeout) for link in self.links))

    async def close(self) -> None:
        """Close both links."""
        for link in self.links:
            await link.close()


def delivery_of(
    message: DeliveredMessage,
    *,
    queue: str,
    settle: Callable[[Delivery, Settle], Any] | None = None,
) -> Delivery:
    """A message aiormq delivered (basic.deliver or basic.get-ok) from `queue`, as a Burrow
    `Delivery`; `settle` acks or rejects it (None: no-ack)."""
    props = message.header.properties
    return Delivery(
        body=message.body,
        routing_key=message.routing_key or "",
        exchange=message.exchange or "",
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        type=props.message_type,
        headers=props.headers,
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        expiration=props.expiration,
        redelivered=bool(message.redelivered),
        delivery_tag=message.delivery_tag or 0,
        settle_fn=settle,
        queue=queue,
        app_id=props.app_id,
        priority=props.priority,
        timestamp=props.timestamp,
    )


class Acks:
    """The acks of one channel, held up to `delay` seconds so that one `basic.ack(multiple)`
    settles many deliveries (one frame, and often no write of its own, instead of one each).

    Held acks are sent at once when the channel's unsettled deliveries (held ones included)
    reach `limit`, the prefetch (the broker would send no more until they are acked), before
    the link closes (`flush`), and right away with `delay` 0. A `multiple` ack covers only tags
    below the lowest delivery still being handled, so no delivery is acked early.
    """

    __slots__ = ("_delay", "_held", "_limit", "_open", "_puts", "_raw", "_soon", "_timer")

    def __init__(self, raw: aiormq.Channel, delay: float, limit: int | None) -> None:
        self._raw = raw
        self._delay = delay
        self._limit = limit or 0
        self._open: set[int] = set()  # delivered, not yet settled by their handler
        self._held: list[int] = []  # acked by their handler, not yet sent
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False
        self._puts: set[asyncio.Task[None]] = set()  # frames waiting for a full write queue

    def received(self, tag: int) -> None:
        """A delivery that will be settled arrived (before its handler runs)."""
        self._open.add(tag)

    def ack(self, tag: int) -> None:
        """Its handler acked it: send the ack soon, alone or with others."""
        self._open.discard(tag)
        self._held.append(tag)
        if self._soon:
            return
        if not self._delay or len(self._open) + len(self._held) >= self._limit > 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._soon = True
            asyncio.get_running_loop().call_soon(self.flush)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.flush)

    def settled(self, tag: int) -> None:
        """It was rejected (or requeued) instead: no ack may cover it."""
        self._open.discard(tag)

    async def drain(self, timeout: float) -> None:
        """Send every held ack and wait (up to `timeout`) until they are written: closing the
        connection drops what its writer has not written yet."""
        written = asyncio.get_running_loop().create_future()
        self.flush(written)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(written, timeout)

    def flush(self, written: asyncio.Future[None] | None = None) -> None:
        """Send every held ack now; `written`, if given, is resolved once they are written
        (or at once when there is nothing to send)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._soon = False
        held, self._held = sorted(self._held), []
        if not held or shim.closed(self._raw):
            if written is not None:
                written.set_result(None)
            return  # a closed channel's deliveries are redelivered by the broker (B8)
        number = self._raw.number
        lowest_open = min(self._open, default=held[-1] + 1)
        covered = [tag for tag in held if tag < lowest_open]
        frames = [shim.ack_frame(number, tag) for tag in held if tag > lowest_open]
        if covered:
            frames.insert(0, shim.ack_frame(number, covered[-1], multiple=len(covered) > 1))
        try:
            waiting = shim.send(self._raw, b"".join(frames), written)
        except CONNECTION_ERRORS as exc:
            _log.info("acks not sent; broker will redeliver", count=len(held), error=str(exc))
            if written is not None:
                written.set_result(None)
            return
        if waiting is not None:
            task = asyncio.ensure_future(waiting)
            self._puts.add(task)
            task.add_done_callback(self._puts.discard)


def _settler(raw: aiormq.Channel, acks: Acks) -> Callable[[Delivery, Settle], Any]:
    async def settle(delivery: Delivery, how: Settle) -> None:
        if raw.is_closed:
            # The channel this delivery came on is gone; the broker redelivers it (B8).
            _log.info("stale delivery not settled; broker will redeliver", how=how.value)
            return
        if how is Settle.ACK:
            acks.ack(delivery.delivery_tag)
            return
        acks.settled(delivery.delivery_tag)
        try:
            await raw.basic_reject(delivery.delivery_tag, requeue=how is Settle.REQUEUE, wait=False)
        except CONNECTION_ERRORS as exc:
            _log.info("settle failed; broker will redeliver", how=how.value, error=_describe(exc))

    return settle


class TlsFailure(ConfigError):
    """The TLS handshake failed (certificate, hostname, protocol): a configuration problem."""


class VhostRefused(ConfigError):
    """The broker refused the URL's virtual host (no such vhost, or no access to it)."""


_REPEAT_WARNING = 60.0  # seconds before an unchanged connect failure is warned about again
_WARNED_UNLIMITED: set[str] = set()  # dead-letter queues already warned of, once a process
_NOT_ALLOWED = 530  # AMQP reply code RabbitMQ closes with when Connection.Open is refused


def _broker_close(exc: BaseException) -> spec.Connection.Close | None:
    """The Connection.Close the broker answered a handshake step with, if that is what `exc`
    is. aiormq (7.2 on) reports it as an InvalidFrameError whose text drops the reply code and
    reason; a Burrow connection raises it as `shim.HandshakeRefused`, which keeps the frame.
    (Before 7.2 aiormq raised pamqp's AMQPInternalError with the frame among its arguments.)"""
    if isinstance(exc, shim.HandshakeRefused):
        return exc.close
    for arg in exc.args:
        if isinstance(arg, spec.Connection.Close):
            return arg
    return None


def _vhost_refusal(exc: BaseException) -> str | None:
    """The broker's reason when it refused the virtual host at Connection.Open, or None.

    RabbitMQ answers 530 NOT_ALLOWED for a vhost that does not exist or that the user may not
    use (fatal at start, like a refused login) and also for a connection limit reached, which
    passes: that one is retried.
    """
    close = _broker_close(exc)
    if isinstance(exc, aiormq.exceptions.ConnectionClosed) and len(exc.args) == 2:
        code, text = exc.args  # should aiormq report the close itself one day
    elif close is not None:
        code, text = close.reply_code, close.reply_text
    else:
        return None
    if code != _NOT_ALLOWED or "limit" in str(text):
        return None
    return str(text)[:300]


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """A client context that always verifies the broker's certificate and hostname."""
    try:
        # create_default_context: CERT_REQUIRED, check_hostname, TLS 1.2+.
        context = ssl.create_default_context(cafile=settings.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"BURROW_TLS_CA_FILE: cannot load {settings.tls_ca_file}: {exc}"
        ) from None
    if settings.tls_cert_file is not None:
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"BURROW_TLS_CERT_FILE / BURROW_TLS_KEY_FILE: cannot load "
                f"{settings.tls_cert_file}: {exc}"
            ) from None
    return context


def _tls_problem(exc: BaseException) -> str | None:
    """What went wrong with TLS in a failed connect, for a human; None if it was not TLS."""
    seen: BaseException | None = exc
    for _ in range(8):  # aiormq wraps the ssl error in AMQPConnectionError; bound any cycle
        if seen is None:
            break
        if isinstance(seen, ConfigError):
            return str(seen)
        if isinstance(seen, ssl.SSLCertVerificationError):
            reason = seen.verify_message or seen.reason or str(seen)
            if seen.verify_code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
                hint = "connect by a name the broker's certificate holds"
            else:
                hint = "is BURROW_TLS_CA_FILE the CA that signed the broker's certificate?"
            return f"TLS verification failed: {reason}; {hint}"
        if isinstance(seen, ssl.SSLError) and not isinstance(
            seen, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
        ):
            # e.g. WRONG_VERSION_NUMBER: an amqps:// URL pointing at a plain AMQP port.
            text = str(seen.args[1]) if len(seen.args) > 1 else str(seen)
            return f"TLS handshake failed: {_SSL_NOISE.sub('', text)}"
        seen = seen.__cause__ or seen.__context__
    return None


_SSL_NOISE = re.compile(r"^\[SSL: \w+\] | \(_ssl\.c:\d+\)$")
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_IP_ADDRESS_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


def _with_heartbeat(url: str, heartbeat: int) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _quiet_close(connection: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.close()


def _describe(exc: BaseException) -> str:
    close = _broker_close(exc)
    if close is not None:  # the broker's reason, not aiormq's "Expected ..., got <Connection...>"
        return f"the broker closed the connection: {close.reply_code} {close.reply_text}"[:300]
    text = str(exc) or type(exc).__name__
    return text[:300]


async def open_tool_link(settings: Settings, name: str) -> tuple[AmqpLink, aiormq.Channel]:
    """A ready `AmqpLink` (no topology) and its channel for a one-off command (`burrow dlq`,
    `burrow tail`): it connects exactly as the service does (URL failover, password file, TLS,
    heartbeat). The caller closes the link.

    Raises:
        ConfigError: the broker refused the login, TLS failed or the password file is unreadable.
        Unavailable: no broker was ready within `connect_timeout` per URL (the last failure said).
    """
    link = AmqpLink(name, settings)
    link.start()
    timeout = settings.connect_timeout * len(settings.amqp_urls()) + 1.0
    try:
        await link.wait_ready(timeout)
    except Unavailable:
        problem = " ".join((link.last_error or "no answer").split())
        for url in settings.amqp_urls():
            secret = urlsplit(url).password
            if secret:
                problem = problem.replace(secret, "***")
        await link.close()
        raise Unavailable(
            f"cannot reach the broker at {', '.join(settings.redacted_urls())} within "
            f"{timeout:.1f}s: {problem}"
        ) from None
    except BaseException:
        await link.close()
        raise
    assert link._raw is not None  # ready: connected, channel open
    return link, link._raw
