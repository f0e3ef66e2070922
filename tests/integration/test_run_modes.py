"""Ways of running: several worker processes, least-privilege passive topology, secret files."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
from pydantic import SecretStr

from service import App, Client, ConfigError, Settings, TopologyError
from service.example import calc
from tests.brokers import TEST_BROKER
from tests.conftest import AMQP_URL, AppFactory


async def test_workers_share_the_queue_and_stop_on_sigterm(settings: Settings) -> None:
    """`burrow run --workers 2` starts two consumers on one queue; SIGTERM exits 0."""
    env = {
        **os.environ,
        "BURROW_NAMESPACE": settings.namespace,
        "BURROW_AMQP_URL": AMQP_URL,
        "BURROW_HTTP_PORT": "0",
        "BURROW_LOG_LEVEL": "warning",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "run", "--workers", "2", env=env
    )
    try:
        async with Client(settings) as client:
            for _ in range(100):
                try:
                    if await client.call("calc.add", {"a": 1, "b": 1}, timeout=1) == {"sum": 2}:
                        break
                except Exception:
                    await asyncio.sleep(0.1)
            consumers = await _consumers(f"{settings.namespace}.calc.requests")
            assert consumers == 2
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0


async def _consumers(queue: str) -> int:
    for _ in range(50):
        rows = await asyncio.to_thread(TEST_BROKER.rows, "list_queues", "name", "consumers")
        for name, count in rows:
            if name == queue and int(count) >= 2:
                return int(count)
        await asyncio.sleep(0.2)
    return 0


async def test_passive_topology_uses_what_exists(start_app: AppFactory, settings: Settings) -> None:
    """With BURROW_PASSIVE_TOPOLOGY an app starts on pre-declared entities without declaring."""
    await start_app(calc)
    passive = App(calc, settings=settings.model_copy(update={"passive_topology": True}), http=False)
    await passive.start()
    try:
        await passive.wait_ready(10)
    finally:
        await passive.stop()


async def test_passive_topology_fails_fast_when_nothing_is_provisioned(settings: Settings) -> None:
    """Passive mode in an empty namespace stops with a clear TopologyError, no retry loop."""
    app = App(calc, settings=settings.model_copy(update={"passive_topology": True}), http=False)
    await app.start()
    try:
        with pytest.raises(TopologyError, match="definitions"):
            await app.wait_ready(10)
    finally:
        await app.stop()


def _login(password: str) -> SecretStr:
    """The test broker's URL with its user and `password` in place of its own."""
    parts = urlsplit(AMQP_URL)
    user = quote(unquote(parts.username or "guest"), safe="")
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return SecretStr(urlunsplit(parts._replace(netloc=netloc)))


async def test_password_is_read_from_a_secret_file(settings: Settings, tmp_path: Path) -> None:
    """BURROW_AMQP_PASSWORD_FILE's password is the one used: it logs in where the URL's wrong
    password is refused, and its own wrong password is refused where the URL's would work."""
    right = unquote(urlsplit(AMQP_URL).password or "guest")
    wrong = f"not-{right}"
    secret = tmp_path / "password"
    secret.write_text(f"{right}\n", encoding="utf-8")
    from_file = {"amqp_url": _login(wrong), "amqp_password_file": str(secret)}
    async with Client(settings.model_copy(update=from_file)):
        pass
    refused = Client(settings.model_copy(update={"amqp_url": _login(wrong)}))
    with pytest.raises(ConfigError, match="refused the login"):
        await refused.start(timeout=10)
    await refused.close()
    secret.write_text(f"{wrong}\n", encoding="utf-8")
    overridden = Client(
        settings.model_copy(update={"amqp_url": _login(right), "amqp_password_file": str(secret)})
    )
    with pytest.raises(ConfigError, match="refused the login"):
        await overridden.start(timeout=10)
    await overridden.close()
