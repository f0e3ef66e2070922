"""H4: numbers JSON cannot carry are refused; integers beyond 64 bits stay exact both ways.

On the real broker, with the example `calc` service: raw request bodies holding `NaN`,
`Infinity`, `-Infinity` or `1e400` are answered `INVALID_ARGUMENT` (a cast holding one is
dead-lettered `malformed`); a reply holding infinity is `INTERNAL`, never `null`; `2**70`
travels exactly through `Client.call` and through `burrow call`.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys

import aio_pika
import pytest
from pydantic import BaseModel

from service import Client, InvalidArgument, Model, Service
from service._protocol.codec import decode_json
from service._protocol.errors import Internal
from service._protocol.vocabulary import H_DEAD_ERROR, H_DEAD_REASON, H_KIND, Names
from service.example import AddReply, calc
from tests.conftest import AMQP_URL, AppFactory
from tests.integration.test_async_support import next_dead_letter

__all__: list[str] = []

BIG = 2**70  # 1180591620717411303424: a double would read it as 1.1805916207174113e21

NON_FINITE = [
    pytest.param(b'{"a": NaN, "b": 1}', id="nan"),
    pytest.param(b'{"a": Infinity, "b": 1}', id="infinity"),
    pytest.param(b'{"a": -Infinity, "b": 1}', id="minus-infinity"),
    pytest.param(b'{"a": 1e400, "b": 1}', id="1e400"),
]


async def _assert_still_serving(client: Client) -> None:
    assert await client.call("calc.divide", {"a": 1, "b": 4}) == {"quotient": 0.25}


@pytest.mark.parametrize("body", NON_FINITE)
async def test_h4_nan_is_invalid_argument(
    start_app: AppFactory, client: Client, body: bytes
) -> None:
    """NaN, ±Infinity and 1e400 in a call's body are INVALID_ARGUMENT (malformed JSON), not a
    `{"quotient": null}` reply; the service answers a normal call right after."""
    await start_app(calc)
    with pytest.raises(InvalidArgument) as info:
        await client.rpc.call_raw("calc.divide", body, timeout=5)
    assert info.value.details == {"reason": "json"}
    assert info.value.message.startswith("malformed JSON")
    await _assert_still_serving(client)


@pytest.mark.parametrize("body", NON_FINITE)
async def test_h4_nan_in_integer_field_is_invalid_argument(
    start_app: AppFactory, client: Client, body: bytes
) -> None:
    """The same numbers sent to an int field (calc.add) are INVALID_ARGUMENT as well."""
    await start_app(calc)
    with pytest.raises(InvalidArgument) as info:
        await client.rpc.call_raw("calc.add", body, timeout=5)
    assert info.value.details == {"reason": "json"}


async def test_h4_nan_cast_dead_lettered_malformed(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A cast (no caller) holding NaN is parked with reason `malformed`, body kept as sent."""
    await start_app(calc)
    names = Names(namespace)
    exchange = await amqp_channel.get_exchange(names.commands_exchange, ensure=False)
    body = b'{"a": NaN, "b": 2}'
    await exchange.publish(
        aio_pika.Message(
            body, content_type="application/json", type="calc.divide", headers={H_KIND: "cast"}
        ),
        routing_key="calc.divide",
    )
    dead = await next_dead_letter(amqp_channel, names.dead_letter_queue("calc"))
    headers = dead.headers or {}
    assert headers.get(H_DEAD_REASON) == "malformed"
    raw_error = headers.get(H_DEAD_ERROR)
    assert isinstance(raw_error, str | bytes)
    error = decode_json(raw_error if isinstance(raw_error, bytes) else raw_error.encode())
    assert error["code"] == "INVALID_ARGUMENT"
    assert dead.body == body
    await _assert_still_serving(client)


class Measure(BaseModel):
    """A plain pydantic reply (not service.Model): pydantic alone would write inf as null."""

    value: float


class Sized(Model):
    """A service.Model reply."""

    value: float


def _overflowing() -> Service:
    svc = Service("overflow")

    async def divide(req: Sized) -> Sized:
        """Reply with a quotient that overflows to infinity (checked by no one)."""
        return Sized(value=req.value / 1e-10)

    async def plain(req: Sized) -> Measure:
        """Reply with infinity in a plain pydantic model."""
        return Measure(value=req.value * math.inf)

    async def constructed(req: Sized) -> Sized:
        """Reply with infinity smuggled past validation (model_construct)."""
        return Sized.model_construct(value=req.value * math.inf)

    svc.add_operation(divide)
    svc.add_operation(plain)
    svc.add_operation(constructed)
    return svc


async def test_h4_reply_with_infinity_is_internal(start_app: AppFactory, client: Client) -> None:
    """A reply that would hold inf (overflowing division, plain model, model_construct) is
    answered INTERNAL, never as a reply whose number is null."""
    await start_app(calc, _overflowing())
    with pytest.raises(Internal):
        await client.call("overflow.divide", {"value": 1e308})
    for route in ("overflow.plain", "overflow.constructed"):
        with pytest.raises(Internal):
            await client.call(route, {"value": 1.0})
    with pytest.raises(InvalidArgument):  # the example checks its quotient: the caller's input
        await client.call("calc.divide", {"a": 1e308, "b": 1e-10})
    await _assert_still_serving(client)


async def test_h4_big_int_exact_through_client_call(start_app: AppFactory, client: Client) -> None:
    """2**70 + 1 comes back exact from Client.call: untyped (dict) and typed (reply model)."""
    await start_app(calc)
    assert await client.call("calc.add", {"a": BIG, "b": 1}) == {"sum": BIG + 1}
    typed = await client.call("calc.add", {"a": BIG, "b": 1}, reply=AddReply)
    assert typed.sum == BIG + 1
    negative = await client.call("calc.add", {"a": -BIG, "b": -(2**64)})
    assert negative == {"sum": -BIG - 2**64}


async def test_h4_big_int_exact_through_burrow_call(start_app: AppFactory, namespace: str) -> None:
    """`burrow call calc.add '{"a": 2**70, "b": 1}'` prints the exact sum (both ways)."""
    await start_app(calc)
    env = {
        **os.environ,
        "BURROW_AMQP_URL": AMQP_URL,
        "BURROW_NAMESPACE": namespace,
        "BURROW_HTTP_PORT": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "call",
        "calc.add",
        f'{{"a": {BIG}, "b": 1}}',
        "--timeout",
        "10",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == f'{{"sum":{BIG + 1}}}'
