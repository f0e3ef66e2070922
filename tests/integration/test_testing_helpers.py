"""`service.testing.serve` and the pytest plugin: one test, on the in-memory broker and on
RabbitMQ, and nothing left behind on the real one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from service import InvalidArgument
from service.example import calc
from service.testing import BACKEND_VARIABLE, URL_VARIABLE, Served, pytest_plugin, serve
from tests.brokers import AMQP_URL, TEST_BROKER

__all__: list[str] = []


def _names(what: str, prefix: str) -> set[str]:
    return set(TEST_BROKER.names(what, prefix))


@pytest.mark.parametrize("backend", ["memory", "rabbitmq"])
async def test_one_test_runs_on_both_backends(backend: str) -> None:
    """The same calls and errors hold in memory and on RabbitMQ; the real backend's namespace
    is its own and is deleted afterwards."""
    async with serve(calc, backend=backend, queue_type="classic") as served:
        client = served.client
        assert await client.call("calc.add", {"a": 2, "b": 3}) == {"sum": 5}
        with pytest.raises(InvalidArgument):
            await client.call("calc.divide", {"a": 1, "b": 0})
        job = await client.submit("calc.add", {"a": 1, "b": 1})
        assert await job.result(timeout=10) == {"sum": 2}
        await served.settle()
        namespace = served.app.settings.namespace
        assert served.in_memory is (backend == "memory")
    if backend == "rabbitmq":
        assert namespace.startswith("burrow-t")
        left = await asyncio.to_thread(_names, "list_queues", namespace + ".")
        left |= await asyncio.to_thread(_names, "list_exchanges", namespace + ".")
        assert left == set()


async def test_the_broker_is_only_there_in_memory() -> None:
    """In memory the broker unpacks and records publishes; on RabbitMQ asking for it says why
    it cannot."""
    async with serve(calc) as (client, broker):
        await client.call("calc.add", {"a": 1, "b": 2})
        assert broker is not None
        assert any(m.routing_key == "calc.add" for m in broker.published)
    async with serve(calc, backend="rabbitmq", queue_type="classic") as served:
        with pytest.raises(RuntimeError, match="memory backend"):
            _ = served.broker


async def test_the_plugin_fixture_follows_the_chosen_backend(
    burrow_backend: str, burrow_serve: Callable[..., AbstractAsyncContextManager[Served]]
) -> None:
    """burrow_serve runs on the run's backend (`--burrow-backend`, default memory)."""
    async with burrow_serve(calc, queue_type="classic") as served:
        assert await served.client.call("calc.add", {"a": 1, "b": 1}) == {"sum": 2}
        assert served.in_memory is (burrow_backend == "memory")


async def test_the_real_backend_runs_on_the_test_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """On RabbitMQ, serve uses BURROW_TEST_AMQP_URL when set, over the BURROW_AMQP_URL the
    services deploy with; an `amqp_url` given to it wins over both."""
    monkeypatch.setenv("BURROW_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    monkeypatch.setenv(URL_VARIABLE, AMQP_URL)
    async with serve(calc, backend="rabbitmq", queue_type="classic") as served:
        assert await served.client.call("calc.add", {"a": 1, "b": 1}) == {"sum": 2}
    monkeypatch.setenv(URL_VARIABLE, "amqp://guest:guest@127.0.0.1:1/")
    async with serve(calc, backend="rabbitmq", queue_type="classic", amqp_url=AMQP_URL) as served:
        assert await served.client.call("calc.add", {"a": 1, "b": 1}) == {"sum": 2}


async def test_the_unpacked_broker_on_rabbitmq_refuses_with_why() -> None:
    """On RabbitMQ `async with serve(...) as (client, broker)` still unpacks, and any use of
    `broker` raises a RuntimeError naming the backend and what to write instead (not an
    AttributeError on None)."""
    async with serve(calc, backend="rabbitmq", queue_type="classic") as (client, broker):
        assert await client.call("calc.add", {"a": 1, "b": 1}) == {"sum": 2}
        assert not broker
        with pytest.raises(RuntimeError, match="BURROW_TEST_BACKEND=rabbitmq") as refused:
            await broker.drain()
        assert "served.settle()" in str(refused.value)
        assert 'backend="memory"' in str(refused.value)
        with pytest.raises(RuntimeError, match=r"broker\.published"):
            _ = broker.published


class _Options:
    """A pytest config that answers `getoption` from a dict."""

    def __init__(self, **options: str | None) -> None:
        self.options = options

    def getoption(self, name: str, default: object = None) -> object:
        return self.options.get(name.lstrip("-").replace("-", "_"), default)


async def test_the_plugin_options_make_plain_serve_follow_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--burrow-backend rabbitmq --burrow-amqp-url URL` switch `serve()` itself (not only the
    `burrow_serve` fixture) for the run, and the variables are put back afterwards."""
    monkeypatch.delenv(BACKEND_VARIABLE, raising=False)
    monkeypatch.setenv(URL_VARIABLE, "amqp://guest:guest@127.0.0.1:1/")
    config = _Options(burrow_backend="rabbitmq", burrow_amqp_url=AMQP_URL)
    pytest_plugin.pytest_configure(config)  # type: ignore[arg-type]
    try:
        assert os.environ[BACKEND_VARIABLE] == "rabbitmq"
        async with serve(calc, queue_type="classic") as served:
            assert not served.in_memory
            assert await served.client.call("calc.add", {"a": 1, "b": 1}) == {"sum": 2}
    finally:
        pytest_plugin.pytest_unconfigure(config)  # type: ignore[arg-type]
    assert BACKEND_VARIABLE not in os.environ
    assert os.environ[URL_VARIABLE] == "amqp://guest:guest@127.0.0.1:1/"
    async with serve(calc) as served:
        assert served.in_memory
