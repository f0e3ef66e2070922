"""H1 of RELIABILITY.md: every header Burrow reads, sent with every AMQP 0-9-1 field type.

Each test sends one header with every field type (long string — UTF-8 and not —, byte array,
table, array, bool, every integer width `b B s u I i l`, float `f`, double `d`, decimal `D`,
timestamp `T`, void `V`) on calls, casts, submits, events and delayed messages (through the
forwarder), published byte-exact through `rawamqp`, and checks that each is handled as the
SPEC says (coerced, treated as absent, or refused `INVALID_ARGUMENT` with reason `invalid`),
never with an exception in a consumer callback, nothing left unacked, the service ready and
answering calc.add after. Outcomes are compared as sets of atoms (see `Hostile.outcome`).

NaN and ±Infinity are not sent here: RabbitMQ 3.10 closes the connection (541) on a NaN or
infinite float in a header table, so they never reach a service (the fuzzer covers that the
service does not care). A header *value* cannot be a short string (see `rawamqp`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from service import Context, Service, Unavailable
from service._amqp import shim
from service._amqp.tools import delivery_from_message
from service._protocol.tracing import HEADER as TRACEPARENT
from service._protocol.vocabulary import (
    H_ATTEMPT,
    H_CALLBACK_DATA,
    H_DEADLINE,
    H_KIND,
    H_VERSION,
    MAX_ATTEMPT,
    MAX_CALLBACK_DATA,
)
from service._serving.dead_letters import DeadLetter
from tests.hostile import conftest as hostile_conftest
from tests.hostile.conftest import (
    CALLBACK_DATA,
    EVENT,
    NORMAL,
    NOT_UTF8,
    Case,
    Check,
    HandlerLog,
    Hostile,
    MakeHostile,
    Outcome,
    Probe,
    Sent,
    non_text,
    probe_service,
    refused,
    text_types,
)
from tests.hostile.conftest import (
    run_cases as run,
)
from tests.hostile.rawamqp import A, B, D, F, Field, I, S, T, V, b, d, f, i, l, s, t, u, x

__all__: list[str] = []

# -- x-burrow-kind ----------------------------------------------------------------------------

# (path, the kind sent, what happens when it is read, what happens when it is absent)
_KIND_PATHS: list[tuple[str, str, Outcome, Outcome]] = [
    ("call", "cast", NORMAL["cast"], NORMAL["call"]),  # reply_to set: absent means call
    ("cast", "submit", NORMAL["submit"], NORMAL["cast"]),
    ("forward", "submit", NORMAL["submit"], NORMAL["cast"]),
    ("event", "call", NORMAL["event"], NORMAL["event"]),  # subscriptions ignore the kind
]


def kind_cases() -> list[Case]:
    """x-burrow-kind: text (a string or UTF-8 bytes) equal to call|cast|submit, else absent."""
    cases: list[Case] = []
    for path, kind, read, absent in _KIND_PATHS:
        typed = [(label, value, read) for label, value in text_types(kind)]
        typed += [
            ("S-not-utf8", S(NOT_UTF8 + kind.encode()), absent),
            ("S-upper", S(kind.upper()), absent),
        ]
        typed += [(label, value, absent) for label, value in non_text()]
        typed += [("x-not-utf8", x(NOT_UTF8), absent), ("V", V(), absent)]
        for label, value, outcome in typed:
            cases.append(
                Case(path, label, {H_KIND: value}, [outcome], job=path in ("cast", "forward"))
            )
    return cases


async def test_h1_kind_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: x-burrow-kind counts only as text equal to call|cast|submit, else it is absent."""
    await run(await hostile(), kind_cases())


# -- x-deadline -------------------------------------------------------------------------------


