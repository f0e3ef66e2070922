"""H12: the Python client reads the `x-status` of the answers it receives, of every AMQP type.

A `service.Client` calls and submits to `spy.*`, a route no Burrow service serves: the test
plays another team's Java or Go server. A queue bound to `<ns>.rpc` and `<ns>.commands` with
`spy.*` takes each request, and the answer is published byte-exact through `rawamqp` to the
request's `reply_to` (direct reply-to) with its correlation id, as that server would: a call's
reply (protocol §5.2) or a job's pushed completion (§7.2: correlation id = job id, `x-job-id`).
Its `x-status` is sent as every field type H1 enumerates (long string and byte array — UTF-8
and not —, every integer width, float, double, decimal, timestamp, bool, void, table, array,
absent, no header table at all) and as what H2 makes undecodable (a timestamp beyond year
9999, a table or array nested 33 deep), each with a valid error body (§11). What the client
does (`envelope.failed`, docs/protocol.md §3 and §5.1 step 6):

- `x-status` `error` as text (a string or UTF-8 bytes) → `client.call` and `job.result` raise
  the `ServiceError` subclass of the body's code, with its message, details and retryable;
- any other value or type, or none → the answer is a success: the decoded body is returned
  (here the error-shaped dict itself, proving the body was not read as an error);
- an undecodable `x-status` → `Internal` (whether the answer is an error cannot be known);
- a body that is not JSON (error or success), not an object, or of an unknown code → a
  `ServiceError` (`Internal`: the answering side's fault), never another exception or a hang.

Every answer is consumed by the call or job it names (no late-reply count, nothing discarded
in the logs); the last test checks that nothing stays pending or awaited, that the client
neither reconnected nor lost its reply consumer, and that it still calls and submits, to the
spy and to a real `calc` service. One client serves the whole module: its namespace carries
the run's prefix (the session cleanup covers it) and the module fixture deletes what it, the
spy and the `calc` App declared.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage

from service import App, Client
from service._calling.jobs import Job
from service._protocol.codec import encode
from service._protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service._protocol.topology import client_topology
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_JOB_ID,
    H_KIND,
    H_STATUS,
    H_VERSION,
    Names,
)
from service.example import calc
from service.testing import delete_entities
from tests.conftest import AMQP_URL, RUN_PREFIX, delete_topology, quick_settings
from tests.faults.harness import sample
from tests.hostile.conftest import (
    NOT_UTF8,
    assert_logs_clean,
    new_token,
    non_text,
    text_types,
    token_of,
)
from tests.hostile.rawamqp import (
    A,
    F,
    Field,
    Props,
    RawAmqp,
    S,
    ShortStr,
    T,
    V,
    nested_array,
    nested_table,
    x,
)

__all__: list[str] = []

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")  # the tests share the module's client
ASK = "spy.ask"  # the route of the calls (no service serves `spy`: the test answers)
CALLS = "burrow_rpc_client_calls_total"  # the client's calls, by operation and outcome
WORK = "spy.work"  # the route of the submits
_ANSWER_WAIT = 8.0  # seconds a call or a job may wait for its answer (its own deadline)
_WAIT = 20.0  # upper bound on one wait in the test; never reached when the client behaves
LATE = "burrow_rpc_late_replies_total"

# The wire codes and the class each must come back as (docs/protocol.md §11), and which are
# retryable by default: every error body sends the other value, so `retryable` is seen read.
CLASSES: dict[str, type[ServiceError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "FAILED_PRECONDITION": FailedPrecondition,
    "NOT_FOUND": NotFound,
    "PERMISSION_DENIED": PermissionDenied,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "UNAVAILABLE": Unavailable,
    "INTERNAL": Internal,
}
RETRYABLE_BY_DEFAULT = frozenset({"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"})
CALL_CODE = "FAILED_PRECONDITION"  # the code of the status cases' error bodies, on calls
JOB_CODE = "PERMISSION_DENIED"  # … and on completions (neither is a fallback like INTERNAL)


# -- the foreign server -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answered:
    """How one call or job ended for its caller: a value, or the ServiceError raised."""

    value: Any = None
    error: ServiceError | None = None


class Foreign:
    """The client under test and the foreign server answering it: a queue taking the spy's
    requests and a raw connection publishing answers of any field type."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.settings = client.settings
        self.names = Names(client.settings.namespace)
        self.queue = f"{self.names.namespace}.h12.spy"
        self.requests: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.strays: list[AbstractIncomingMessage] = []  # requests no case was waiting for
        self.apps: list[App] = []
        self.amqp: RawAmqp | None = None
        self.reconnects = sample("burrow_amqp_reconnects_total", link=client.link.name)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        """Declare the spy queue, bind it to `spy.*` on the rpc and commands exchanges (the
        client declared them), consume it, and open the raw publisher."""
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(self.queue, exclusive=True)
        for exchange in (self.names.rpc_exchange, self.names.commands_exchange):
            await queue.bind(exchange, "spy.*")
        await queue.consume(self._on_request, no_ack=True)
        self.amqp = await RawAmqp.connect()

    async def close(self) -> None:
        """Close the publisher and the spy's connection (the client is closed by the fixture)."""
        if self.amqp is not None:
            await self.amqp.close()
        if self._connection is not None:
            await self._connection.close()

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        await self.requests.put(message)

    async def take(self, token: str) -> AbstractIncomingMessage:
        """The request carrying `token` (others are kept as strays)."""
        async with asyncio.timeout(_WAIT):
            while True:
                message = await self.requests.get()
                if token_of(message.body) == token:
                    return message
                self.strays.append(message)

    async def answer(
        self, request: AbstractIncomingMessage, status: Status, body: bytes, *, job: bool
    ) -> None:
        """Publish the answer to `request` as the foreign server would: to its reply_to, with
        its correlation id, `x-contract-version`, (a completion) `x-job-id`, and `x-status`
        as the case says."""
        assert self.amqp is not None
        correlation_id = request.correlation_id
        assert request.reply_to is not None
        assert correlation_id is not None
        headers: dict[ShortStr, Field] = {H_VERSION: S("1")}
        if job:
            headers[H_JOB_ID] = S(correlation_id)
        if status.value is not None:
            headers[H_STATUS] = status.value
        headers.update(status.extra)
        ending = "failed" if status.failed else "completed"
        published = await self.amqp.publish(
            "",
            request.reply_to,
            body,
            Props(
                content_type="application/json",
                correlation_id=correlation_id,
                message_id=f"m-{secrets.token_hex(8)}",
                type=f"{WORK}.{ending}" if job else None,
                delivery_mode=2 if job else 1,
                headers=headers if status.table else None,
                timestamp=status.timestamp,
            ),
        )
        assert published.acked, f"{status.label}: {published}"
        assert published.closed is None, f"{status.label}: {published}"

    async def call(self, status: Status, body: bytes) -> Answered:
        """Make a real `client.call` to the spy, answer its request with `body` and `status`,
        and return how the call ended (a ServiceError is returned, anything else raises)."""
        token = new_token()
        call = asyncio.ensure_future(self.client.call(ASK, {"token": token}, timeout=_ANSWER_WAIT))
        try:
            request = await self.take(token)
            assert request.exchange == self.names.rpc_exchange, request.exchange
            assert (request.reply_to or "").startswith(DIRECT_REPLY_TO + "."), request.reply_to
            assert request.correlation_id in self.client.rpc.pending, "the call is not pending"
            assert (request.headers or {}).get(H_KIND) == "call", request.headers
            await self.answer(request, status, body, job=False)
            async with asyncio.timeout(_WAIT):
                return Answered(value=await call)
        except ServiceError as exc:
            return Answered(error=exc)
        finally:
            if not call.done():
                call.cancel()

    async def submit(self, status: Status, body: bytes) -> Answered:
        """Make a real `client.submit` to the spy, push its completion with `body` and
        `status`, and return how `job.result` ended (a ServiceError is returned)."""
        token = new_token()
        job: Job = await self.client.submit(WORK, {"token": token})
        assert job.id in self.client.rpc.awaiting, "the job does not await its push"
        request = await self.take(token)
        assert request.exchange == self.names.commands_exchange, request.exchange
        assert (request.reply_to or "").startswith(DIRECT_REPLY_TO + "."), request.reply_to
        assert request.correlation_id == job.id, (request.correlation_id, job.id)
        assert (request.headers or {}).get(H_JOB_ID) == job.id, request.headers
        await self.answer(request, status, body, job=True)
        try:
            async with asyncio.timeout(_WAIT):
                return Answered(value=await job.result(timeout=_ANSWER_WAIT))
        except ServiceError as exc:
            return Answered(error=exc)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def foreign() -> AsyncIterator[Foreign]:
    """One client for the module on its own namespace and the foreign server answering it;
    closed, and what the client, the spy and any App declared deleted, after the module."""
    settings = quick_settings(f"{RUN_PREFIX}h12", default_deadline=_ANSWER_WAIT)
    client = Client(settings)
    env = Foreign(client)
    try:
        await client.start()
        env.reconnects = sample("burrow_amqp_reconnects_total", link=client.link.name)
        await env.start()
        yield env
    finally:
        await env.close()
        await client.close()
        for app in env.apps:
            await app.stop()
        await delete_topology(client_topology(settings), *(app.topology for app in env.apps))
        await delete_entities([env.queue], [], AMQP_URL)


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """How one answer carries `x-status`: `value` (None: left out), other headers sent with
    it, or no header table at all; `failed`: the client must read the answer as an error;
    `unreadable`: x-status arrives undecodable, so the client raises `Internal` instead."""

    label: str
    value: Field | None
    failed: bool
    extra: tuple[tuple[ShortStr, Field], ...] = ()
    table: bool = True
    timestamp: int | None = None  # the `timestamp` property, raw (H2: beyond year 9999)
    unreadable: bool = False


