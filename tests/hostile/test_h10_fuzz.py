"""H10 of RELIABILITY.md: a property-based fuzzer on the real broker.

Hypothesis draws every property (short strings of any bytes, delivery mode, priority, raw
timestamps…) and every header — Burrow's own (`x-burrow-kind`, `x-deadline`,
`x-contract-version`, `x-job-id`, `x-callback-route`, `traceparent`, `x-burrow-attempt`, the
forwarder's target headers) and foreign ones (any name, also non-UTF-8; never the broker's own
death headers, see `OTHER_NAMES`) — from all AMQP field types, nested and 2000 deep, of calls,
casts, submits, events and delayed messages. Each is published byte-exact through `rawamqp` to
a running App and the oracle is checked after every example: the message is accounted for (its
deliveries settled by the consumer callbacks, none requeued or redelivered), it ended in
exactly one allowed way (a reply or completion with a stable code, the handler run, or a DLQ
with a Burrow reason; silence only for a passed deadline or a reply address nobody listens
on; refused by the broker itself), no reconnect, the service ready. Some go to `calc.flaky`,
which always fails retryably: whatever `x-burrow-attempt` says, its handler runs at most
1 + retries times and a retried message ends parked `retries_exhausted` (a forged count never
makes a message loop or vanish). At the end: calc.add answered, nothing left unacked, no body
and no password in any log line.

Hypothesis cannot run async tests, so the App runs on an event loop in a background thread
and the sync test drives it with `asyncio.run_coroutine_threadsafe`. Examples are generated
from a fixed seed (`derandomize`) and not shrunk (each one costs a broker round trip); every
example runs, and one example per kind of failure is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import math
import pprint
import re
import secrets
import threading
import time
from collections.abc import Coroutine, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service import Settings
from service._amqp import shim
from service._observe.metrics import DEAD_LETTER_REASONS
from service._protocol.jobs import valid_job_id
from service._protocol.tracing import HEADER as TRACEPARENT
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_ATTEMPT,
    H_CALLBACK,
    H_DEADLINE,
    H_JOB_ID,
    H_KIND,
    H_TARGET_EXCHANGE,
    H_TARGET_KEY,
    H_VERSION,
    LEVELS,
    Names,
    delay_route,
)
from tests.faults.harness import wait_until
from tests.hostile.conftest import (
    EVENT,
    Hostile,
    Sent,
    new_token,
    probe_body,
    start_hostile,
    stop_hostile,
)
from tests.hostile.rawamqp import (
    A,
    B,
    D,
    F,
    Field,
    I,
    Props,
    S,
    T,
    V,
    b,
    d,
    f,
    i,
    l,
    nested_array,
    nested_table,
    s,
    t,
    u,
    x,
)

__all__: list[str] = []

EXAMPLES = 200
FLAKY = "calc.flaky"  # the probe's operation that always fails retryably
_R = TypeVar("_R")

# -- strategies --------------------------------------------------------------------------------

short_str = st.one_of(st.text(max_size=16), st.binary(max_size=16))  # any bytes, ≤ 255

leaf_fields: st.SearchStrategy[Field] = st.one_of(
    st.text(max_size=16).map(S),
    st.binary(max_size=16).map(S),  # mostly not UTF-8: decodes to bytes
    st.binary(max_size=16).map(x),
    st.booleans().map(t),
    st.integers(-(2**7), 2**7 - 1).map(b),
    st.integers(0, 2**8 - 1).map(B),
    st.integers(-(2**15), 2**15 - 1).map(s),
    st.integers(0, 2**16 - 1).map(u),
    st.integers(-(2**31), 2**31 - 1).map(I),
    st.integers(0, 2**32 - 1).map(i),
    st.integers(-(2**63), 2**63 - 1).map(l),
    st.floats(width=32).map(f),  # NaN and ±inf included: the broker refuses those
    st.floats().map(d),
    st.builds(D, st.integers(0, 12), st.integers(0, 2**32 - 1)),
    st.integers(0, 2**64 - 1).map(T),
    st.just(V()),
)
fields: st.SearchStrategy[Field] = st.recursive(
    leaf_fields,
    lambda inner: st.one_of(
        st.dictionaries(st.text(max_size=6), inner, max_size=3).map(F),
        st.lists(inner, max_size=3).map(A),
    ),
    max_leaves=6,
)
deep_fields: st.SearchStrategy[Field] = st.builds(
    lambda depth, table: nested_table(depth) if table else nested_array(depth),
    st.sampled_from([31, 32, 33, 40, 2000]),
    st.booleans(),
)
any_field = st.one_of(fields, fields, deep_fields)


def _now_ms() -> int:
    return int(time.time() * 1000)


def header_value(good: st.SearchStrategy[Field]) -> st.SearchStrategy[Field | None]:
    """Absent, a value the protocol means, or a value of any type."""
    return st.one_of(st.none(), good, any_field)


# x-burrow-attempt, retries made so far: small counts around calc.flaky's retries, the same as
# text, as an integral float or decimal, and forged huge or negative ones (other types:
# any_field).
ATTEMPTS: st.SearchStrategy[Field] = st.one_of(
    st.integers(-2, 4).map(l),
    st.sampled_from(
        [
            *(S("1"), x(b"0"), d(1.0), D(2, 100)),
            *(b(-1), l(2**63 - 1), i(2**32 - 1), d(1e300), S("9" * 32), S(str(10**100))),
        ]
    ),
)


BURROW_HEADERS: dict[str, st.SearchStrategy[Field | None]] = {
    H_KIND: header_value(st.sampled_from([S("call"), S("cast"), S("submit"), x(b"cast")])),
    H_DEADLINE: header_value(
        st.sampled_from([30_000, -1_000]).map(lambda offset: l(_now_ms() + offset))
    ),
    H_VERSION: header_value(st.sampled_from([S("1"), S("2"), l(1)])),
    H_JOB_ID: header_value(st.from_regex(r"\Aj[a-z0-9]{10}\Z").map(S)),
    H_CALLBACK: header_value(st.from_regex(r"\Ahcb\.[a-z0-9]{8}\Z").map(S)),
    TRACEPARENT: header_value(st.just(S(f"00-{'a1' * 16}-{'b2' * 8}-01"))),
    H_ATTEMPT: header_value(ATTEMPTS),
}
_BROKER_OWNED = frozenset(
    {"x-death", b"x-death", "x-delivery-count", b"x-delivery-count"}
    | {f"x-{w}-death-{what}" for w in ("first", "last") for what in ("queue", "reason", "exchange")}
)
OTHER_NAMES = st.one_of(
    st.text(min_size=1, max_size=12),
    st.binary(min_size=1, max_size=12),  # often not UTF-8: an undecodable header name
    st.sampled_from(["x-burrow-dead-reason", "x-burrow-original-exchange", H_TARGET_EXCHANGE]),
).filter(lambda name: name not in _BROKER_OWNED)
# Never a forged `x-death` (nor the broker's other death headers): when the broker
# dead-letters such a message (a holding queue, a rejected delivery) RabbitMQ 3.10 crashes in
# rabbit_dead_letter:update_x_death_header; from a quorum at-least-once holding queue that
# takes down rabbit_fifo_dlx_sup for the whole node (seen here). C8 (tests/faults) covers a
# well-formed forged x-death on a private node.

PATHS = ("call", "cast", "submit", "event", "forward")


@dataclass(frozen=True)
class Drawn:
    """One message as drawn (shown as is when an example fails)."""

    path: str
    props: dict[str, Any]
    burrow: dict[str, Field | None]
    other: dict[str | bytes, Field]
    body: str  # probe | malformed | schema | binary
    junk: bytes
    target: tuple[Field, Field] | str | None  # forward: raw headers, or a known target name
    units: int  # forward: delay in 100 ms units


@st.composite
def drawn_messages(draw: st.DrawFn) -> Drawn:
    """A message of any path with any properties and headers."""
    path = draw(st.sampled_from(PATHS))
    reply_to = st.one_of(
        st.just(DIRECT_REPLY_TO), st.none(), short_str, st.just(DIRECT_REPLY_TO + ".forged")
    )
    props: dict[str, Any] = {
        "content_type": draw(st.one_of(st.just("application/json"), st.none(), short_str)),
        "content_encoding": draw(
            st.one_of(st.none(), st.sampled_from(["", "identity", "utf-8", "gzip"]), short_str)
        ),
        "message_id": draw(st.one_of(st.from_regex(r"\Am[0-9a-f]{12}\Z"), st.none(), short_str)),
        "correlation_id": draw(
            st.one_of(st.from_regex(r"\Ac[0-9a-f]{12}\Z"), st.none(), short_str)
        ),
        "reply_to": draw(reply_to if path == "call" else st.one_of(st.none(), reply_to)),
        "type": draw(
            st.one_of(st.none(), st.sampled_from(["calc.probe", FLAKY, "calc.nothing"]), short_str)
        ),
        # A number is a TTL the broker applies (a short one drops the message before Burrow
        # sees it, the broker's doing); anything else the broker refuses (406). Text only (as
        # user_id): the broker's 406 quotes the value, and rawamqp's reader dies on a reply
        # text that is not UTF-8 (its publish then waits for a confirm until it times out);
        # Burrow never sees such a message either way.
        "expiration": draw(
            st.one_of(
                st.none(),
                st.none(),
                st.just("60000"),
                st.text(max_size=8).filter(lambda text: not text.strip().isdigit()),
            )
        ),
        "app_id": draw(st.one_of(st.none(), short_str)),
        "cluster_id": draw(st.one_of(st.none(), short_str)),
        "user_id": draw(st.one_of(st.none(), st.none(), st.just("guest"), st.text(max_size=16))),
        "delivery_mode": draw(st.one_of(st.none(), st.sampled_from([1, 2]), st.integers(0, 255))),
        "priority": draw(st.one_of(st.none(), st.integers(0, 255))),
        "timestamp": draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
    }
    burrow = {name: draw(value) for name, value in BURROW_HEADERS.items()}
    other = draw(st.dictionaries(OTHER_NAMES, any_field, max_size=3))
    units = draw(st.sampled_from([0, 0, 1]))
    target: tuple[Field, Field] | str | None = None
    if path == "forward":
        target = draw(
            st.one_of(
                st.sampled_from(["commands", "events", "rpc"]), st.tuples(any_field, any_field)
            )
        )
    return Drawn(
        path=path,
        props=props,
        burrow=burrow,
        other=other,
        body=draw(st.sampled_from(["probe", "probe", "probe", "malformed", "schema", "binary"])),
        junk=draw(st.binary(max_size=24)),
        target=target,
        units=units,
    )


@st.composite
def retried_messages(draw: st.DrawFn) -> Drawn:
    """A well-formed message for calc.flaky, which fails retryably every time, with
    x-burrow-attempt of any value and type: the only draw that reaches a retry at all (a fully
    drawn message is nearly always refused, or handled by calc.probe, which never fails)."""
    path = draw(st.sampled_from(["cast", "submit", "forward", "call"]))
    ident = secrets.token_hex(6)  # not drawn: a job id drawn twice is refused `job_id_in_use`
    props: dict[str, Any] = dict.fromkeys(
        ("content_encoding", "expiration", "app_id", "cluster_id", "user_id", "priority"), None
    )
    props |= {
        "content_type": "application/json",
        "message_id": f"m{ident}",
        "correlation_id": f"c{ident}",
        "reply_to": DIRECT_REPLY_TO if path == "call" else None,
        "type": FLAKY,
        "delivery_mode": 2,
        "timestamp": None,
    }
    burrow: dict[str, Field | None] = dict.fromkeys(BURROW_HEADERS)
    burrow[H_ATTEMPT] = draw(st.one_of(ATTEMPTS, any_field))
    if path == "submit":
        burrow[H_KIND] = S("submit")
        burrow[H_JOB_ID] = S(f"j{ident[:10]}")
    return Drawn(
        path=path,
        props=props,
        burrow=burrow,
        other={},
        body="probe",
        junk=b"",
        target="commands" if path == "forward" else None,
        units=0,
    )


# Some of the messages are retried ones (about 25 of the 200 with this seed).
messages = st.one_of(drawn_messages(), retried_messages())


# -- the background loop -----------------------------------------------------------------------


class LoopThread:
    """An event loop running in a daemon thread, for a sync (Hypothesis) test to drive."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _R], timeout: float = 60.0) -> _R:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop, join the thread, close the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Fuzz:
    """The running App on its loop, and what the fuzzer learned."""

    loop: LoopThread
    env: Hostile
    started: float
    examples: int = 0
    failures: dict[str, tuple[str, Drawn | None]] = field(default_factory=dict)


