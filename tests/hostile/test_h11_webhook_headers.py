"""H11: the gateway's webhook consumer reads its completion headers of every AMQP field type.

The gateway's own service (`service.gateway._webhooks`) consumes the completions published to the
callback route `gateway.webhook` (`<ns>.gateway.webhooks.events`) and POSTs each to the URL its
`x-callback-data` names, with `x-job-id` (else the correlation id) as the webhook's job id and
`x-status: error` making it `job.failed`. Another team's Java or Go service may publish those
completions, so each of the three headers is sent byte-exact through `rawamqp` as every field
type H1 enumerates (long string — UTF-8 and not —, byte array, every integer width, float,
double, decimal, timestamp, bool, void, table, array; over-long, undecodable) to one gateway
on the real broker, with a real aiohttp receiver on loopback, and checked against what
webhooks.py does:

- a usable completion is POSTed once, signed (verified with the Standard Webhooks reference
  library and the configured secret), `webhook-id` the HTTP job id `<operation>.<job id>`;
- an unusable one is parked once in `<ns>.gateway.dlq` with the reason `burrow dlq` reads
  (`x-burrow-dead-reason`) and an error saying why, routed for a replay;
- never an exception in the consumer callback, a requeue or a redelivery; and the last test
  delivers a valid completion after all the hostile ones and checks that every completion sent
  had exactly one ending (nothing lost, nothing twice), the consumer attached and idle.

One gateway serves the whole module (the conftest's namespace fixtures are per test): its
namespace carries the run's prefix, so the session cleanup covers it, and the module fixture
deletes its topology at the end.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web
from pydantic import SecretStr
from standardwebhooks import Webhook

from service._amqp.tools import delivery_from_message
from service._protocol.codec import decode_json
from service._protocol.types import Settle
from service._protocol.vocabulary import (
    H_CALLBACK_DATA,
    H_DEAD_REASON,
    H_JOB_ID,
    H_STATUS,
    H_VERSION,
    Names,
)
from service._serving.dead_letters import DeadLetter
from service.example import calc
from service.gateway._server import Gateway
from service.gateway._webhooks import CALLBACK_ROUTE, callback_data
from tests.conftest import AMQP_URL, RUN_PREFIX, delete_topology, quick_settings
from tests.faults.harness import sample, wait_until
from tests.hostile.conftest import (
    NOT_UTF8,
    Tracker,
    assert_logs_clean,
    new_token,
    non_text,
    probe_body,
    rabbit_queue_counts,
    text_types,
    token_of,
)
from tests.hostile.rawamqp import A, F, Field, Props, RawAmqp, S, T, V, nested_table, x

__all__: list[str] = []

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")  # the tests share the module's gateway
SECRET = "whsec_" + base64.b64encode(b"burrow-h11-webhook-secret-32byte").decode()
OPERATION = "calc.probe"  # the job's operation, as the gateway puts it in x-callback-data
GROUP = "gateway"  # the webhook service's name: its DLQ is <ns>.gateway.dlq
_WAIT = 20.0  # upper bound on one wait; never reached when the consumer behaves
_QUEUE_SETTLE = 12.0  # seconds: more than RabbitMQ's 5 s statistics interval


# -- the receiver, the DLQ observer, the gateway ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Post:
    """One webhook POST the receiver got."""

    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Target:
    """What one completion's header values are made from."""

    url: str  # the receiver's webhook URL
    job_id: str  # sent as x-job-id unless the case says otherwise
    correlation_id: str  # the completion's correlation id (Burrow sets it to the job id)


@dataclass(frozen=True, slots=True)
class Sent:
    """One completion published, and what identifies it."""

    label: str
    token: str
    target: Target
    body: bytes