def status_cases() -> list[Status]:
    """`error` as text (a string or UTF-8 bytes) is an error; any other value, type or none
    is a success; an undecodable one is unreadable; `error` is still read when another header
    is undecodable."""
    return [
        Status("S-error", S("error"), True),
        Status("x-error", x(b"error"), True),
        Status("S-ok", S("ok"), False),
        Status("x-ok", x(b"ok"), False),
        Status("S-upper", S("ERROR"), False),
        Status("x-upper", x(b"ERROR"), False),
        Status("S-error-space", S("error "), False),
        Status("S-empty", S(""), False),
        Status("S-not-utf8", S(NOT_UTF8 + b"error"), False),
        Status("x-not-utf8", x(NOT_UTF8 + b"error"), False),
        *(Status(label, value, False) for label, value in non_text()),
        Status("V", V(), False),
        Status("F-holding", F({H_STATUS: S("error")}), False),
        Status("A-holding", A([S("error")]), False),
        Status("absent", None, False),
        Status("no-header-table", None, False, table=False),
        Status("T-beyond-9999", T(2**62), False, unreadable=True),
        Status("F-33-deep", nested_table(33, leaf=S("error")), False, unreadable=True),
        Status("A-33-deep", nested_array(33, leaf=S("error")), False, unreadable=True),
        Status("F-2000-deep", nested_table(2000, leaf=S("error")), False, unreadable=True),
        Status("A-2000-deep", nested_array(2000, leaf=S("error")), False, unreadable=True),
        Status("S-error+undecodable-name", S("error"), True, ((NOT_UTF8 + b"-name", S("v")),)),
        Status("S-error+T-beyond-9999", S("error"), True, (("x-when", T(2**62)),)),
        Status("S-error+timestamp-property-beyond-9999", S("error"), True, timestamp=2**63),
        Status("S-ok+timestamp-property-beyond-9999", S("ok"), False, timestamp=2**63),
    ]