@pytest.fixture
def fuzz(
    settings: Settings,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> Iterator[Fuzz]:
    """The probe App on a background loop (retries fast, so a retried message settles soon)."""
    loop = LoopThread()
    app_settings = settings.model_copy(update={"retry_base_delay": 0.05})
    try:
        env = loop.run(start_hostile(app_settings, logs=logs, caplog=log_records))
    except BaseException:
        loop.close()
        raise
    try:
        yield Fuzz(loop, env, time.monotonic())
    finally:
        try:
            loop.run(stop_hostile([env]))
        finally:
            loop.close()


# -- one example -------------------------------------------------------------------------------


def _text(value: Field | str | bytes | None) -> str | None:
    """What a value reads as text (a string, or UTF-8 bytes), as Burrow would read it."""
    if value is None:
        return None
    if isinstance(value, Field):
        if value.tag not in (b"S", b"x"):
            return None
        value = value.payload[4:]
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _expired(value: Field | None) -> bool:
    """Whether x-deadline is a number or timestamp already passed (then silence is right)."""
    if value is None:
        return False
    try:
        decoded = shim.field_value(value.encode())[1]
    except Exception:
        return False
    now_ms = _now_ms()
    if isinstance(decoded, bool):
        return False
    if isinstance(decoded, int | float | decimal.Decimal):
        number = float(decoded)
        return math.isfinite(number) and 0 < number < now_ms
    timestamp = getattr(decoded, "timestamp", None)
    return callable(timestamp) and float(timestamp()) * 1000 < now_ms


def _body(drawn: Drawn, token: str) -> bytes:
    pad = b"q" * 40  # logs may show 32 bytes of a refused body: the token comes later
    return {
        "probe": probe_body(token),
        "malformed": b'{"pad":"' + pad + b'","token":"' + token.encode() + b'",' + drawn.junk,
        "schema": b'{"pad":"' + pad + b'","token":"' + token.encode() + b'","extra":1}',
        "binary": b"\x00\xff" * 20 + token.encode() + drawn.junk,
    }[drawn.body]


def _route(env: Hostile, drawn: Drawn) -> tuple[str, str, dict[str | bytes, Field]]:
    """Exchange, routing key and (for a delayed message) the target headers."""
    names: Names = env.names
    routes = {
        "call": (names.rpc_exchange, "calc.probe"),
        "cast": (names.commands_exchange, "calc.probe"),
        "submit": (names.commands_exchange, "calc.probe"),
        "event": (names.events_exchange, EVENT),
    }
    if drawn.path != "forward":
        exchange, key = routes[drawn.path]
        return exchange, key, {}
    if isinstance(drawn.target, tuple):
        target_exchange, target_key = drawn.target
    else:
        named = {"rpc": "call", "commands": "cast", "events": "event"}[drawn.target or "commands"]
        exchange, key = routes[named]
        target_exchange, target_key = S(exchange), S(key)
    extra: dict[str | bytes, Field] = {
        H_TARGET_EXCHANGE: target_exchange,
        H_TARGET_KEY: target_key,
    }
    return names.delay_exchange(LEVELS - 1), delay_route(drawn.units), extra


_STABLE_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    }
)  # INTERNAL is not among them: the probe's handlers never fail unexpectedly
_REASONS = frozenset(DEAD_LETTER_REASONS) - {"internal"}
_SCHEDULER_REASONS = frozenset({"undecodable", "invalid_target", "broker:rejected"})


