"""H3 of RELIABILITY.md: headers that decode to bytes survive every copy of a message.

A long string that is not UTF-8 decodes to `bytes`, a byte array to `bytearray`; the encoder
refuses `bytes`. Every path that copies a received message — park (service and scheduler
DLQ), retry (through the holding queues), forward (the delay ladder), replay
(`DeadLetterTool.replay`) — must send them as byte arrays holding the same bytes, nested ones
included, and keep `content_encoding` and the other properties; and handle each copy once
(no requeue loop).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import aio_pika

from service._protocol.vocabulary import H_DUE, H_KIND, LEVELS, delay_route
from service._serving.dead_letters import DeadLetterTool
from tests.conftest import AMQP_URL
from tests.faults.harness import eventually, wait_until
from tests.hostile.conftest import EVENT, Hostile, MakeHostile, Sent
from tests.hostile.rawamqp import A, F, S, l, x

__all__: list[str] = []

RAW = b"\xff\xfe\x00\x80 not utf-8"
BYTE_HEADERS: dict[str | bytes, Any] = {
    "x-bin": S(RAW),  # decodes to bytes
    "x-bin-array": x(RAW),  # decodes to bytearray
    "x-bin-nested": F({"inner": S(RAW), "list": A([S(RAW), x(RAW)])}),
}
COPIED = {
    "x-bin": bytearray(RAW),
    "x-bin-array": bytearray(RAW),
    "x-bin-nested": {"inner": bytearray(RAW), "list": [bytearray(RAW), bytearray(RAW)]},
}
STAMP = 1_700_000_000
PROPS: dict[str, Any] = {
    "content_type": "application/json",
    "correlation_id": "h3-correlation",
    "type": "calc.probe",
    "app_id": "h3-app",
    "priority": 3,
    "timestamp": STAMP,
}
_WAIT = 20.0


def _properties(source: Any) -> dict[str, Any]:
    """The properties of a Delivery or an aio-pika message, by one set of names."""
    return {
        "content_type": source.content_type,
        "content_encoding": source.content_encoding,
        "correlation_id": source.correlation_id,
        "type": source.type,
        "app_id": source.app_id,
        "priority": getattr(source, "priority", None),
        "timestamp": source.timestamp,
    }


def copy_problems(
    what: str, source: Any, *, encoding: str, message_id: str, type_: str = "calc.probe"
) -> list[str]:
    """What a copy lost or changed: byte headers (must be byte arrays with the same bytes,
    nested too), content_encoding, message_id and the other properties."""
    problems: list[str] = []
    headers = dict(source.headers or {})
    for name, want in COPIED.items():
        got = headers.get(name, "(missing)")
        if not _same(got, want):
            problems.append(f"{what}: header {name} is {got!r}, want {want!r}")
    want_props = {
        **{key: value for key, value in PROPS.items() if key != "timestamp"},
        "content_encoding": encoding,
        "type": type_,
        "timestamp": datetime.datetime.fromtimestamp(STAMP, datetime.UTC),
    }
    got_props = _properties(source)
    for key, want in want_props.items():
        if got_props[key] != want:
            problems.append(f"{what}: {key} is {got_props[key]!r}, want {want!r}")
    if source.message_id != message_id:
        problems.append(f"{what}: message_id is {source.message_id!r}, want {message_id!r}")
    return problems


def _same(left: Any, right: Any) -> bool:
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(_same, left, right))
    return bool(left == right)


def _message_id(sent: Sent, env: Hostile) -> str:
    [first, *_] = env.tracker.of(sent.token)
    return str(first.delivery.message_id)


async def _finish(env: Hostile, problems: list[str]) -> None:
    try:
        await env.assert_sound()
    except AssertionError as exc:
        problems.append(f"oracle: {exc}")
    assert not problems, "\n".join(problems)


async def test_h3_park_keeps_byte_headers_and_properties(hostile: MakeHostile) -> None:
    """H3: a parked copy (cast, event, scheduler) keeps byte headers as byte arrays with the
    same bytes, content_encoding and the other properties; parked once, handled never."""
    env = await hostile()
    # gzip: refused (unsupported_content) before parsing, so the message is parked as sent.
    gzip = {**PROPS, "content_encoding": "gzip"}
    sent = [
        await env.send("cast", BYTE_HEADERS, **gzip),
        await env.send("event", BYTE_HEADERS, **gzip),
        await env.send("forward", BYTE_HEADERS, target=(S("amq.topic"), S("calc.probe")), **gzip),
    ]
    await env.settle(sent)
    expected = ["parked:unsupported_content", "parked:unsupported_content", "sched:invalid_target"]
    problems: list[str] = []
    for one, want in zip(sent, expected, strict=True):
        got = env.outcome(one)
        if got != {want}:
            problems.append(f"{one.path}: outcome {sorted(got)}, want [{want!r}]")
            continue
        [letter] = env.parked[one.token]
        problems += copy_problems(
            f"{one.path} parked", letter.message, encoding="gzip", message_id=_message_id(one, env)
        )
        if len(env.tracker.of(one.token)) != 1:
            problems.append(f"{one.path}: delivered {len(env.tracker.of(one.token))} times")
    await _finish(env, problems)


async def test_h3_retry_keeps_byte_headers_and_properties(hostile: MakeHostile) -> None:
    """H3: each retry of a failing cast keeps byte headers as byte arrays, content_encoding and
    the other properties; it runs exactly 1 + retries times, then is parked once."""
    env = await hostile(retry_base_delay=0.05)
    one = await env.send(
        "cast", BYTE_HEADERS, route=(env.names.commands_exchange, "calc.flaky"),
        **{**PROPS, "type": "calc.flaky", "content_encoding": "utf-8"},
    )  # fmt: skip
    await wait_until(lambda: one.token in env.parked, _WAIT, "the cast parked after its retries")
    await env.barrier()
    problems: list[str] = []
    runs = env.log.runs(one.token)
    deliveries = env.tracker.of(one.token)
    if len(runs) != 3 or len(deliveries) != 3:
        problems.append(f"ran {len(runs)} times in {len(deliveries)} deliveries: want 3 (1 + 2)")
    message_id = str(deliveries[0].delivery.message_id)
    kept = {"encoding": "utf-8", "message_id": message_id, "type_": "calc.flaky"}
    for n, record in enumerate(deliveries[1:], start=1):
        problems += copy_problems(f"retry {n}", record.delivery, **kept)
    [letter] = env.parked[one.token]
    if letter.reason != "retries_exhausted":
        problems.append(f"parked as {letter.reason!r}, want 'retries_exhausted'")
    problems += copy_problems("parked", letter.message, **kept)
    await _finish(env, problems)


async def test_h3_forward_keeps_byte_headers_and_properties(hostile: MakeHostile) -> None:
    """H3: a delayed cast and event, through the ladder's holding queues and the forwarder,
    arrive with byte headers as byte arrays, content_encoding and the other properties, without
    the forwarder's headers or x-death; each handled once."""
    env = await hostile()
    units = 3  # 300 ms: waits in the level-0 and level-1 holding queues
    due = l(int(time.time() * 1000) + units * 100)
    route = (env.names.delay_exchange(LEVELS - 1), delay_route(units))
    props = {**PROPS, "content_encoding": "utf-8"}
    sent = [
        await env.send("forward", {**BYTE_HEADERS, H_DUE: due}, route=route, **props),
        await env.send(
            "forward",
            {**BYTE_HEADERS, H_DUE: due},
            route=route,
            target=(S(env.names.events_exchange), S(EVENT)),
            **props,
        ),
    ]
    await env.settle(sent)
    problems: list[str] = []
    for one, queue in zip(
        sent,
        [env.names.commands_queue("calc"), env.names.subscription_queue("calc", "on_probe")],
        strict=True,
    ):
        got = env.outcome(one)
        if got != {"ran"}:
            problems.append(f"{queue}: outcome {sorted(got)}, want ['ran']")
            continue
        records = env.tracker.of(one.token)
        arrived = [record for record in records if record.queue == queue]
        if len(records) != 2 or len(arrived) != 1:
            problems.append(f"{queue}: {len(records)} deliveries, {len(arrived)} at the target")
            continue
        delivery = arrived[0].delivery
        problems += copy_problems(
            f"{queue} forwarded", delivery, encoding="utf-8", message_id=_message_id(one, env)
        )
        leftover = sorted(
            name for name in delivery.headers if name.startswith(("x-burrow-target", "x-death"))
        )
        if leftover or H_DUE in delivery.headers:
            problems.append(f"{queue}: forwarder headers kept: {leftover}")
        if delivery.headers.get(H_KIND) not in ("cast", None):
            problems.append(f"{queue}: kind {delivery.headers.get(H_KIND)!r}")
    await _finish(env, problems)