class Webhooks:
    """The gateway under test (its consumer wrapped by a `Tracker`), the receiver and the
    DLQ observer; every POST and dead letter filed by the token in its body."""

    def __init__(self, gateway: Gateway, tracker: Tracker) -> None:
        self.gateway = gateway
        self.tracker = tracker
        self.url = ""  # the receiver's, once it serves
        self.names = Names(gateway.settings.namespace)
        self.dlq = self.names.dead_letter_queue(GROUP)
        self.queue = self.names.subscription_queue(GROUP, "webhooks")
        self.posts: dict[str, list[Post]] = defaultdict(list)
        self.stray_posts: list[Post] = []
        self.parked: dict[str, list[DeadLetter]] = defaultdict(list)
        self.markers: set[str] = set()
        self.sent: list[Sent] = []
        self.reconnects = self.reconnect_counts()
        self.amqp: RawAmqp | None = None
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def receive(self, request: web.Request) -> web.Response:
        """The webhook receiver: record the POST, answer 200."""
        post = Post(dict(request.headers), await request.read())
        token = token_of(post.body)
        if token is None:
            self.stray_posts.append(post)
        else:
            self.posts[token].append(post)
        return web.Response(status=200)

    async def watch(self) -> None:
        """Open the raw publisher and consume the gateway's DLQ (declared by the gateway)."""
        self.amqp = await RawAmqp.connect()
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        self._channel = channel = await self._connection.channel()
        queue = await channel.declare_queue(self.dlq, passive=True)
        await queue.consume(self._on_dead, no_ack=True)

    async def close(self) -> None:
        """Close the publisher and the observer (the gateway is stopped by the fixture)."""
        if self.amqp is not None:
            await self.amqp.close()
        if self._connection is not None:
            await self._connection.close()

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        if message.body.startswith(b"marker-"):
            self.markers.add(message.body.decode())
            return
        self.parked[token_of(message.body) or "(no token)"].append(
            DeadLetter.from_delivery(delivery_from_message(message), full=True)
        )

    def reconnect_counts(self) -> dict[str, float]:
        """The process's AMQP reconnects so far, per link kind."""
        return {
            link: sample("burrow_amqp_reconnects_total", link=link)
            for link in ("consumer", "publisher")
        }

    def target(self) -> Target:
        """Fresh ids for one completion."""
        return Target(self.url, f"j{secrets.token_hex(8)}", f"c{secrets.token_hex(8)}")

    async def publish(
        self, label: str, headers: dict[str, Field], target: Target, *, correlated: bool = True
    ) -> Sent:
        """Publish one completion to the callback route, as a foreign service would."""
        assert self.amqp is not None
        token = new_token()
        body = probe_body(token)
        published = await self.amqp.publish(
            self.names.events_exchange,
            CALLBACK_ROUTE,
            body,
            Props(
                content_type="application/json",
                message_id=f"m-{secrets.token_hex(8)}",
                correlation_id=target.correlation_id if correlated else None,
                type=f"{OPERATION}.completed",
                delivery_mode=2,
                headers=headers,
            ),
            mandatory=True,
        )
        assert published.acked, published
        assert published.returned is None, "the webhook subscription queue is not bound"
        sent = Sent(label, token, target, body)
        self.sent.append(sent)
        return sent

    async def ended(self, sent: Sent) -> None:
        """Wait until the completion was POSTed or parked and its deliveries settled."""

        def done() -> bool:
            seen = self.tracker.of(sent.token)
            ending = sent.token in self.posts or sent.token in self.parked
            return ending and bool(seen) and all(record.done for record in seen)

        await wait_until(done, _WAIT, f"{sent.label}: a POST or a dead letter")

    async def barrier(self) -> None:
        """A marker behind every dead letter published so far: what is not observed after
        this was never parked."""
        assert self._channel is not None
        marker = f"marker-{secrets.token_hex(6)}"
        await self._channel.default_exchange.publish(
            aio_pika.Message(marker.encode()), routing_key=self.dlq
        )
        await wait_until(lambda: marker in self.markers, _WAIT, "the marker behind the DLQ")

    def delivery_problems(self, sent: Sent) -> list[str]:
        """The consumer's handling of one completion: one delivery, acked by its callback,
        which did not raise."""
        seen = self.tracker.of(sent.token)
        found = [] if len(seen) == 1 else [f"delivered {len(seen)} times"]
        for record in seen:
            if record.error is not None:
                found.append(f"the consumer callback raised {record.error!r}")
            if record.settled is not Settle.ACK:
                found.append(f"settled {record.settled}, not acked")
            if record.delivery.redelivered:
                found.append("redelivered")
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def webhooks() -> AsyncIterator[Webhooks]:
    """One gateway for the module (quick retries, callbacks to 127.0.0.1 allowed, signed with
    SECRET), a receiver on a free loopback port and the DLQ observer; all stopped and the
    gateway's topology deleted after the module."""
    settings = quick_settings(
        f"{RUN_PREFIX}h11",
        retry_base_delay=0.2,
        max_retries=1,
        gateway_port=0,
        gateway_host="127.0.0.1",
        gateway_api_keys=SecretStr("h11-key"),
        gateway_callback_hosts="127.0.0.1",
        gateway_webhook_secret=SecretStr(SECRET),
        gateway_webhook_timeout=5.0,
    )
    gateway = Gateway(calc, settings=settings)
    tracker = Tracker()
    consumer = gateway.app.transport.consumer
    consumer.replace_consumers(tracker.wrap(spec) for spec in consumer.consumers)
    env = Webhooks(gateway, tracker)
    receiver = web.Application()
    runner = web.AppRunner(receiver, access_log=None)
    receiver.router.add_post("/hook", env.receive)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        env.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        await gateway.start()
        await gateway.wait_ready(30)
        await env.watch()
        yield env
    finally:
        await env.close()
        await gateway.stop()
        await runner.cleanup()
        await delete_topology(gateway.app.topology)