def verdict(
    outcome: frozenset[str], *, silence_ok: bool, failing: bool = False, retries: int = 0
) -> str | None:
    """Why an observed ending breaks the oracle, or None (`failing`: the handler ran and
    failed retryably, so it may run up to 1 + `retries` times before the message is parked)."""
    if "unsettled" in outcome:
        return "never accounted for (a delivery unsettled, or nothing arrived anywhere)"
    if any(atom.startswith("uncorrelated-reply:") for atom in outcome):
        # §4.1 step 3: a call without a correlation id has nobody to answer (missing_reply_to).
        return "answered a call without a correlation id instead of parking it"
    if any(atom.startswith(("broker:", "returned")) for atom in outcome):
        return None if len(outcome) == 1 else "refused by the broker and also delivered"
    terminal = [atom for atom in outcome if atom.split(":")[0] in _TERMINALS]
    runs = max((_runs(atom) for atom in outcome), default=0)
    exhausted = failing and "parked:retries_exhausted" in outcome
    if exhausted:  # run until its retries were used up (a forged count: fewer), then parked;
        # a submitter is told too (a completion with the handler's error)
        terminal = [atom for atom in terminal if atom != f"completed:{_FLAKY_CODE}"]
    twice = [
        atom for atom in outcome if _TWICE.match(atom) and not (exhausted and atom[:4] == "ranx")
    ]
    if failing and runs > 1 + retries:
        return f"a failing handler ran {runs} times, with {retries} retries: a loop"
    if len(terminal) > 1 or twice:
        return "more than one ending (answered and parked, or handled twice)"
    if failing and not exhausted and (runs > 1 or not (terminal or silence_ok)):
        return f"failed {runs} times, then not parked retries_exhausted (lost, or looping)"
    if not outcome:
        return None if silence_ok else "silently dropped: no reply, no DLQ, handler never ran"
    if "callback" in outcome and not any(atom.startswith("completed:") for atom in outcome):
        return "a callback copy without a completion"
    for atom in terminal:
        problem = _terminal_problem(atom, ran=runs > 0, failing=failing)
        if problem is not None:
            return problem
    return None