def error_body(code: str, label: str) -> dict[str, Any]:
    """A valid error body (§11) of `code`, its message, details and retryable telling it
    apart (retryable the opposite of the code's default)."""
    return {
        "code": code,
        "message": f"h12 {label}: refused by the foreign server ({secrets.token_hex(4)})",
        "details": {"case": label, "n": 1},
        "retryable": code not in RETRYABLE_BY_DEFAULT,
    }


@dataclass(frozen=True, slots=True)
class Raised:
    """The ServiceError an answer must raise: exactly `cls`, its message (`prefix`: starting
    with it), and its details and retryable when given."""

    cls: type[ServiceError]
    message: str
    details: dict[str, Any] | None = None
    retryable: bool | None = None
    prefix: bool = False


def raised_for(body: dict[str, Any]) -> Raised:
    """What a valid error body must raise."""
    return Raised(CLASSES[body["code"]], body["message"], body["details"], body["retryable"])


UNREADABLE = Raised(Internal, "the answer's x-status could not be decoded", {"header": H_STATUS})


def wanted(case: Status, body: dict[str, Any]) -> Raised | Any:
    """How the client must end an answer of `case` carrying the error `body`."""
    if case.unreadable:
        return UNREADABLE
    return raised_for(body) if case.failed else body


def problem(answered: Answered, want: Raised | Any, label: str) -> str | None:
    """Why the answer did not end as wanted (a `Raised`, or the value returned), or None."""
    error = answered.error
    if not isinstance(want, Raised):
        if error is not None:
            return f"{label}: want the body returned as a success, got {error!r}"
        return None if answered.value == want else f"{label}: returned {answered.value!r}"
    if error is None:
        return f"{label}: want {want.cls.__name__} raised, got the value {answered.value!r}"
    wrong = []
    if type(error) is not want.cls:
        wrong.append(f"{type(error).__name__}, want {want.cls.__name__}")
    if error.code.value != want.cls.code.value:
        wrong.append(f"code {error.code.value}")
    matched = (
        error.message.startswith(want.message) if want.prefix else error.message == want.message
    )
    if not matched:
        wrong.append(f"message {error.message!r}, want {want.message!r}")
    if want.details is not None and error.details != want.details:
        wrong.append(f"details {error.details!r}, want {want.details!r}")
    if want.retryable is not None and error.retryable is not want.retryable:
        wrong.append(f"retryable {error.retryable}, want {want.retryable}")
    return f"{label}: " + "; ".join(wrong) if wrong else None


