"""The HTTP face: every operation of the given services as an HTTP API (`burrow gateway`).

The gateway never runs handlers: it calls the operations over AMQP with a `Client`, so it
scales out like any Burrow process. `POST /v1/{service}/{operation}` is a call (200 with the
reply); with RFC 7240 `Prefer: respond-async` it is a submit (202 and `Location:
/v1/jobs/{id}`), and with `Prefer: respond-async, wait=N` a submit answered with 200 when the
job ends within N seconds, else 202 (the job runs once either way). `GET /v1/jobs/{id}` reads
a job from any gateway instance (the id names its operation: a `result` call to the service).
A `Burrow-Callback-Url` on a submit has the completion POSTed there (`_webhooks`). The request
headers named by `BURROW_GATEWAY_FORWARD_HEADERS` travel on as message headers of calls and
submits (`forward_headers` says which names may never be listed, and why). An operation of a
served service that the gateway's copy of the code does not declare (deployed after the
gateway started) is passed on as JSON, checked by the service instead of here.
Errors are RFC 9457 problems; `/openapi.json` describes it all (`_openapi`). The routes are
those of the route table (`_routes.ROUTES`), which the document is generated from too.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from service._amqp.link import LinkFactory
from service._amqp.transport import AmqpLink
from service._calling.client import PROTOCOL_HEADERS, Client
from service._observe import metrics
from service._observe.log import get_logger
from service._protocol import codec, tracing
from service._protocol.config import Settings, header_list, load_settings
from service._protocol.errors import (
    ConfigError,
    DeadlineExceeded,
    ErrorCode,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    ServiceError,
)
from service._protocol.jobs import JobState, JobStatus
from service._protocol.registry import Operation, Service, State
from service._protocol.vocabulary import BURROW_HEADER_PREFIX, H_VERSION
from service._runtime.app import App
from service.gateway._openapi import UNAUTHENTICATED, openapi_document
from service.gateway._routes import API_PREFIX, CALLBACK_HEADER, JOB, ROUTES, Route, split_job_id
from service.gateway._webhooks import CALLBACK_ROUTE, CallbackPolicy, callback_data, webhook_service

# One status per wire code (docs/calling.md); a message too large is 413.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 422,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.RESOURCE_EXHAUSTED: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
# Seconds to suggest in Retry-After for the codes that say "try again later".
RETRY_AFTER_S: dict[ErrorCode, int] = {ErrorCode.RESOURCE_EXHAUSTED: 1, ErrorCode.UNAVAILABLE: 5}
_TITLES = {
    ErrorCode.INVALID_ARGUMENT: "Invalid argument",
    ErrorCode.FAILED_PRECONDITION: "Failed precondition",
    ErrorCode.NOT_FOUND: "Not found",
    ErrorCode.PERMISSION_DENIED: "Permission denied",
    ErrorCode.DEADLINE_EXCEEDED: "Deadline exceeded",
    ErrorCode.RESOURCE_EXHAUSTED: "Resource exhausted",
    ErrorCode.UNAVAILABLE: "Unavailable",
    ErrorCode.INTERNAL: "Internal error",
}
_PROBLEM = "application/problem+json"
API_KEY_HEADER = "X-API-Key"  # the gateway's own key header, beside Authorization: Bearer
_CORS_HEADERS = f"Authorization, Content-Type, Prefer, {API_KEY_HEADER}, {CALLBACK_HEADER}"
# An operation name the gateway passes on without knowing it (as in a gateway job id).
_OPERATION_NAME = re.compile(r"[a-z][a-z0-9_]*")

# Request headers BURROW_GATEWAY_FORWARD_HEADERS may not name, with why.
_OWN = "the gateway's own"
_HOP = "a hop-by-hop header: it is about the connection to the gateway, not the request"
_FRAMING = "a framing header of the HTTP request itself, not of the message"
NEVER_FORWARDED: dict[str, str] = {
    "authorization": f"{_OWN} API key header: a key for the gateway is never passed on",
    API_KEY_HEADER.lower(): f"{_OWN} API key header: a key for the gateway is never passed on",
    "prefer": f"{_OWN} (respond-async, wait=N)",
    CALLBACK_HEADER.lower(): f"{_OWN} callback header",
    **dict.fromkeys(
        (
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ),
        _HOP,
    ),
    **dict.fromkeys(
        ("content-encoding", "content-length", "content-type", "expect", "host"), _FRAMING
    ),
    tracing.HEADER: "carried on already: the request's trace context continues in the service",
}
_CORS_EXPOSED = "Location, Preference-Applied, Retry-After"

_log = get_logger("burrow.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Prefer:
    """The RFC 7240 preferences the gateway honours; any other is ignored, as the RFC says."""

    respond_async: bool = False
    wait: float | None = None  # seconds


def parse_prefer(values: Sequence[str]) -> Prefer:
    """`Prefer` header values (the header may repeat) → the preferences; a malformed `wait`
    is ignored like an unknown preference."""
    respond_async, wait = False, None
    for value in values:
        for item in value.split(","):
            token, _, rest = item.partition(";")[0].strip().partition("=")
            name = token.strip().lower()
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and wait is None:
                try:
                    seconds = float(rest.strip().strip('"'))
                except ValueError:
                    continue
                if 0 < seconds < float("inf"):
                    wait = seconds
    return Prefer(respond_async, wait)


def problem(exc: ServiceError) -> web.Response:
    """The RFC 9457 answer for a Burrow error: its status, code, details and `retryable`."""
    return _problem(
        http_status(exc),
        exc.code.value,
        title=_TITLES[exc.code],
        detail=exc.message,
        exc=exc,
        headers=retry_after(exc),
    )


def http_status(exc: ServiceError) -> int:
    """The HTTP status of a Burrow error: one per code, 413 for a message too large."""
    return 413 if isinstance(exc, MessageTooLarge) else HTTP_STATUS[exc.code]


def retry_after(exc: ServiceError) -> dict[str, str]:
    """`Retry-After` for the codes that say "try again later", else no header."""
    seconds = RETRY_AFTER_S.get(exc.code)
    return {} if seconds is None else {"Retry-After": str(seconds)}


def _problem(
    status: int,
    code: str,
    *,
    title: str,
    detail: str,
    exc: ServiceError | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {
        "type": f"urn:burrow:error:{code.lower()}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "details": exc.details if exc is not None else {},
        "retryable": exc.retryable if exc is not None else False,
    }
    return web.Response(
        body=codec.encode(body), status=status, content_type=_PROBLEM, headers=headers
    )


def _unauthenticated() -> web.Response:
    response = _problem(
        401,
        UNAUTHENTICATED,
        title="Unauthenticated",
        detail="an API key is needed: Authorization: Bearer <key> or X-API-Key",
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="burrow"'
    return response


class _Observed:
    """The metric children and log label of one route (one path of it), made once."""

    __slots__ = ("codes", "duration", "in_progress", "label")

    def __init__(self, label: str) -> None:
        self.label = label
        self.codes: dict[int, Counter] = {}
        self.duration = metrics.GATEWAY_DURATION.labels(label)
        self.in_progress = metrics.GATEWAY_IN_PROGRESS.labels(label)

    def count(self, code: int) -> None:
        counter = self.codes.get(code)
        if counter is None:
            counter = self.codes[code] = metrics.GATEWAY_REQUESTS.labels(self.label, str(code))
        counter.inc()


class Gateway:
    """An HTTP server for the operations of `services`, calling them over AMQP.

    Args:
        link_factory: how AMQP links are made (the in-memory test broker passes its own).
    """

    # The route table it serves and documents (`_routes`); each names a method of the class.
    routes: Sequence[Route] = ROUTES

    def __init__(
        self,
        *services: Service,
        settings: Settings | None = None,
        link_factory: LinkFactory = AmqpLink,
    ) -> None:
        if not services:
            raise ValueError("Gateway needs at least one Service")
        self.settings = settings = settings or load_settings()
        self.services = services
        self._by_name: Mapping[str, Service] = {svc.name: svc for svc in services}
        # The operations declared at start: documented, and labelled one by one in metrics.
        self.operations: dict[tuple[str, str], Operation[Any, Any]] = {
            (svc.name, op.name): op for svc in services for op in svc.operations.values()
        }
        self._keys = _api_keys(settings)
        self.forward = forward_headers(settings)
        self._cors = frozenset(o.strip() for o in settings.gateway_cors_origins.split(",")) - {""}
        self._cors_headers = ", ".join((_CORS_HEADERS, *self.forward))
        self.policy = CallbackPolicy.from_settings(settings)
        self.client = Client(settings, link_factory=link_factory)
        self.document = codec.encode(
            openapi_document(
                services,
                max_wait=settings.gateway_max_wait,
                auth=self._keys is not None,
                routes=self.routes,
                forward_headers=self.forward,
            )
        )
        self._handlers: list[tuple[Route, Handler]] = [
            (route, getattr(self, route.handler)) for route in self.routes
        ]
        self._table = {(route.method, route.path): route for route in self.routes}
        # One metric child set per path served: each operation's path is a route of its own.
        labels = [
            route.label(path)
            for route in self.routes
            for path, _ in route.paths(self.operations.values())
        ]
        # An operation declared after start is counted under its route's template.
        labels += [route.label(route.path) for route in self.routes if route.per_operation]
        self._observed = {label: _Observed(label) for label in labels}
        self._unmatched = _Observed("unmatched")
        self.port = settings.gateway_port
        self.app = App(
            webhook_service(settings, self.policy),
            settings=settings,
            link_factory=link_factory,
            lifespan=self._serving,
            links=[self.client.link],
        )

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0) or a fatal broker error (exit 1)."""
        return await self.app.run()

    async def start(self) -> None:
        """Start the App (metrics, probes, webhooks), the client and the HTTP API."""
        await self.app.start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the App's links and the client's are connected, consumers attached."""
        await self.app.wait_ready(timeout)
        await self.client.link.wait_ready(timeout)

    async def stop(self) -> None:
        """Stop taking requests, finish the ones in flight, then close."""
        await self.app.stop()

    @asynccontextmanager
    async def _serving(self, _: State) -> AsyncIterator[None]:
        # The App's lifespan: opened before its consumers start, closed after they drained.
        self.client.link.start()  # connects in the background; calls wait within deadlines
        runner = web.AppRunner(
            self.make_app(), access_log=None, shutdown_timeout=self.settings.shutdown_grace
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.settings.gateway_host, self.port).start()
            if self.port == 0:
                self.port = int(runner.addresses[0][1])
            _log.info("gateway serving", port=self.port, operations=len(self.operations))
            yield
        finally:
            await runner.cleanup()  # stops accepting, lets the requests in flight finish
            await self.client.close()

    def make_app(self) -> web.Application:
        """The aiohttp application: the API routes behind auth, metrics and problems."""
        app = web.Application(
            middlewares=[self._observe], client_max_size=self.settings.max_body_bytes
        )
        for route, handler in self._handlers:
            if route.method == "GET":
                app.router.add_get(route.path, handler)  # a GET answers HEAD too
            else:
                app.router.add_route(route.method, route.path, handler)
        return app

    # -- the one middleware ----------------------------------------------------------------

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Per-route RED metrics, one log line, CORS, auth, and every error as a problem."""
        route = self._route_of(request)
        started = time.perf_counter()
        route.in_progress.inc()
        token = tracing.activate(tracing.parse(request.headers.get(tracing.HEADER)))
        try:
            response = await self._answer(request, handler)
        finally:
            tracing.deactivate(token)
            route.in_progress.dec()
        elapsed = time.perf_counter() - started
        route.count(response.status)
        route.duration.observe(elapsed)
        if _log.is_enabled_for(logging.INFO):
            _log.info(
                "http request",
                route=route.label,
                status=response.status,
                duration_ms=round(elapsed * 1000, 3),
                job_id=response.headers.get("Location", "").rpartition("/")[2] or None,
            )
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (origin in self._cors or "*" in self._cors)
        if allowed and request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=204)
        elif request.path.startswith(API_PREFIX) and not self._authorized(request):
            response = _unauthenticated()
        else:
            response = await self._handle(request, handler)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin or ""
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = self._cors_headers
            response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServiceError as exc:
            return problem(exc)
        except web.HTTPRequestEntityTooLarge:
            limit = self.settings.max_body_bytes
            return problem(MessageTooLarge(f"the request body is over {limit} bytes"))
        except web.HTTPException as exc:  # the router's 404 and 405
            if exc.status == 404:
                return problem(NotFound(f"no route {request.path[:200]}"))
            return _problem(exc.status, "INVALID_ARGUMENT", title=exc.reason, detail=exc.reason)
        except Exception:
            _log.exception("gateway request failed", path=request.path[:200])
            return _problem(500, "INTERNAL", title="Internal error", detail="internal error")

    def _route_of(self, request: web.Request) -> _Observed:
        info = request.match_info
        if info.http_exception is not None:
            return self._unmatched
        resource = info.route.resource
        canonical = resource.canonical if resource is not None else ""
        method = "GET" if request.method == "HEAD" else request.method  # a GET answers HEAD
        route = self._table.get((method, canonical))
        if route is None:
            return self._unmatched
        found = self._observed.get(route.label(route.served(info)))
        if found is not None:
            return found
        # An operation of a served service declared after start: its route's template label;
        # a path naming no served service has no label: it is unmatched.
        if route.per_operation and self._passed_on(info["service"], info["operation"]):
            return self._observed.get(route.label(route.path), self._unmatched)
        return self._unmatched

    def _authorized(self, request: web.Request) -> bool:
        if self._keys is None:
            return True
        given = request.headers.get(API_KEY_HEADER)
        if given is None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                return False
            given = token.strip()
        offered = given.encode("utf-8", "surrogateescape")
        # Every key is compared, in constant time each: the answer's timing says nothing.
        return sum(hmac.compare_digest(offered, key) for key in self._keys) > 0

    # -- the routes ------------------------------------------------------------------------

    def _declared(self, service: str, name: str) -> Operation[Any, Any] | None:
        """The operation as the served `Service` declares it now (one registered after start
        included), or None."""
        svc = self._by_name.get(service)
        return None if svc is None else svc.operations.get(name)

    def _passed_on(self, service: str, name: str) -> bool:
        """Whether `service.name` is one the gateway passes on without its contract: an
        operation of a served service its code does not declare (deployed after it started)."""
        return service in self._by_name and _OPERATION_NAME.fullmatch(name) is not None

    async def _operation(self, request: web.Request) -> web.Response:
        """POST /v1/{service}/{operation}: a call, or a submit when async is preferred.

        An operation of a served service that this gateway's code does not declare is passed
        on as JSON: the service checks it (its refusals are the same problems), and it carries
        no contract version."""
        service, name = request.match_info["service"], request.match_info["operation"]
        op = self._declared(service, name)
        if op is None and not self._passed_on(service, name):
            raise NotFound(f"no operation {service[:64]}.{name[:64]}")
        route = f"{service}.{name}"
        prefer = parse_prefer(request.headers.getall("Prefer", ()))
        body = await request.read()
        # 422 here, before any AMQP: the request model, or at least JSON.
        payload = (
            codec.decode_model(op.request, body) if op is not None else codec.decode_json(body)
        )
        callback = request.headers.get(CALLBACK_HEADER)
        if callback is not None and not prefer.respond_async:
            raise InvalidArgument(f"{CALLBACK_HEADER} needs Prefer: respond-async")
        headers = _forwarded(request, self.forward)
        wait = min(prefer.wait, self.settings.gateway_max_wait) if prefer.wait else None
        if not prefer.respond_async:
            # The operation's own bound (its `timeout`) unless the caller says how long it waits.
            bound = op.timeout if op is not None else None
            default = min(bound or self.settings.default_deadline, self.settings.gateway_max_wait)
            if op is not None:
                headers[H_VERSION] = str(op.major)
            reply = await self.client.rpc.call_raw(
                route, body, timeout=wait or default, headers=headers
            )
            applied = {"Preference-Applied": f"wait={prefer.wait:g}"} if wait else None
            return web.Response(body=reply, content_type="application/json", headers=applied)
        data = None
        if callback is not None:
            data = callback_data(self.policy.check(callback), route)
        job = await self.client.submit(
            op if op is not None else route,
            payload,
            callback=CALLBACK_ROUTE if data else None,
            callback_data=data,
            headers=headers,
        )
        job_id = f"{route}.{job.id}"
        if wait is not None:
            try:
                status = await job.finished(wait)
            except DeadlineExceeded:
                status = None
            if status is not None:
                if status.error is not None:
                    raise status.error
                return web.Response(
                    body=codec.encode(status.result),
                    content_type="application/json",
                    headers={"Preference-Applied": f"wait={prefer.wait:g}"},
                )
        location = JOB.path.format(job_id=job_id)
        return web.Response(
            body=codec.encode({"job_id": job_id, "status": "pending", "location": location}),
            status=202,
            content_type="application/json",
            headers={
                "Location": location,
                "Preference-Applied": "respond-async",
                "Retry-After": "1",
            },
        )

    async def _job(self, request: web.Request) -> web.Response:
        """GET /v1/jobs/{id}: pending, completed with its result, or failed with its error;
        `Prefer: wait=N` waits up to N seconds for it to end."""
        job_id = request.match_info["job_id"]
        split = split_job_id(job_id)
        route, key = split if split is not None else ("", "")
        service, _, name = route.partition(".")
        if self._declared(service, name) is None and not self._passed_on(service, name):
            raise NotFound(f"no job {job_id[:120]}")
        # A read is a call to the service: its middleware sees the forwarded headers too.
        job = self.client.job(key, route, headers=_forwarded(request, self.forward))
        wait = parse_prefer(request.headers.getall("Prefer", ())).wait
        try:
            if wait is None:
                status = await job.status()
            else:
                status = await job.finished(min(wait, self.settings.gateway_max_wait))
        except DeadlineExceeded:
            status = JobStatus(job.id, JobState.RUNNING)
        except NotFound:
            raise NotFound(f"no job {job_id}: unknown, or its result expired") from None
        return web.Response(
            body=codec.encode(_job_body(job_id, status)),
            content_type="application/json",
            headers=None if status.finished else {"Retry-After": "1"},
        )

    async def _openapi(self, _: web.Request) -> web.Response:
        """GET /openapi.json: the OpenAPI 3.1 document of these operations."""
        return web.Response(body=self.document, content_type="application/json")