def _terminal_problem(atom: str, *, ran: bool, failing: bool = False) -> str | None:
    """Why one ending is not allowed: an unstable code, a foreign reason, or at odds with
    whether the handler ran (and failed: `failing`)."""
    where, _, what = atom.partition(":")
    if where in ("reply", "completed"):
        if what == "ok":
            if failing:
                return "answered ok although the handler failed"
            return None if ran else "answered ok without the handler running"
        if what not in _STABLE_CODES:
            return f"answered with an unstable code {what!r}"
        if failing:
            return None if what == _FLAKY_CODE else f"the failed handler answered {what!r}"
        return "the handler ran for a refused message" if ran else None
    if ran and not failing:
        return "parked although the handler succeeded"
    if where == "parked" and what not in _REASONS:
        return f"parked with reason {what!r}, not a Burrow reason"
    if where == "sched" and what not in _SCHEDULER_REASONS:
        return f"parked by the scheduler with reason {what!r}"
    return None


_TERMINALS = frozenset({"reply", "completed", "parked", "sched"})
_TWICE = re.compile(r"^(ran|parked|completed|reply)x\d+$")
_FLAKY_CODE = "UNAVAILABLE"  # what it raises


def _runs(atom: str) -> int:
    """How many handler runs an outcome atom says (`ran`, `ranx3`), else 0."""
    if atom == "ran":
        return 1
    return int(atom[4:]) if atom.startswith("ranx") and atom[4:].isdigit() else 0


