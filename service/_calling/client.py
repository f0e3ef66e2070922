"""`Client`: how Python code reaches Burrow services — call, cast, submit, emit, later.

One client per process is enough: it multiplexes any number of concurrent calls over one
connection and one channel. Every call, cast, submit and event can carry the caller's own
message headers (`headers=`: an API token, a tenant), which the service's middleware reads in
`request.delivery.headers`; Burrow's protocol headers are Burrow's to set.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from service._amqp.link import LinkFactory, Outbound, publish_event
from service._amqp.transport import AmqpLink
from service._calling.jobs import Job, Reader
from service._calling.rpc_client import RpcClient, tag
from service._protocol import codec, tracing, vocabulary
from service._protocol.config import Settings, settings_from
from service._protocol.errors import Internal, NotFound, QueueFull, ServiceError
from service._protocol.jobs import JobState, JobStatus
from service._protocol.messages import (
    command,
    due_time,
    event_message,
    schedule,
    submit_request,
    version_header,
)
from service._protocol.registry import Operation
from service._protocol.topology import client_topology
from service._protocol.types import Outgoing
from service._protocol.vocabulary import (
    BURROW_HEADER_PREFIX,
    H_JOB_ID,
    H_KIND,
    H_VERSION,
    Kind,
    Names,
    PublishKind,
)
from service._stores.base import JobStore
from service._stores.registry import job_store_from_url

M = TypeVar("M", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)

# What a caller's own header may hold (AMQP field-table values Burrow passes on unchanged).
HeaderValue = str | int | float | bool | bytes
Headers = Mapping[str, HeaderValue]

# Burrow's protocol headers (every `H_*` of the vocabulary, lower-cased) and its prefix: a
# caller's header may set none of them.
PROTOCOL_HEADERS = frozenset(
    value.lower()
    for name, value in vars(vocabulary).items()
    if name.startswith("H_") and isinstance(value, str)
)
_MAX_NAME_BYTES = 255  # an AMQP short string
_INT_RANGE = range(-(2**63), 2**63)  # a signed 64-bit field-table integer


class Client:
    """Calls operations of Burrow services over AMQP.

    Example:
        async with Client() as client:
            reply = await client.call("calc.add", {"a": 1, "b": 2})  # {"sum": 3}

    Args:
        settings: what to connect to (default: from `BURROW_*` environment variables).
        link_factory: how the AMQP link is made (the in-memory test broker passes its own).
        outbound: layers around every publish this client makes (`service.Outbound`).
        overrides: `Settings` fields over `settings` (`namespace="orders"`); a name that is no
            setting raises `ConfigError` naming the closest one.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        link_factory: LinkFactory = AmqpLink,
        outbound: Sequence[Outbound] = (),
        **overrides: Any,
    ) -> None:
        self.settings = settings_from(settings, overrides, _ARGUMENTS)
        self.names = Names(self.settings.namespace)
        self.link = link_factory("client", self.settings, topology=client_topology(self.settings))
        self.link.use(*outbound)
        self.rpc = RpcClient(self.link, self.settings)
        self._jobs: JobStore | None = None  # opened by the first `job(id)` without a route

    async def start(self, timeout: float | None = None) -> None:
        """Connect and attach the reply consumer; raise `Unavailable` if the broker is away."""
        tracing.refresh()  # an SDK TracerProvider installed by now records spans
        self.link.start()
        await self.link.wait_ready(self.settings.connect_timeout if timeout is None else timeout)

    async def close(self) -> None:
        """Close the connection; pending calls fail with `ConnectionLost`."""
        await self.link.close()
        if self._jobs is not None:
            await self._jobs.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @overload
    async def call(
        self,
        operation: Operation[Any, Rep],
        payload: Any,
        *,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
    ) -> Rep: ...

    @overload
    async def call(
        self,
        operation: str,
        payload: Any,
        *,
        reply: type[M],
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
    ) -> M: ...

    @overload
    async def call(
        self,
        operation: str,
        payload: Any,
        *,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
    ) -> Any: ...

    async def call(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        reply: type[BaseModel] | None = None,
        timeout: float | None = None,
        fallback_to_submit: bool = False,
        headers: Headers | None = None,
    ) -> Any:
        """Call an operation and wait for its reply, at most `timeout` seconds.

        Args:
            operation: `"service.operation"`, or a declared `Operation` for a typed reply.
            payload: a pydantic model, or anything JSON-serialisable (dict, list…).
            reply: model to validate the reply into (default: the decoded JSON).
            timeout: the call's deadline in seconds (default: `BURROW_DEFAULT_DEADLINE`).
            fallback_to_submit: when the request queue is full (`QueueFull`), submit the
                request as a job instead and wait for its result within the same deadline.
            headers: message headers of the caller's own (`{"x-service-token": "…"}`), which
                the service reads in `request.delivery.headers`.

        Integers keep their exact value at any size, in the payload and in the reply.

        Raises:
            ServiceError: the remote error, typed by its code; `DeadlineExceeded` at the
                deadline; `ConnectionLost` if the connection drops while waiting. Its note
                names the request (`message_id=… correlation_id=…`).
            ValueError: the payload holds NaN or ±Infinity, which JSON cannot carry; a header
                is one of Burrow's protocol headers.
            TypeError: a header's value is not str, int, float, bool or bytes.
        """
        route, reply = _route(operation), reply or _reply_model(operation)
        timeout = self.settings.default_deadline if timeout is None else timeout
        started = time.monotonic()
        sent = {**check_headers(headers), **version_header(operation)}
        body = codec.encode(payload)

        def decode(answer: bytes) -> Any:
            return codec.decode_answer(answer, reply)

        try:
            return await self.rpc.call(route, body, decode, timeout=timeout, headers=sent)
        except QueueFull:
            if not fallback_to_submit:
                raise
            job = await self._submit(route, body, callback=None, due_at=None, headers=sent)
            remaining = max(0.001, timeout - (time.monotonic() - started))
            try:
                result = await job.result(timeout=remaining)
            except ServiceError as exc:
                tag(exc, job_id=job.id)
                raise
            return codec.validate_answer(reply, result) if reply is not None else result

    async def cast(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
    ) -> str:
        """Fire-and-forget: return the message id once the broker has confirmed the command.

        Args:
            delay: deliver this many seconds from now instead of now.
            at: deliver at this (timezone-aware) time instead of now.
            headers: message headers of the caller's own (as for `call`).

        Raises:
            ServiceError: the broker refused it (`Unroutable`…), noted with its `message_id`.
        """
        message = command(
            self.names,
            _route(operation),
            codec.encode(payload),
            Kind.CAST,
            trace=tracing.current(),
            headers={**check_headers(headers), **version_header(operation)},
        )
        try:
            await self._publish_command(message, due_time(delay, at))
        except ServiceError as exc:
            tag(exc, message_id=message.message_id)
            raise
        return message.message_id

    async def submit(
        self,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        callback: str | None = None,
        callback_data: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
    ) -> Job:
        """Hand work over; return its `Job` once the broker has confirmed it.

        The completion is pushed to this client (no extra round trip for `Job.result`); the
        service also keeps it in its job store for `BURROW_JOB_RESULT_TTL` seconds after the
        job ended, and announces it as the `<service>.<op>.completed` (or `.failed`) event.

        Args:
            callback: also publish the completion on the events exchange with this key.
            callback_data: text (at most 4,096 characters) the service copies onto that
                completion only, for the callback's consumer (`x-callback-data`).
            delay: start the job this many seconds from now.
            at: start the job at this (timezone-aware) time.
            headers: message headers of the caller's own (as for `call`).

        Raises:
            ServiceError: the broker refused it (`Unroutable`…), noted with its `message_id`
                (the job id).
        """
        return await self._submit(
            _route(operation),
            codec.encode(payload),
            callback=callback,
            callback_data=callback_data,
            due_at=due_time(delay, at),
            headers={**check_headers(headers), **version_header(operation)},
        )

    def job(self, job_id: str, route: str = "", *, headers: Headers | None = None) -> Job:
        """A handle on a job submitted elsewhere (or before a restart), by its id.

        With its `route` (`"calc.add"`), the handle asks the service for the record, from
        anywhere, with `headers` (the caller's own, as for `call`: the service's middleware
        sees these reads too). Without it, it reads `BURROW_JOB_STORE_URL` itself: the same
        store the service writes (Redis, or the SQLite file of this machine).
        """
        return Job(job_id, route, self._reader(check_headers(headers)))

    def _reader(self, headers: dict[str, HeaderValue]) -> Reader:
        """How a `Job` reads its record: `_read_job`, sending `headers` when it asks."""
        if not headers:
            return self._read_job

        async def read(job_id: str, route: str) -> JobStatus | None:
            return await self._read_job(job_id, route, headers)

        return read

    async def _read_job(
        self, job_id: str, route: str, headers: Headers | None = None
    ) -> JobStatus | None:
        if not route:
            if self._jobs is None:
                self._jobs = job_store_from_url(self.settings.job_store_url)
            record = await self._jobs.get(self.names.job_key(job_id))
            return None if record is None else JobStatus.of(job_id, record)

        def decode(answer: bytes) -> JobStatus:
            # The record as `schemas/job-status.json` says, read inside the call: one another
            # team's service got wrong is counted (and raised) as Internal.
            found = codec.decode_answer(answer)
            try:
                state = JobState(found["state"])
                if state is JobState.RUNNING:
                    return JobStatus(job_id, state)
                failed = state is JobState.FAILED
                value = found["error" if failed else "result"]
                return JobStatus.ended(job_id, value, failed=failed)
            except (TypeError, KeyError, ValueError):
                raise Internal(f"malformed job status from {route[:128]!r}") from None

        try:
            return await self.rpc.call(
                route,
                b"{}",
                decode,
                headers={**(headers or {}), H_KIND: Kind.RESULT, H_JOB_ID: job_id},
            )
        except NotFound:
            return None

    async def emit(
        self,
        event: str,
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
    ) -> bool:
        """Publish a domain event (confirmed); False when no subscriber queue matched it.

        Args:
            event: its routing key, dot-separated words: `orders.eu.created`.
            delay: publish this many seconds from now (True is returned once scheduled).
            headers: message headers of the caller's own (as for `call`), seen by every
                subscriber.
        """
        message = event_message(
            self.names,
            event,
            codec.encode(payload),
            headers={**check_headers(headers), tracing.HEADER: tracing.child(tracing.current())},
        )
        due_at = due_time(delay, at)
        if due_at is not None:
            await self.link.publish(
                schedule(self.names, message, due_at), kind=PublishKind.SCHEDULED, mandatory=True
            )
            return True
        return await publish_event(self.link, message)

    async def _submit(
        self,
        route: str,
        body: bytes,
        *,
        callback: str | None,
        due_at: float | None,
        headers: dict[str, Any] | None = None,
        callback_data: str | None = None,
    ) -> Job:
        message = submit_request(
            self.names,
            route,
            body,
            trace=tracing.current(),
            callback=callback,
            callback_data=callback_data,
            headers=headers,
        )
        # Its reads (should the pushed completion not come) carry the submit's own headers.
        own = {name: value for name, value in (headers or {}).items() if name != H_VERSION}
        job = Job(message.message_id, route, self._reader(own), pushed=True)
        # Registered before the publish: a fast job's completion may beat the confirm.
        self.rpc.awaiting[job.id] = job
        try:
            await self._publish_command(message, due_at)
        except BaseException as exc:
            self.rpc.awaiting.pop(job.id, None)
            if isinstance(exc, ServiceError):
                tag(exc, message_id=job.id)
            raise
        return job

    async def _publish_command(self, message: Outgoing, due_at: float | None) -> None:
        if due_at is not None:
            message = schedule(self.names, message, due_at)
            await self.link.publish(message, kind=PublishKind.SCHEDULED, mandatory=True)
        else:
            await self.link.publish(message, kind=PublishKind.COMMAND, mandatory=True)