# -- what a completion must end as ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Posted:
    """POSTed once, signed, naming the job by `job` (`header`: the x-job-id sent,
    `correlation`: the correlation id), as `job.failed` when `failed`."""

    job: str = "header"
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Parked:
    """Parked once in the gateway's DLQ with `reason`, an error of `code` whose message (as
    `burrow dlq list` shows it) contains `says`, and its original route kept for a replay."""

    reason: str
    code: str
    says: str


Ending = Posted | Parked

POSTED = Posted()
FROM_CORRELATION = Posted(job="correlation")
FAILED = Posted(failed=True)


def no_usable(header: str) -> Parked:
    """Refused by the handler: it cannot use the header (non-retryable, parked at once)."""
    return Parked("failed", "INVALID_ARGUMENT", header)


def refused_url(says: str) -> Parked:
    """Refused by the callback policy (`FailedPrecondition`, parked at once)."""
    return Parked("failed", "FAILED_PRECONDITION", says)


def undecodable(header: str) -> Parked:
    """Refused before the handler: the header cannot be decoded (reason `undecodable`)."""
    return Parked("undecodable", "INVALID_ARGUMENT", f"header {header!r}")


def _posted_problem(env: Webhooks, sent: Sent, want: Posted) -> str | None:
    posts, parked = env.posts.get(sent.token, []), env.parked.get(sent.token, [])
    if len(posts) != 1 or parked:
        return f"want {want}: got {len(posts)} POSTs and {len(parked)} dead letters"
    post = posts[0]
    job_id = sent.target.job_id if want.job == "header" else sent.target.correlation_id
    webhook_id = f"{OPERATION}.{job_id}"
    if post.headers.get("webhook-id") != webhook_id:
        return f"webhook-id {post.headers.get('webhook-id')!r}, want {webhook_id!r}"
    try:
        payload = Webhook(SECRET).verify(post.body, post.headers)
    except Exception as exc:
        return f"the signature does not verify with the configured secret: {exc!r}"
    status = "failed" if want.failed else "completed"
    wanted = {
        "type": f"job.{status}",
        "data": {
            "job_id": webhook_id,
            "operation": OPERATION,
            "status": status,
            ("error" if want.failed else "result"): decode_json(sent.body),
        },
    }
    got = {"type": payload.get("type"), "data": payload.get("data")}
    return None if got == wanted else f"POSTed {got!r}, want {wanted!r}"


def _parked_problem(env: Webhooks, sent: Sent, want: Parked) -> str | None:
    posts, parked = env.posts.get(sent.token, []), env.parked.get(sent.token, [])
    if len(parked) != 1 or posts:
        ids = [post.headers.get("webhook-id") for post in posts]
        return f"want {want}: got {len(parked)} dead letters and POSTs with webhook-id {ids}"
    letter = parked[0]
    raw_reason = letter.headers.get(H_DEAD_REASON)
    error = letter.error if isinstance(letter.error, dict) else {}
    shown = str(letter.summary()["error"] or "")
    problems = []
    if letter.reason != want.reason or raw_reason != want.reason:
        problems.append(f"reason {letter.reason!r} ({H_DEAD_REASON} {raw_reason!r})")
    if error.get("code") != want.code:
        problems.append(f"error code {error.get('code')!r}")
    if want.says not in shown:
        problems.append(f"error message {shown!r}")
    if (letter.original_exchange, letter.original_routing_key) != (
        env.names.events_exchange,
        CALLBACK_ROUTE,
    ):
        problems.append(f"route {letter.original_exchange}/{letter.original_routing_key}")
    if letter.problem is not None:
        problems.append(f"the DLQ tool cannot read it: {letter.problem}")
    return f"want {want}: " + ", ".join(problems) if problems else None


