"""`burrow run`'s relay: an App whose settings name the outbox database publishes committed
rows, reports the relay in its readiness, and stops it with itself (real PostgreSQL, RabbitMQ)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from service import Context, Model, Outbox, Service, Settings
from service._outbox import db, schema
from tests.brokers import AMQP_URL
from tests.conftest import RUN_PREFIX, AppFactory
from tests.integration.test_outbox import PG_URL, eventually

__all__: list[str] = []

_schemas = itertools.count()


class Placed(Model):
    """An order was placed."""

    order: str


@pytest.fixture
async def outbox_schema() -> AsyncIterator[str]:
    """A fresh outbox schema (made as `burrow outbox init` makes it), dropped afterwards."""
    name = f"{RUN_PREFIX}_app{next(_schemas)}"
    await schema.init(PG_URL, name)
    yield name
    conn = await db.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def test_an_app_with_an_outbox_database_relays_committed_rows(
    start_app: AppFactory, settings: Settings, outbox_schema: str
) -> None:
    """With BURROW_OUTBOX_DSN set, the App runs the relay: a committed event reaches a
    subscriber, a rolled-back one never does, and /readyz has no relay problem."""
    seen: list[str] = []
    shop = Service("shop")

    @shop.subscribe("orders.placed", group="audit")
    async def audit(event: Placed, ctx: Context) -> None:
        """Record the order."""
        seen.append(event.order)

    app = await start_app(
        shop,
        outbox_dsn=SecretStr(PG_URL),
        outbox_schema=outbox_schema,
        outbox_poll_interval=0.2,
    )
    assert app.relay is not None
    await eventually(lambda: not app.health.problems())
    outbox = Outbox(app.settings, schema=outbox_schema)
    conn: Any = await db.connect(PG_URL, timeout=5)
    try:
        async with conn.transaction():
            await outbox.emit(conn, "orders.placed", Placed(order="kept"), key="o1")
        transaction = conn.transaction()
        await transaction.start()
        await outbox.emit(conn, "orders.placed", Placed(order="gone"), key="o2")
        await transaction.rollback()
    finally:
        await conn.close()
    await eventually(lambda: seen == ["kept"])


async def test_an_app_without_an_outbox_database_runs_no_relay(
    start_app: AppFactory,
) -> None:
    """Without BURROW_OUTBOX_DSN there is no relay and nothing about it in readiness."""
    app = await start_app(Service("plain"))
    assert app.relay is None
    assert not [problem for problem in app.health.problems() if "outbox" in problem]


async def test_readiness_says_why_the_relay_cannot_work(
    start_app: AppFactory, settings: Settings
) -> None:
    """A relay whose database does not answer makes /readyz say so (the App keeps serving)."""
    app = await start_app(
        Service("lonely"),
        outbox_dsn=SecretStr("postgresql://postgres@127.0.0.1:1/none"),
        outbox_poll_interval=0.2,
    )
    await eventually(lambda: any("outbox relay" in p for p in app.health.problems()))
    assert [p for p in app.health.problems() if not p.startswith("outbox relay")] == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def test_the_standalone_relay_publishes_serves_its_probes_and_stops_on_sigterm(
    start_app: AppFactory, settings: Settings, outbox_schema: str
) -> None:
    """`burrow outbox relay` publishes committed rows, answers /readyz 200 and /metrics with
    the outbox gauges on BURROW_HTTP_PORT, and exits 0 on SIGTERM."""
    seen: list[str] = []
    shop = Service("shop")

    @shop.subscribe("orders.placed", group="audit")
    async def audit(event: Placed, ctx: Context) -> None:
        """Record the order."""
        seen.append(event.order)

    await start_app(shop)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    env |= {
        "BURROW_AMQP_URL": AMQP_URL,
        "BURROW_NAMESPACE": settings.namespace,
        "BURROW_OUTBOX_DSN": PG_URL,
        "BURROW_OUTBOX_SCHEMA": outbox_schema,
        "BURROW_OUTBOX_POLL_INTERVAL": "0.2",
        "BURROW_HTTP_HOST": "127.0.0.1",
        "BURROW_HTTP_PORT": str(port),
    }
    relay = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "burrow"),
        "outbox",
        "relay",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def ready() -> bool:
            try:
                return (await _get(f"http://127.0.0.1:{port}/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout=30)
        conn: Any = await db.connect(PG_URL, timeout=5)
        try:
            async with conn.transaction():
                await Outbox(settings, schema=outbox_schema).emit(
                    conn, "orders.placed", Placed(order="o-7"), key="o-7"
                )
        finally:
            await conn.close()
        await eventually(lambda: seen == ["o-7"], timeout=30)
        status, text = await _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "burrow_outbox_lag_seconds" in text
    finally:
        if relay.returncode is None:
            relay.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, stderr = await relay.communicate()
    assert relay.returncode == 0, stderr.decode()[-2000:]