@dataclass(frozen=True, slots=True)
class Body:
    """An answer with `x-status` `status` whose body is not a valid error body, and what it
    must raise."""

    label: str
    status: Field
    body: bytes
    want: Raised


def body_cases() -> list[Body]:
    """Error bodies a foreign server may get wrong: not JSON (nor UTF-8, nor anything), not
    an object, an unknown code, no message, details and retryable of the wrong types; and a
    success whose body is not JSON."""
    malformed = Raised(
        Internal, "the answer's body is malformed JSON", {"reason": "json"}, prefix=True
    )
    return [
        Body("error-not-json", S("error"), b"<html>502 Bad Gateway</html>", malformed),
        Body("error-not-utf8", S("error"), NOT_UTF8, malformed),
        Body("error-empty", x(b"error"), b"", malformed),
        Body("error-json-string", S("error"), b'"boom"', Raised(Internal, "malformed error reply")),
        Body("error-json-null", S("error"), b"null", Raised(Internal, "malformed error reply")),
        Body(
            "error-unknown-code",
            S("error"),
            encode({"code": "TEAPOT", "message": "short and stout"}),
            Raised(Internal, "short and stout"),
        ),
        Body(
            "error-no-message",
            S("error"),
            encode({"code": "NOT_FOUND"}),
            Raised(NotFound, "NOT_FOUND", {}, False),
        ),
        Body(
            "error-details-not-object",
            S("error"),
            encode({"code": "UNAVAILABLE", "message": "m", "details": [1], "retryable": "no"}),
            Raised(Unavailable, "m", {}, True),
        ),
        Body("ok-not-json", S("ok"), b"<html>200 OK</html>", malformed),
    ]


def _ids(cases: Sequence[Status | Body]) -> list[Any]:
    return [pytest.param(case, id=case.label) for case in cases]


def assert_clean(
    env: Foreign,
    late: float,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
    label: str,
) -> None:
    """The answer was consumed by what it named: no late reply counted, nothing pending or
    awaited any more, no warning or error logged, no consumer callback failed."""
    assert sample(LATE) == late, f"{label}: the answer was counted as a late reply"
    assert env.client.rpc.pending == {}, f"{label}: a call stays pending"
    assert not list(env.client.rpc.awaiting), f"{label}: a job stays awaited"
    loud = [event for event in logs if event.get("log_level") in ("warning", "error", "critical")]
    assert not loud, f"{label}: logged {loud[:2]}"
    assert_logs_clean(logs, log_records, set())


# -- the tests --------------------------------------------------------------------------------