def ending_problem(env: Webhooks, sent: Sent, want: Ending) -> str | None:
    """Why `sent` did not end as `want`, or None."""
    if isinstance(want, Posted):
        return _posted_problem(env, sent, want)
    return _parked_problem(env, sent, want)


# -- the cases --------------------------------------------------------------------------------

Make = Callable[[Target], Field]


@dataclass(frozen=True, slots=True)
class Case:
    """One completion: `header` made by `value` (None: left out), the others valid; the
    endings any of which is right."""

    header: str
    label: str
    value: Make | None
    expect: Sequence[Ending]
    correlated: bool = True  # the completion carries a correlation id


def valid_headers(target: Target) -> dict[str, Field]:
    """The headers of a completion the gateway itself would receive for its own submit."""
    return {
        H_JOB_ID: S(target.job_id),
        H_STATUS: S("ok"),
        H_VERSION: S("1"),
        H_CALLBACK_DATA: S(callback_data(target.url, OPERATION)),
    }


def _const(value: Field) -> Make:
    return lambda _target: value


def _data(url: Callable[[str], str] = lambda url: url, operation: str = OPERATION) -> Make:
    """x-callback-data as the gateway writes it, with the URL (and operation) changed."""
    return lambda target: S(callback_data(url(target.url), operation))


def _json(text: Callable[[str], str]) -> Make:
    """x-callback-data as the given text, made from the receiver's URL."""
    return lambda target: S(text(target.url))


def _typed(header: str, expect: Ending, number: int = 1) -> list[Case]:
    """Every non-text field type H1 sends (`non_text`) and void, all ending as `expect`."""
    typed = [*non_text(number), ("V", V())]
    return [Case(header, label, _const(value), [expect]) for label, value in typed]


def _undecodable(header: str) -> list[Case]:
    """What the AMQP decoder marks undecodable (H2): a timestamp beyond year 9999, a table
    nested deeper than 32 levels."""
    return [
        Case(header, "T-beyond-9999", _const(T(2**62)), [undecodable(header)]),
        Case(header, "F-33-deep", _const(nested_table(33)), [undecodable(header)]),
    ]


def callback_data_cases() -> list[Case]:
    """x-callback-data: text (a string or UTF-8 bytes) of JSON naming an allowed http(s) URL
    and the operation is POSTed there; any other type, undecodable text, other JSON or a URL
    the policy refuses is parked `failed`."""
    h = H_CALLBACK_DATA
    data = no_usable(h)
    return [
        Case(h, "S", lambda target: S(callback_data(target.url, OPERATION)), [POSTED]),
        Case(h, "x", lambda t: x(callback_data(t.url, OPERATION).encode()), [POSTED]),
        # No length limit on a completion (4,096 characters is the submit's, protocol §3).
        Case(
            h,
            "S-over-4096-chars",
            _json(lambda url: f'{{"url":"{url}","operation":"{OPERATION}","p":"{"p" * 4200}"}}'),
            [POSTED],
        ),
        Case(
            h,
            "S-url-over-2048-chars",
            _data(lambda url: f"{url}?q={'a' * 2100}"),
            [refused_url("longer than 2048")],
        ),
        Case(
            h,
            "S-not-utf8",
            lambda target: S(NOT_UTF8 + callback_data(target.url, OPERATION).encode()),
            [data],
        ),
        Case(
            h,
            "x-not-utf8",
            lambda target: x(NOT_UTF8 + callback_data(target.url, OPERATION).encode()),
            [data],
        ),
        Case(h, "S-empty", _const(S("")), [data]),
        Case(h, "S-not-json", _json(lambda url: url), [data]),
        Case(h, "S-json-array", _json(lambda url: f'["{url}", "{OPERATION}"]'), [data]),
        Case(h, "S-no-operation", _json(lambda url: f'{{"url": "{url}"}}'), [data]),
        Case(
            h, "S-url-not-text", _json(lambda _url: '{"url": 1, "operation": "calc.probe"}'), [data]
        ),
        Case(
            h,
            "S-host-not-allowed",
            _data(lambda _url: "http://example.test/hook"),
            [refused_url("not allowed")],
        ),
        Case(
            h,
            "S-credentials",
            _data(lambda url: url.replace("http://", "http://user:pw@")),
            [refused_url("credentials")],
        ),
        Case(
            h,
            "S-ftp",
            _data(lambda url: url.replace("http://", "ftp://")),
            [refused_url("http:// or https://")],
        ),
        Case(
            h,
            "S-port-out-of-range",
            _data(lambda _url: "http://127.0.0.1:99999/hook"),
            [refused_url("cannot be parsed")],
        ),
        *_typed(h, data),
        Case(
            h,
            "F-holding",
            lambda target: F({"url": S(target.url), "operation": S(OPERATION)}),
            [data],
        ),
        Case(h, "A-holding", lambda target: A([S(callback_data(target.url, OPERATION))]), [data]),
        Case(h, "absent", None, [data]),
        *_undecodable(h),
        Case(
            h,
            "S-operation-with-crlf",
            _data(operation=f"{OPERATION}\r\nx-injected: 1"),
            [data],
        ),
    ]