def _job_body(job_id: str, status: JobStatus) -> dict[str, Any]:
    if not status.finished:
        return {"job_id": job_id, "status": "pending"}
    if status.error is not None:
        return {"job_id": job_id, "status": "failed", "error": status.error.to_wire()}
    return {"job_id": job_id, "status": "completed", "result": status.result}


def forward_headers(settings: Settings) -> tuple[str, ...]:
    """The request headers passed on as message headers (BURROW_GATEWAY_FORWARD_HEADERS),
    lower-cased.

    Raises:
        ConfigError: it names a header that is never forwarded, saying why.
    """
    refused = []
    for name in header_list(settings.gateway_forward_headers):
        why = NEVER_FORWARDED.get(name)
        if why is None and (name in PROTOCOL_HEADERS or name.startswith(BURROW_HEADER_PREFIX)):
            why = "one of Burrow's protocol headers, which Burrow sets itself"
        if why is not None:
            refused.append(f"{name} is never forwarded: {why}")
    if refused:
        raise ConfigError(f"BURROW_GATEWAY_FORWARD_HEADERS: {'; '.join(refused)}")
    return tuple(header_list(settings.gateway_forward_headers))


def _forwarded(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    """The values of the forwarded headers the request has (a repeated one joined by ", ")."""
    found: dict[str, str] = {}
    for name in names:
        values = request.headers.getall(name, ())
        if not values:
            continue
        value = ", ".join(values)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"header {name} is not UTF-8 text") from None
        found[name] = value
    return found


def _api_keys(settings: Settings) -> tuple[bytes, ...] | None:
    """The accepted keys; None when auth is off (only when BURROW_GATEWAY_AUTH=none says so)."""
    if settings.gateway_auth == "none":
        return None
    keys = [k.strip() for k in settings.gateway_api_keys.get_secret_value().split(",")]
    if settings.gateway_api_keys_file is not None:
        try:
            with open(settings.gateway_api_keys_file, encoding="utf-8") as file:
                keys += [line.strip() for line in file]
        except OSError as exc:
            raise ConfigError(
                f"BURROW_GATEWAY_API_KEYS_FILE: cannot read it: {exc.strerror}"
            ) from None
    found = tuple(k.encode() for k in keys if k and not k.startswith("#"))
    if not found:
        raise ConfigError(
            "the gateway needs API keys (BURROW_GATEWAY_API_KEYS or BURROW_GATEWAY_API_KEYS_FILE)"
            ", or BURROW_GATEWAY_AUTH=none to serve without authentication"
        )
    return found