# Client's keyword arguments besides the settings: suggested for a misspelt one.
_ARGUMENTS = ("settings", "link_factory", "outbound")


def check_headers(headers: Headers | None) -> dict[str, HeaderValue]:
    """A caller's own message headers, checked: none may be one of Burrow's protocol headers.

    Raises:
        ValueError: a name is empty, longer than 255 bytes, or one of Burrow's protocol headers
            (every `H_*` of the vocabulary, and any `x-burrow-*`): the error names it.
        TypeError: a value is not str, int, float, bool or bytes (or an int beyond 64 bits).
    """
    if not headers:
        return {}
    checked: dict[str, HeaderValue] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"a header name is non-empty text, not {name!r}")
        if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
            raise ValueError(f"header name {name[:40]!r}… is longer than 255 bytes")
        lowered = name.lower()
        if lowered in PROTOCOL_HEADERS or lowered.startswith(BURROW_HEADER_PREFIX):
            raise ValueError(
                f"{name!r} is one of Burrow's protocol headers: Burrow sets it, a caller cannot"
            )
        if not isinstance(value, str | int | float | bytes):  # bool is an int
            raise TypeError(
                f"header {name!r}: a value is str, int, float, bool or bytes, "
                f"not {type(value).__name__}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and value not in _INT_RANGE:
            raise TypeError(f"header {name!r}: an int header fits in 64 bits")
        checked[name] = value
    return checked


def _route(operation: str | Operation[Any, Any]) -> str:
    return operation.route if isinstance(operation, Operation) else operation


def _reply_model(operation: str | Operation[Any, Any]) -> type[BaseModel] | None:
    return operation.reply if isinstance(operation, Operation) else None