def deadline_values() -> list[tuple[str, Field, str]]:
    """Every field type as x-deadline: `ok` (in the future), `expired` (a number of ms, in the
    past: integer widths below 64 bits and decimals cannot hold a date after 1970-02),
    `invalid` (any other type, or out of 0 < v < 2^53), `absent` (void)."""
    now_ms = int(time.time() * 1000)
    ahead = now_ms + 120_000
    return [
        ("l-future", l(ahead), "ok"),
        ("d-future", d(float(ahead)), "ok"),
        ("f-future", f(float(now_ms + 600_000)), "ok"),  # single precision: ±66 s at 2^40 ms
        ("T-future", T(ahead // 1000), "ok"),
        ("b", b(100), "expired"),
        ("B", B(200), "expired"),
        ("s", s(1000), "expired"),
        ("u", u(60_000), "expired"),
        ("I", I(2**31 - 1), "expired"),
        ("i", i(2**32 - 1), "expired"),
        ("l-past", l(now_ms - 60_000), "expired"),
        ("d-past", d(float(now_ms - 60_000)), "expired"),
        ("D", D(2, 12345), "expired"),
        ("T-past", T(1), "expired"),
        ("S-digits", S(str(ahead)), "invalid"),
        ("S-not-utf8", S(NOT_UTF8), "invalid"),
        ("x-digits", x(str(ahead).encode()), "invalid"),
        ("t", t(True), "invalid"),
        ("b-zero", b(0), "invalid"),
        ("b-negative", b(-1), "invalid"),
        ("l-2^53", l(2**53), "invalid"),
        ("l-max", l(2**63 - 1), "invalid"),
        ("d-1e300", d(1e300), "invalid"),
        ("d-negative", d(-5.0), "invalid"),
        ("F", F({"ms": l(ahead)}), "invalid"),
        ("A", A([l(ahead)]), "invalid"),
        ("V", V(), "absent"),
    ]


def deadline_cases() -> list[Case]:
    """x-deadline x every type x every path."""
    cases: list[Case] = []
    for path in NORMAL:
        for label, value, kind in deadline_values():
            expect = {
                "ok": NORMAL[path],
                "absent": NORMAL[path],
                "expired": frozenset[str](),  # acked, nothing runs, nothing is published
                "invalid": refused(path),
            }[kind]
            cases.append(Case(path, label, {H_DEADLINE: value}, [expect]))
    return cases


async def test_h1_deadline_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: x-deadline of any integer width, float, double, decimal or timestamp is a deadline;
    any other present type or an out-of-range value is refused INVALID_ARGUMENT (`invalid`)."""
    await run(await hostile(), deadline_cases())


# -- x-contract-version ----------------------------------------------------------------------


def version_cases() -> list[Case]:
    """x-contract-version: text or an integer is compared with the accepted majors (1)."""
    typed: list[tuple[str, Field, str]] = [
        *((f"{label}-1", value, "ok") for label, value in text_types("1")),
        *((f"{label}-2", value, "precondition") for label, value in text_types("2")),
        *((f"{label}-1", value, "ok") for label, value in non_text(1)[1:8]),  # b B s u I i l
        *((f"{label}-2", value, "precondition") for label, value in non_text(2)[1:8]),
        ("t", t(True), "invalid"),
        *((label, value, "invalid") for label, value in non_text(1)[8:]),  # f d D T F A
        ("S-not-utf8", S(NOT_UTF8), "invalid"),
        ("x-not-utf8", x(NOT_UTF8), "invalid"),
        ("V", V(), "ok"),  # void: absent, no check
    ]
    cases: list[Case] = []
    for path, normal in NORMAL.items():
        for label, value, kind in typed:
            if path == "event":
                # Events are never checked (protocol §4.4); a version of a type Burrow cannot
                # read is either ignored or refused: the SPEC does not say which for events.
                expect = [normal] if kind != "invalid" else [normal, refused("event")]
            elif kind == "ok":
                expect = [normal]
            elif kind == "precondition":
                expect = [refused(path, "FAILED_PRECONDITION")]
            else:
                expect = [refused(path)]
            cases.append(Case(path, label, {H_VERSION: value}, expect))
    return cases


async def test_h1_contract_version_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: x-contract-version as a string, UTF-8 bytes or an integer is compared with the
    accepted majors; any other type is refused INVALID_ARGUMENT (`invalid`)."""
    await run(await hostile(), version_cases())


# -- x-job-id, x-callback-route ---------------------------------------------------------------


def job_cases() -> list[Case]:
    """x-job-id on submits and delayed submits: text names the job, else absent (refused)."""
    ok = [frozenset({"ran", "completed:ok"})]
    absent = [frozenset({"parked:invalid"})]  # a submit without a job id: nobody to answer
    typed: list[tuple[str, Callable[[str], Field], Sequence[Outcome]]] = [
        ("S", S, ok),
        ("x", lambda job: x(job.encode()), ok),
        ("S-not-utf8", lambda job: S(NOT_UTF8 + job.encode()), absent),
        ("S-bad-id", lambda _job: S("not a job id!"), absent),
        *((label, _const(value), absent) for label, value in non_text()),
        ("V", _const(V()), absent),
    ]
    return [
        Case(path, label, _SUBMIT[path], expect, job=True, job_header=make)
        for path in ("submit", "forward")
        for label, make, expect in typed
    ]


def callback_cases() -> list[Case]:
    """x-callback-route on submits and delayed submits: text also routes the completion
    there, else absent."""
    routed = [frozenset({"ran", "completed:ok", "callback"})]
    plain = [frozenset({"ran", "completed:ok"})]
    typed: list[tuple[str, Callable[[str], Field], Sequence[Outcome]]] = [
        ("S", S, routed),
        ("x", lambda route: x(route.encode()), routed),
        ("S-not-utf8", lambda route: S(NOT_UTF8 + route.encode()), plain),
        *((label, _const(value), plain) for label, value in non_text()),
        ("V", _const(V()), plain),
    ]
    return [
        Case(path, label, _SUBMIT[path], expect, job=True, callback=make)
        for path in ("submit", "forward")
        for label, make, expect in typed
    ]


def callback_data_cases() -> list[Case]:
    """x-callback-data on submits (with a callback route): text of at most 4,096 characters
    rides on the callback's completion, anything else is absent (the callback still goes)."""
    carried = [frozenset({"ran", "completed:ok", "callback", "callback+data"})]
    plain = [frozenset({"ran", "completed:ok", "callback"})]
    typed: list[tuple[str, Field, Sequence[Outcome]]] = [
        ("S", S(CALLBACK_DATA), carried),
        ("x", x(CALLBACK_DATA.encode()), carried),
        ("S-not-utf8", S(NOT_UTF8 + CALLBACK_DATA.encode()), plain),
        ("S-too-long", S(CALLBACK_DATA + "x" * MAX_CALLBACK_DATA), plain),
        *((label, value, plain) for label, value in non_text()),
        ("V", V(), plain),
    ]
    return [
        Case(path, label, {**_SUBMIT[path], H_CALLBACK_DATA: value}, expect, job=True, callback=S)
        for path in ("submit", "forward")
        for label, value, expect in typed
    ]


_SUBMIT: dict[str, dict[str | bytes, Any]] = {"submit": {}, "forward": {H_KIND: S("submit")}}


def _const(value: Field) -> Callable[[str], Field]:
    return lambda _ignored: value


async def test_h1_job_id_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: x-job-id as a string or UTF-8 bytes names the job; any other type is absent, so the
    submit is refused (`invalid`, parked: there is nobody to answer)."""
    await run(await hostile(), job_cases())


async def test_h1_callback_route_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: x-callback-route as a string or UTF-8 bytes also routes the completion there; any
    other type is absent (the completion still goes to the job)."""
    await run(await hostile(), callback_cases())


async def test_h1_callback_data_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: x-callback-data as text of at most 4,096 characters is copied onto the callback's
    completion; any other type, undecodable text or longer text is absent there."""
    await run(await hostile(), callback_data_cases())


# -- traceparent ------------------------------------------------------------------------------


def trace_cases() -> list[Case]:
    """traceparent: text (a string or UTF-8 bytes) continues the trace, else a new one."""
    trace = secrets.token_hex(16)
    parent = f"00-{trace}-{secrets.token_hex(8)}-01"

    def continued(env: Hostile, one: Sent) -> str | None:
        [run_] = env.log.runs(one.token)
        return None if run_.trace_id == trace else f"trace {run_.trace_id} is not {trace}"

    def fresh(env: Hostile, one: Sent) -> str | None:
        [run_] = env.log.runs(one.token)
        return f"trace {trace} continued: want it absent" if run_.trace_id == trace else None

    typed: list[tuple[str, Field, Check]] = [
        *((label, value, continued) for label, value in text_types(parent)),
        ("S-not-utf8", S(NOT_UTF8 + parent.encode()), fresh),
        ("S-garbage", S("00-not-a-trace"), fresh),
        *((label, value, fresh) for label, value in non_text()),
        ("F-holding", F({TRACEPARENT: S(parent)}), fresh),
        ("A-holding", A([S(parent)]), fresh),
        ("V", V(), fresh),
    ]
    return [
        Case(path, label, {TRACEPARENT: value}, [NORMAL[path]], check=check)
        for path in NORMAL
        for label, value, check in typed
    ]


async def test_h1_traceparent_header_of_every_type(hostile: MakeHostile) -> None:
    """H1: traceparent as a string or UTF-8 bytes continues the trace; any other type is
    absent (the handler does not run in the sender's trace)."""
    await run(await hostile(), trace_cases())


# -- other headers ----------------------------------------------------------------------------

OTHER = "x-hostile-other"


def _decoded(value: Field) -> Any:
    """The value as a Burrow connection decodes it: what a handler is given."""
    _consumed, decoded = shim.field_value(value.encode())
    return decoded


def _copied(value: Any) -> Any:
    """What a copy of a received message carries (SPEC H3: bytes become byte arrays)."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


def _same(left: Any, right: Any) -> bool:
    """Equal, and of the same types all the way down (bytes is not bytearray, 1 is not 1.0)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(_same, left, right))
    return bool(left == right)


def other_values() -> list[tuple[str, Field]]:
    """A header Burrow does not read, with every field type and the extremes of each."""
    return [
        ("S", S("plain text")),
        ("S-not-utf8", S(NOT_UTF8)),
        ("x", x(b"\x00\xff\x80")),
        ("t-true", t(True)),
        ("t-false", t(False)),
        ("b", b(-128)),
        ("B", B(255)),
        ("s", s(-32768)),
        ("u", u(65535)),
        ("I", I(-(2**31))),
        ("i", i(2**32 - 1)),
        ("l-min", l(-(2**63))),
        ("l-max", l(2**63 - 1)),
        ("f", f(1.5)),
        ("d", d(0.1)),  # not representable in single precision
        ("D", D(2, 12345)),
        ("T", T(1_700_000_000)),
        ("V", V()),
        ("F", F({"bytes": S(NOT_UTF8), "inner": F({"x": x(b"\x01")}), "n": l(7)})),
        ("A", A([S(NOT_UTF8), l(1), V(), A([t(False)])])),
    ]


def other_cases() -> list[Case]:
    """Every type of a header Burrow does not read, on every path: given to the handler."""

    def passed(sent_value: Field) -> Check:
        def check(env: Hostile, one: Sent) -> str | None:
            [run_] = env.log.runs(one.token)
            want = _decoded(sent_value)
            if one.path == "forward":
                want = _copied(want)
            got = run_.headers.get(OTHER, "(missing)")
            if _same(got, want):
                return None
            return f"handler got {got!r} ({type(got).__name__}), want {want!r}"

        return check

    return [
        Case(path, label, {OTHER: value}, [NORMAL[path]], check=passed(value))
        for path in NORMAL
        for label, value in other_values()
    ]


async def test_h1_other_headers_reach_the_handler_unchanged(hostile: MakeHostile) -> None:
    """H1: a header Burrow does not read reaches the handler as decoded, whatever its type
    (through the forwarder: bytes as byte arrays)."""
    await run(await hostile(), other_cases())


# -- the forwarder's own headers --------------------------------------------------------------


def target_cases(env: Hostile) -> list[Case]:
    """x-burrow-target-exchange / -key of every type on a delayed cast."""
    commands, events = env.names.commands_exchange, env.names.events_exchange
    key = S("calc.probe")
    ok = [NORMAL["forward"]]
    invalid = [frozenset({"sched:invalid_target"})]
    cases = [
        Case("forward", "exchange-S", {}, ok, target=(S(commands), key)),
        Case("forward", "exchange-x", {}, ok, target=(x(commands.encode()), key)),
        Case("forward", "exchange-S-events", {}, ok, target=(S(events), S(EVENT))),
        Case("forward", "exchange-S-foreign", {}, invalid, target=(S("amq.direct"), key)),
        Case("forward", "exchange-S-empty", {}, invalid, target=(S(""), key)),
        Case("forward", "exchange-S-not-utf8", {}, invalid, target=(S(NOT_UTF8), key)),
        Case("forward", "exchange-V", {}, invalid, target=(V(), key)),
        Case("forward", "key-x", {}, ok, target=(S(commands), x(b"calc.probe"))),
        Case("forward", "key-S-not-utf8", {}, invalid, target=(S(commands), S(NOT_UTF8))),
        Case("forward", "key-V", {}, invalid, target=(S(commands), V())),
        # A route nobody is bound to: the target returns it, the ready queue dead-letters it.
        Case(
            "forward",
            "key-S-unroutable",
            {},
            [frozenset({"sched:broker:rejected"}), frozenset({"sched:invalid_target"})],
            target=(S(commands), S("nobody.probe")),
        ),
    ]
    for label, value in non_text():
        cases.append(Case("forward", f"exchange-{label}", {}, invalid, target=(value, key)))
        cases.append(Case("forward", f"key-{label}", {}, invalid, target=(S(commands), value)))
    return cases


async def test_h1_forwarder_target_headers_of_every_type(hostile: MakeHostile) -> None:
    """H1: the forwarder reads its target exchange and key as text (string or UTF-8 bytes);
    any other type, or a foreign exchange, is parked in the scheduler DLQ `invalid_target`."""
    env = await hostile()
    await run(env, target_cases(env))


# -- x-burrow-attempt -------------------------------------------------------------------------

RETRIES = 2  # calc.flaky's retries (the probe service's default) and on_flaky's
FLAKY_EVENT = "hflaky.fired"  # matched by the `on_flaky` subscription added here (`hflaky.#`)
NO_COUNT = -1  # an attempt header read as absent: x-death (none sent) counts, i.e. 0
# A count the reader may take either way (see `attempt_values`).
CAPPED_OR_ABSENT = -2


def flaky_probe_service(log: HandlerLog, *, flaky_retries: int = RETRIES) -> Service:
    """The probe service with an `on_flaky` subscription (`hflaky.#`) that records the event,
    then fails retryably, every time (the probe service has no failing subscription)."""
    svc = probe_service(log, flaky_retries=flaky_retries)

    @svc.subscribe("hflaky.#", name="on_flaky", retries=flaky_retries)
    async def on_flaky(event: Probe, ctx: Context) -> None:
        """Record the event; fail retryably."""
        log.record("event", event.token, ctx)
        raise Unavailable("the probe's dependency is away")

    return svc


def attempt_values() -> list[tuple[str, Field, int]]:
    """x-burrow-attempt of every type, with the count it must be read as (`NO_COUNT`: absent).

    Readable: an integer of any width, the same as text (string or UTF-8 bytes), an integral
    float, double or decimal; negative is 0, above MAX_ATTEMPT is MAX_ATTEMPT."""
    return [
        *((label, value, 1) for label, value in non_text(1)[1:8]),  # b B s u I i l
        ("f", f(1.0), 1),
        ("d", d(1.0), 1),
        ("D", D(0, 1), 1),
        ("D-scaled", D(2, 100), 1),  # 1.00
        *((label, value, 1) for label, value in text_types("1")),
        ("l-zero", l(0), 0),
        ("S-zero", S("0"), 0),
        ("B-retries", B(RETRIES), RETRIES),
        ("s-beyond-retries", s(RETRIES + 1), RETRIES + 1),
        # negative: 0
        ("b-negative", b(-1), 0),
        ("s-negative", s(-300), 0),
        ("I-min", I(-(2**31)), 0),
        ("l-min", l(-(2**63)), 0),
        ("f-negative", f(-1.0), 0),
        ("d-negative", d(-5.0), 0),
        ("D-negative", D(0, -7), 0),
        *((f"{label}-negative", value, 0) for label, value in text_types("-5")),
        # huge: the cap
        ("I-max", I(2**31 - 1), MAX_ATTEMPT),
        ("i-max", i(2**32 - 1), MAX_ATTEMPT),
        ("l-max", l(2**63 - 1), MAX_ATTEMPT),
        ("i-cap", i(MAX_ATTEMPT), MAX_ATTEMPT),
        ("i-cap+1", i(MAX_ATTEMPT + 1), MAX_ATTEMPT),
        ("D-max", D(0, 2**31 - 1), MAX_ATTEMPT),
        ("f-3e38", f(3.0e38), MAX_ATTEMPT),
        ("d-2^64", d(2.0**64), MAX_ATTEMPT),
        ("d-1e100", d(1e100), MAX_ATTEMPT),
        ("d-1e300", d(1e300), MAX_ATTEMPT),
        ("S-32-digits", S("9" * 32), MAX_ATTEMPT),
        ("x-2^64", x(str(2**64).encode()), MAX_ATTEMPT),
        # protocol §3 says text above the cap is the cap; the reader takes at most 32 characters
        # of text and treats longer text as absent (reported): either ends the retries.
        ("S-10^100", S(str(10**100)), CAPPED_OR_ABSENT),
        # unreadable: absent
        ("t-true", t(True), NO_COUNT),
        ("t-false", t(False), NO_COUNT),
        ("f-half", f(1.5), NO_COUNT),
        ("d-half", d(0.5), NO_COUNT),
        ("D-half", D(1, 15), NO_COUNT),
        ("S-word", S("one"), NO_COUNT),
        ("S-empty", S(""), NO_COUNT),
        ("S-float", S("1.0"), NO_COUNT),
        ("S-hex", S("0x10"), NO_COUNT),
        ("S-not-utf8", S(NOT_UTF8), NO_COUNT),
        ("x-not-utf8", x(NOT_UTF8), NO_COUNT),
        ("T", T(1), NO_COUNT),
        ("F", F({"n": l(1)}), NO_COUNT),
        ("A", A([l(1)]), NO_COUNT),
        ("V", V(), NO_COUNT),
    ]


def _runs(count: int) -> int:
    """How often a handler that always fails retryably runs when the first delivery says
    `count` retries were made (absent: 0): until `count` reaches the retries, then parked."""
    return max(0, RETRIES - max(count, 0)) + 1


def _ran(runs: int) -> str:
    return "ran" if runs == 1 else f"ranx{runs}"


def _parked_after(runs: int, path: str) -> Outcome:
    """What a retried cast, submit, event or delayed cast shows after `runs` runs."""
    atoms = {_ran(runs), "parked:retries_exhausted"}
    if path == "submit":
        atoms.add("completed:UNAVAILABLE")  # the submitter learns it failed
    return frozenset(atoms)


def _attempts_reported(count: int) -> Check:
    """The letter's error says how many attempts were made: the count read, once the
    retries were used up, plus this one (`details.attempts`)."""
    want = max(count, RETRIES) + 1

    def check(env: Hostile, one: Sent) -> str | None:
        errors = [
            DeadLetter.from_delivery(delivery_from_message(p.message), full=True).error
            for p in env.parked.get(one.token, ())
        ]
        got = [e.get("details", {}).get("attempts") if isinstance(e, dict) else e for e in errors]
        return None if got == [want] else f"details.attempts {got}, want [{want}]"

    return check


def attempt_cases(env: Hostile) -> list[Case]:
    """x-burrow-attempt x every type on calls (ignored: never retried), casts, submits, events
    and delayed casts to a handler that always fails retryably."""
    names = env.names
    flaky = "calc.flaky"
    props: dict[str, dict[str, Any]] = {
        "call": {"route": (names.rpc_exchange, flaky), "type": flaky},
        "cast": {"route": (names.commands_exchange, flaky), "type": flaky},
        "submit": {"route": (names.commands_exchange, flaky), "type": flaky},
        "event": {"route": (names.events_exchange, FLAKY_EVENT)},
        "forward": {"type": flaky},
    }
    target = (S(names.commands_exchange), S(flaky))
    cases: list[Case] = []
    for path in NORMAL:
        for label, value, count in attempt_values():
            check: Check | None = None
            if path == "call":
                expect = [frozenset({"ran", "reply:UNAVAILABLE"})]
            elif count == CAPPED_OR_ABSENT:
                expect = [_parked_after(_runs(MAX_ATTEMPT), path), _parked_after(_runs(0), path)]
            else:
                expect = [_parked_after(_runs(count), path)]
                check = _attempts_reported(max(count, 0))
            cases.append(
                Case(
                    path,
                    label,
                    {H_ATTEMPT: value},
                    expect,
                    target=target if path == "forward" else None,
                    check=check,
                    props=props[path],
                )
            )
    return cases


async def test_h1_attempt_header_of_every_type(
    hostile: MakeHostile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H1: x-burrow-attempt read as a count (negative 0, huge capped) lets a retried message
    run only the retries left, then parks it; another type is absent; calls ignore it."""
    monkeypatch.setattr(hostile_conftest, "probe_service", flaky_probe_service)
    env = await hostile(retry_base_delay=0.05)
    accounted = env.accounted

    def ended(one: Sent) -> bool:
        """Accounted for, and done retrying: answered (a call) or parked."""
        return accounted(one) and (one.path == "call" or one.token in env.parked)

    monkeypatch.setattr(env, "accounted", ended)
    await run(env, attempt_cases(env))