def job_id_cases() -> list[Case]:
    """x-job-id: text (a string or UTF-8 bytes) names the webhook's job; any other type,
    undecodable or empty text falls back to the correlation id."""
    h = H_JOB_ID
    absent_id = (
        Parked("failed", "INVALID_ARGUMENT", h),
        Parked("invalid", "INVALID_ARGUMENT", h),
    )
    return [
        Case(h, "S", lambda target: S(target.job_id), [POSTED]),
        Case(h, "x", lambda target: x(target.job_id.encode()), [POSTED]),
        Case(h, "S-empty", _const(S("")), [FROM_CORRELATION]),
        Case(h, "S-not-utf8", lambda t: S(NOT_UTF8 + t.job_id.encode()), [FROM_CORRELATION]),
        Case(h, "x-not-utf8", lambda t: x(NOT_UTF8 + t.job_id.encode()), [FROM_CORRELATION]),
        *_typed(h, FROM_CORRELATION),
        Case(h, "F-holding", lambda t: F({H_JOB_ID: S(t.job_id)}), [FROM_CORRELATION]),
        Case(h, "A-holding", lambda t: A([S(t.job_id)]), [FROM_CORRELATION]),
        Case(h, "absent", None, [FROM_CORRELATION]),
        *_undecodable(h),
        Case(
            h,
            "S-bad-id",
            _const(S("not a job id!")),
            [FROM_CORRELATION],
        ),
        Case(
            h,
            "S-too-long",
            _const(S("j" * 65)),
            [FROM_CORRELATION],
        ),
        Case(
            h,
            "S-with-crlf",
            lambda t: S(f"{t.job_id}\r\nx-injected: 1"),
            [FROM_CORRELATION],
        ),
        Case(
            h,
            "absent-no-correlation-id",
            None,
            absent_id,
            correlated=False,
        ),
    ]


def status_cases() -> list[Case]:
    """x-status: text equal to `error` makes the webhook `job.failed`; any other value or
    type is `job.completed`."""
    h = H_STATUS
    return [
        Case(h, "S-error", _const(S("error")), [FAILED]),
        Case(h, "S-ok", _const(S("ok")), [POSTED]),
        Case(h, "x-ok", _const(x(b"ok")), [POSTED]),
        Case(
            h,
            "x-error",
            _const(x(b"error")),
            [FAILED],
        ),
        Case(h, "S-upper", _const(S("ERROR")), [POSTED]),
        Case(h, "S-not-utf8", _const(S(NOT_UTF8 + b"error")), [POSTED]),
        Case(h, "x-not-utf8", _const(x(NOT_UTF8)), [POSTED]),
        *_typed(h, POSTED),
        Case(h, "F-holding", _const(F({H_STATUS: S("error")})), [POSTED]),
        Case(h, "A-holding", _const(A([S("error")])), [POSTED]),
        Case(h, "absent", None, [POSTED]),
        *_undecodable(h),
    ]


