"""Running services: links, RPC servers and the HTTP port, with a graceful shutdown.

`App.start` returns at once and connects in the background (readiness tells when it is
done); `App.stop` stops consuming, lets in-flight work finish within the grace period, closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import Any

from service._amqp.link import Link, LinkFactory, Outbound
from service._amqp.transport import AmqpLink, Transport
from service._observe.log import get_logger
from service._outbox.relay import Relay
from service._protocol import tracing
from service._protocol.config import Settings, load_settings
from service._protocol.errors import Unavailable
from service._protocol.registry import Lifespan, Service, State
from service._protocol.topology import Topology, service_topology
from service._protocol.vocabulary import Names
from service._runtime.health import Health
from service._runtime.http import HttpServer
from service._serving.dispatcher import Dispatcher
from service._serving.middleware import Middleware
from service._serving.scheduler import Forwarder
from service._stores.registry import idempotency_store_from_url, job_store_from_url

_log = get_logger("burrow.app")


class App:
    """One process serving one or more services.

    Args:
        http: serve `/metrics`, `/healthz` and `/readyz` on `settings.http_port`.
        link_factory: how AMQP links are made (the in-memory test broker passes its own).
        middleware: inbound layers around every handled message of every service
            (`service.Middleware`), outside each service's and operation's own.
        outbound: layers around every publish the App makes (`service.Outbound`).
        lifespan: opened before the first message, closed after the last in-flight one
            finished; handlers reach what it put in `state` as `ctx.state`.
        links: other links the process depends on (a `Client`'s): `/readyz` includes them.
    """

    def __init__(
        self,
        *services: Service,
        settings: Settings | None = None,
        http: bool = True,
        link_factory: LinkFactory = AmqpLink,
        middleware: Sequence[Middleware] = (),
        outbound: Sequence[Outbound] = (),
        lifespan: Lifespan | None = None,
        links: Sequence[Link] = (),
    ) -> None:
        if not services:
            raise ValueError("App needs at least one Service")
        self.settings = settings or load_settings()
        self.services = services
        topology, declared = Topology(), Topology()
        for svc in services:
            topology = topology.merge(service_topology(svc, self.settings))
            declared = declared.merge(service_topology(svc, self.settings, ladder=False))
        # Everything the services use, the delay ladder included (what a clean-up deletes);
        # the consumer link declares all but the ladder, which the first delayed publish does.
        self.topology = topology
        self.transport = Transport(self.settings, declared, link_factory=link_factory)
        for link in self.transport.links:
            link.use(*outbound)
        self.state = State()
        self._lifespans = [lifespan, *(svc.lifespan for svc in services)]
        self._opened = contextlib.AsyncExitStack()
        self.store = idempotency_store_from_url(self.settings.idempotency_url)
        self.jobs = job_store_from_url(self.settings.job_store_url)
        self.servers = [
            Dispatcher(
                svc,
                self.settings,
                self.transport.publisher,
                store=self.store,
                jobs=self.jobs,
                extra=middleware,
                state=self.state,
            )
            for svc in services
        ]
        self.forwarder = Forwarder(self.settings, self.transport.publisher)
        consumer = self.transport.consumer
        for server in self.servers:
            for spec in server.consumers():
                consumer.add_consumer(spec)
        consumer.add_consumer(self.forwarder.consumer())
        # The outbox relay, when BURROW_OUTBOX_DSN names its database (on a link of its own).
        self.relay = Relay.from_settings(self.settings, link_factory)
        self.health = Health(
            links=[*self.transport.links, *links],
            consumers=self.servers,
            prefetch=self.settings.prefetch,
            checks=[self.relay.problems] if self.relay is not None else [],
        )
        self.http = (
            HttpServer(self.health, self.settings.http_host, self.settings.http_port)
            if http
            else None
        )

    async def start(self) -> None:
        """Open the lifespans (the App's, then each service's), start the HTTP port and begin
        connecting; does not wait for the broker."""
        tracing.refresh()  # an SDK TracerProvider installed by now records spans
        try:
            for lifespan in self._lifespans:
                if lifespan is not None:
                    await self._opened.enter_async_context(lifespan(self.state))
            if self.http is not None:
                await self.http.start()
        except BaseException:
            await self._opened.aclose()  # a busy port (or a failing lifespan) closes what opened
            raise
        self.transport.start()
        if self.relay is not None:
            self.relay.start()
        _log.info(
            "burrow starting",
            services=[svc.name for svc in self.services],
            broker=self.settings.redacted_urls(),
            http_port=self.http.port if self.http else None,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until both links are connected and every consumer is attached."""
        await self.transport.wait_ready(timeout)

    async def stop(self) -> None:
        """Graceful shutdown: stop consuming, finish in-flight work (bounded), then close."""
        _log.info("draining", grace_seconds=self.settings.shutdown_grace)
        self.health.draining = True
        await self.transport.consumer.cancel_consumers()
        busy = [server.idle.wait() for server in self.servers if not server.idle.is_set()]
        drained = True
        if busy:
            try:
                async with asyncio.timeout(self.settings.shutdown_grace):
                    await asyncio.gather(*busy)
            except TimeoutError:
                # Unacked deliveries go back to the queue when the channel closes.
                _log.warning("grace period over; unfinished work returns to the queue")
                drained = False
        if drained:
            await self._release_request_queues()
        if self.relay is not None:
            await self.relay.stop()  # rows it had not confirmed stay for the next relay
        await self.transport.close()
        await self._opened.aclose()  # the lifespans, last opened first: nothing runs any more
        await self.store.close()
        await self.jobs.close()
        if self.http is not None:
            await self.http.close()
        _log.info("burrow stopped")

    async def _release_request_queues(self) -> None:
        """The last instance out deletes each service's request queue (only while no consumer
        is attached and no call waits in it), so that a call made while no instance runs is
        `Unroutable` at once instead of waiting out its deadline; the next start declares it
        again. Casts and submits keep queueing: the commands queue stays. Not with
        `passive_topology` (the operator owns the queues), and not after the grace period ran
        out (the calls still unacked would go with the queue)."""
        if self.settings.passive_topology:
            return
        names = Names(self.settings.namespace)
        for svc in self.services:
            queue = names.request_queue(svc.name)
            if await self.transport.consumer.delete_queue(queue, if_unused=True, if_empty=True):
                _log.info("request queue deleted: calls are unroutable until a start", queue=queue)

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Serve until SIGTERM/SIGINT or `stop` is set (exit 0), or until a fatal broker error
        or `BURROW_STARTUP_TIMEOUT` passing before the first ready (exit 1).

        Spans are exported as the `OTEL_*` variables say (`tracing.configure_from_env`), and
        flushed before it returns."""
        provider = tracing.configure_from_env(",".join(svc.name for svc in self.services))
        try:
            return await self._run(stop)
        finally:
            if provider is not None:
                provider.shutdown()

    async def _run(self, stop: asyncio.Event | None) -> int:
        await self.start()
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
                signals.append(sig)
        fatal = asyncio.ensure_future(self._watch_fatal())
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({fatal, waiter}, return_when="FIRST_COMPLETED")
            code = 0
            if fatal.done() and not fatal.cancelled():
                _log.error("fatal broker error; exiting", error=fatal.result())
                code = 1
            fatal.cancel()
            waiter.cancel()
            await self.stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        return code

    async def _watch_fatal(self) -> str:
        """The first fatal link error, or the startup timeout running out before ready."""
        links = self.transport.links
        pending: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(link.failed.wait()) for link in links
        }
        limit = self.settings.startup_timeout
        startup = None
        if limit is not None:
            startup = asyncio.ensure_future(self.transport.wait_ready(limit))
            pending.add(startup)
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                for link in links:
                    if link.fatal is not None:
                        return str(link.fatal)
                if startup in done and isinstance(startup.exception(), Unavailable):
                    problems = "; ".join(
                        f"{link.name}: {link.last_error or 'consumers not attached'}"
                        for link in links
                        if not link.ready.is_set()
                    )
                    return f"not ready within BURROW_STARTUP_TIMEOUT={limit:g}s ({problems})"
                # Otherwise ready in time: only the start is bounded; keep watching for fatal.
        finally:
            for future in pending:
                future.cancel()