def _flaky_retries(env: Hostile) -> int:
    """calc.flaky's retries, as the running App has them."""
    [service] = env.app.services
    operation = service.get(FLAKY)
    assert operation is not None
    assert operation.retries is not None
    return operation.retries


def _done_retrying(env: Hostile, sent: Sent, retries: int) -> bool:
    """Whether a message whose handler failed is no longer retried (parked or answered), or
    was retried more often than it may be (a loop: no need to watch it further)."""
    if len(env.log.runs(sent.token)) > 1 + retries:
        return True
    if not env.accounted(sent):
        return False
    with env._lock:
        return sent.token in env.parked or (sent.correlation_id or "") in env.replies


async def one_example(env: Hostile, drawn: Drawn) -> list[str]:
    """Publish one drawn message, wait until it is accounted for, judge its ending."""
    token = new_token()
    env.forget()  # ids may repeat between examples: only this example's endings count
    exchange, key, extra = _route(env, drawn)
    job_id = _text(drawn.burrow[H_JOB_ID])
    if job_id is not None and valid_job_id(job_id) is not None:
        await env.declare_job(job_id)  # as a submitter does: the completion lands there
    headers: dict[str | bytes, Any] = dict(drawn.other)
    headers.update({name: value for name, value in drawn.burrow.items() if value is not None})
    headers.update(extra)
    published = await env.amqp.publish(
        exchange,
        key,
        _body(drawn, token),
        Props(headers=headers, **drawn.props),
        mandatory=True,
    )
    if not env.amqp.is_open:
        await env.reopen_raw()
    sent = Sent(
        token=token,
        path=drawn.path,
        correlation_id=_text(drawn.props["correlation_id"]),
        job_id=job_id,
        callback=_text(drawn.burrow[H_CALLBACK]),
        published=published,
    )
    problems: list[str] = []
    reply_to = drawn.props["reply_to"]
    foreign_reply_to = isinstance(reply_to, str | bytes) and (
        reply_to.encode() if isinstance(reply_to, str) else reply_to
    ).startswith(DIRECT_REPLY_TO.encode() + b".")
    silence_ok = _expired(drawn.burrow[H_DEADLINE]) or foreign_reply_to
    with contextlib.suppress(AssertionError):  # `unsettled` in the outcome says so
        await wait_until(lambda: env.accounted(sent), 10, "the message accounted for")
    failing = any(run.route == FLAKY for run in env.log.runs(token))
    retries = _flaky_retries(env) if failing else 0
    if failing and not silence_ok:
        # Accounted after each run: a retried message is done once it is parked (or answered).
        with contextlib.suppress(AssertionError):  # the verdict says what is missing
            await wait_until(lambda: _done_retrying(env, sent, retries), 10, "the retries to end")
    await env.barrier()
    outcome = env.outcome(sent)
    if job_id is not None and valid_job_id(job_id) is not None:
        outcome |= await env.job_results(job_id)
    problem = verdict(outcome, silence_ok=silence_ok, failing=failing, retries=retries)
    if problem is not None:
        problems.append(f"{problem}: outcome {sorted(outcome)}")
    records = env.tracker.of(token)
    if len(records) > 2 + retries:  # the ladder's delivery, the first run and the retries
        problems.append(f"delivered {len(records)} times: a loop")
    problems += env.tracker.problems()
    if env.amqp.errors:
        problems.append(f"reply consumer failed: {env.amqp.errors[:1]!r}")
    consumer = env.app.transport.consumer
    if consumer.attached != len(consumer.consumers):
        problems.append(f"{consumer.attached} of {len(consumer.consumers)} consumers attached")
    if env._reconnects() != env.reconnects:
        problems.append("the service reconnected")
    if not env.app.health.ready:
        problems.append(f"not ready: {env.app.health.problems()}")
    return problems