async def _dlq_depth(name: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def test_h3_replay_keeps_byte_headers_and_properties(hostile: MakeHostile) -> None:
    """H3: a replayed letter arrives with byte headers as byte arrays, content_encoding and the
    other properties, without the dead-letter headers; handled once per copy (parked again)."""
    env = await hostile(service_dlq=False)  # the letter must stay in the DLQ for the replay
    dlq = env.names.dead_letter_queue("calc")
    one = await env.send(
        "cast", BYTE_HEADERS, route=(env.names.commands_exchange, "calc.refuse"),
        **{**PROPS, "type": "calc.refuse", "content_encoding": "utf-8"},
    )  # fmt: skip

    async def parked(count: int) -> bool:
        return await _dlq_depth(dlq) == count

    await eventually(lambda: parked(1), _WAIT, "the failed cast in the DLQ")
    report = await DeadLetterTool(env.settings, "calc").replay(None)
    assert report.replayed == 1, report
    await wait_until(
        lambda: len(env.tracker.of(one.token)) == 2 and not env.tracker.busy(),
        _WAIT,
        "the replayed copy handled",
    )
    await eventually(lambda: parked(1), _WAIT, "the replayed copy parked again")
    await env.barrier()
    problems: list[str] = []
    first, second = env.tracker.of(one.token)
    if len(env.log.runs(one.token)) != 2:
        problems.append(f"ran {len(env.log.runs(one.token))} times: want 2 (once per copy)")
    problems += copy_problems(
        "replayed",
        second.delivery,
        encoding="utf-8",
        message_id=str(first.delivery.message_id),
        type_="calc.refuse",
    )
    dead = sorted(name for name in second.delivery.headers if name.startswith("x-burrow-dead"))
    if dead or "x-death" in second.delivery.headers:
        problems.append(f"replayed copy kept dead-letter headers: {dead}")
    await _finish(env, problems)