def _params(cases: Sequence[Case]) -> list[Any]:
    return [pytest.param(case, id=f"{case.header}/{case.label}") for case in cases]


async def run_case(
    env: Webhooks,
    case: Case,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> None:
    """Publish the case's completion, wait for its ending, compare; then the consumer's
    handling of it (one delivery, acked, no exception anywhere) and the logs."""
    target = env.target()
    headers = valid_headers(target)
    if case.value is None:
        del headers[case.header]
    else:
        headers[case.header] = case.value(target)
    label = f"{case.header}/{case.label}"
    sent = await env.publish(label, headers, target, correlated=case.correlated)
    await env.ended(sent)
    problems = [ending_problem(env, sent, want) for want in case.expect]
    assert None in problems, f"{label}: " + " | ".join(map(str, problems))
    handled = env.delivery_problems(sent)
    assert not handled, f"{label}: " + ", ".join(handled)
    crashed = [event for event in logs if event.get("event") == "handler raised"]
    assert not crashed, f"{label}: the handler raised an unexpected exception: {crashed[:1]}"
    assert_logs_clean(logs, log_records, {sent.token})


# -- the tests --------------------------------------------------------------------------------


@MODULE_LOOP
@pytest.mark.parametrize("case", _params(callback_data_cases() + job_id_cases() + status_cases()))
async def test_h11_completion_headers_of_every_type(
    webhooks: Webhooks,
    case: Case,
    logs: list[MutableMapping[str, Any]],
    log_records: pytest.LogCaptureFixture,
) -> None:
    """H11: each completion header of each AMQP type is POSTed or parked as its case list says."""
    await run_case(webhooks, case, logs, log_records)


def test_h11_cases_cover_every_h1_field_type() -> None:
    """H11: each header is sent as every field type H1 enumerates, text and void included."""
    wanted = {label for label, _ in non_text()} | {label for label, _ in text_types("")}
    wanted |= {"V", "S-not-utf8", "x-not-utf8", "T-beyond-9999", "F-33-deep", "absent"}
    for cases in (callback_data_cases(), job_id_cases(), status_cases()):
        labels = {case.label for case in cases}
        header = cases[0].header
        missing = wanted - labels - ({"S", "x"} if header == H_STATUS else set())
        assert not missing, f"{header}: no case for {sorted(missing)}"
        assert len(labels) == len(cases), f"{header}: two cases with one label"


@MODULE_LOOP
async def test_h11_consumer_delivers_after_the_hostile_completions(webhooks: Webhooks) -> None:
    """H11: after every hostile completion a valid one is POSTed and none was lost or doubled."""
    env = webhooks
    target = env.target()
    last = await env.publish("valid-last", valid_headers(target), target)
    await env.ended(last)
    assert ending_problem(env, last, POSTED) is None, ending_problem(env, last, POSTED)
    await env.barrier()
    await asyncio.sleep(0.3)  # a duplicate POST or a late retry would arrive in this time
    endings = {
        sent.label: len(env.posts.get(sent.token, [])) + len(env.parked.get(sent.token, []))
        for sent in env.sent
    }
    wrong = {label: count for label, count in endings.items() if count != 1}
    assert not wrong, f"completions without exactly one ending (POST or dead letter): {wrong}"
    sent_tokens = {sent.token for sent in env.sent}
    assert not env.stray_posts, f"{len(env.stray_posts)} POSTs of no completion sent"
    assert set(env.posts) | set(env.parked) <= sent_tokens, "an ending of no completion sent"
    problems = env.tracker.problems()
    assert not problems, "\n".join(problems[:20])
    await wait_until(lambda: not env.tracker.busy(), _WAIT, "every consumer callback to return")
    app = env.gateway.app
    assert env.reconnect_counts() == env.reconnects, "the gateway reconnected"
    consumer = app.transport.consumer
    assert consumer.attached == len(consumer.consumers), "a consumer was lost"
    assert app.health.ready, app.health.problems()
    assert sample("burrow_handler_in_progress", service=GROUP) == 0
    deadline = time.monotonic() + _QUEUE_SETTLE
    while True:
        counts = await asyncio.to_thread(rabbit_queue_counts, env.names.namespace)
        left = {name: counts[name] for name in (env.queue,) if any(counts.get(name, (0, 0)))}
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert not left, f"messages left (ready, unacked) in the webhook queue: {left}"