@MODULE_LOOP
@pytest.mark.parametrize("path", ["call", "job"])
@pytest.mark.parametrize("case", _ids(status_cases()))
async def test_h12_status_of_every_type(
    foreign: Foreign,
    path: str,
    case: Status,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> None:
    """H12: x-status `error` as text raises the answer's error; undecodable, Internal; else ok."""
    late = sample(LATE)
    body = error_body(CALL_CODE if path == "call" else JOB_CODE, case.label)
    answer = foreign.call if path == "call" else foreign.submit
    found = problem(await answer(case, encode(body)), wanted(case, body), f"{path}/{case.label}")
    assert found is None, found
    assert_clean(foreign, late, logs, log_records, case.label)


@MODULE_LOOP
@pytest.mark.parametrize("path", ["call", "job"])
@pytest.mark.parametrize(
    "error",
    [pytest.param((text, code), id=f"{text}-{code}") for text in "Sx" for code in sorted(CLASSES)],
)
async def test_h12_error_of_every_code(
    foreign: Foreign,
    path: str,
    error: tuple[str, str],
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> None:
    """H12: x-status `error` (string or bytes) raises the class of each code, message kept."""
    late = sample(LATE)
    text, code = error
    label = f"{path}/{text}-error/{code}"
    status = Status(label, S("error") if text == "S" else x(b"error"), True)
    body = error_body(code, label)
    answer = foreign.call if path == "call" else foreign.submit
    found = problem(await answer(status, encode(body)), raised_for(body), label)
    assert found is None, found
    assert_clean(foreign, late, logs, log_records, label)


@MODULE_LOOP
@pytest.mark.parametrize("path", ["call", "job"])
@pytest.mark.parametrize("case", _ids(body_cases()))
async def test_h12_malformed_error_body_raises_a_service_error(
    foreign: Foreign,
    path: str,
    case: Body,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> None:
    """H12: a malformed answer body raises a ServiceError (a call counts its code), never hangs."""
    late = sample(LATE)
    label = f"{path}/{case.label}"
    status = Status(label, case.status, True)
    answer = foreign.call if path == "call" else foreign.submit
    outcome = {"operation": ASK, "outcome": case.want.cls.code.value}
    counted = sample(CALLS, **outcome)
    found = problem(await answer(status, case.body), case.want, label)
    assert found is None, found
    if path == "call":
        assert sample(CALLS, **outcome) == counted + 1, f"{label}: not counted as {outcome}"
    assert_clean(foreign, late, logs, log_records, label)


def test_h12_cases_cover_every_h1_field_type() -> None:
    """H12: x-status is sent as every field type H1 enumerates, text, void and undecodable."""
    wanted = {label for label, _ in non_text()} | {f"{label}-error" for label, _ in text_types("")}
    wanted |= {f"{label}-ok" for label, _ in text_types("")}
    wanted |= {"V", "S-not-utf8", "x-not-utf8", "T-beyond-9999", "F-33-deep", "absent"}
    cases = status_cases()
    labels = [case.label for case in cases]
    assert not wanted - set(labels), f"no case for {sorted(wanted - set(labels))}"
    assert len(set(labels)) == len(labels), "two cases with one label"
    errors = {case.label for case in cases if case.failed}
    assert errors == {
        "S-error",
        "x-error",
        "S-error+undecodable-name",
        "S-error+T-beyond-9999",
        "S-error+timestamp-property-beyond-9999",
    }


@MODULE_LOOP
async def test_h12_client_sound_after_the_foreign_answers(foreign: Foreign) -> None:
    """H12: after every foreign answer nothing is pending, and calls and submits still work."""
    env, client = foreign, foreign.client
    late = sample(LATE)
    assert client.rpc.pending == {}, "calls stay pending"
    assert not list(client.rpc.awaiting), "jobs stay awaited"
    assert not env.strays, f"{len(env.strays)} requests no case waited for"
    assert env.amqp is not None
    assert not env.amqp.errors, f"the raw publisher failed: {env.amqp.errors[:2]}"
    assert sample("burrow_amqp_reconnects_total", link=client.link.name) == env.reconnects
    assert client.link.attached == len(client.link.consumers), "the reply consumer was lost"
    assert client.link.ready.is_set(), "the client is not ready"
    ok = Status("S-ok", S("ok"), False)
    assert await env.call(ok, b'{"sum": 3}') == Answered(value={"sum": 3})
    assert await env.submit(ok, b'{"sum": 5}') == Answered(value={"sum": 5})
    app = App(calc, settings=env.settings, http=False)
    env.apps.append(app)
    await app.start()
    await app.wait_ready(30)
    assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}
    with pytest.raises(InvalidArgument, match="division by zero"):
        await client.call("calc.divide", {"a": 1, "b": 0})
    job = await client.submit("calc.add", {"a": 2, "b": 3})
    assert await job.result(timeout=_WAIT) == {"sum": 5}
    assert client.rpc.pending == {}, "calls stay pending"
    assert not list(client.rpc.awaiting), "jobs stay awaited"
    assert sample(LATE) == late, "a reply was counted late"