def _failures(fuzz: Fuzz) -> list[tuple[str, Drawn | None]]:
    return list(fuzz.failures.values())


def test_h10_fuzzed_messages_keep_the_oracle(fuzz: Fuzz) -> None:
    """H10: any message, with any property and header of any type, on any path, is accounted
    for and ends in one allowed way, with no reconnect and the service ready; afterwards the
    service answers calc.add, nothing is left unacked and no log line holds a body or password."""

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: every example is a round trip
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(drawn=messages)
    def example(drawn: Drawn) -> None:
        fuzz.examples += 1
        for problem in fuzz.loop.run(one_example(fuzz.env, drawn), timeout=60):
            kind = problem.split(":")[0]
            fuzz.failures.setdefault(kind, (problem, drawn))

    # Every example runs, whatever fails: without shrinking, one example per kind of failure
    # says more than the first failure alone.
    example()
    try:
        fuzz.loop.run(fuzz.env.assert_sound())
    except AssertionError as exc:
        fuzz.failures.setdefault("oracle after the fuzzer", (str(exc), None))
    report = [
        f"- {problem}\n  {pprint.pformat(drawn, width=96)}"
        for problem, drawn in fuzz.failures.values()
    ]
    assert not report, f"{len(report)} kinds of failure in {fuzz.examples} examples:\n" + "\n".join(
        report
    )
    assert fuzz.examples >= EXAMPLES
