"""The OpenAPI 3.1 document of `burrow gateway`, generated from the services' models.

The request and reply schemas are the ones `service.contracts` writes to `schemas/` (the same
`contract()` output), with pydantic's `$defs` hoisted into `components.schemas`. The paths are
those of the gateway's route table (`_routes.ROUTES`: `POST /v1/{service}/{operation}` once per
operation, `GET /v1/jobs/{job_id}` and `GET /openapi.json`); the headers, job and problem
bodies are those of the gateway (issue 17).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from service._protocol import contracts
from service._protocol.config import Settings, header_list
from service._protocol.contracts import contract, error_schema, hoist
from service._protocol.errors import ErrorCode
from service._protocol.registry import Operation, Service
from service.gateway._routes import CALL, CALLBACK_HEADER, JOB, JOB_ID_PATTERN, ROUTES, Route

UNAUTHENTICATED = "UNAUTHENTICATED"  # the problem code of a 401 (not a wire ErrorCode)

_JSON = "application/json"
_PROBLEM_JSON = "application/problem+json"
_SCHEMAS = "#/components/schemas/"

# status: (components.responses name, what answers with it)
_PROBLEMS: dict[str, tuple[str, str]] = {
    "401": ("Unauthenticated", "No or a wrong API key (code UNAUTHENTICATED)."),
    "403": ("PermissionDenied", "The operation refused the caller (PERMISSION_DENIED)."),
    "404": ("NotFound", "Unknown service, operation or job, or not deployed (NOT_FOUND)."),
    "409": ("FailedPrecondition", "Not possible in the current state (FAILED_PRECONDITION)."),
    "413": ("TooLarge", "The body is above BURROW_MAX_BODY_BYTES (INVALID_ARGUMENT)."),
    "422": (
        "InvalidArgument",
        "Not JSON, not the request schema, a refused callback URL (INVALID_ARGUMENT).",
    ),
    "500": ("Internal", "The handler failed (INTERNAL)."),
    "503": (
        "Unavailable",
        "Overloaded (RESOURCE_EXHAUSTED, Retry-After: 1) or away (UNAVAILABLE, Retry-After: 5).",
    ),
    "504": ("DeadlineExceeded", "No answer before the deadline (DEADLINE_EXCEEDED)."),
}


def export(services: Sequence[Service], settings: Settings, directory: Path) -> list[Path]:
    """What `burrow schemas export` writes: the contracts (`service.contracts.export`) and
    the gateway's `openapi.json`; return the files."""
    written = contracts.export(services, settings, directory)
    document = openapi_document(
        services,
        max_wait=settings.gateway_max_wait,
        auth=settings.gateway_auth != "none",
        forward_headers=header_list(settings.gateway_forward_headers),
    )
    path = directory / "openapi.json"
    path.write_text(contracts.json_text(document), encoding="utf-8")
    return sorted([*written, path])


def openapi_document(
    services: Sequence[Service],
    *,
    title: str = "Burrow gateway",
    version: str | None = None,
    max_wait: float = 300.0,
    auth: bool = True,
    routes: Sequence[Route] = ROUTES,
    forward_headers: Sequence[str] = (),
) -> dict[str, Any]:
    """The OpenAPI 3.1.0 document for the gateway in front of `services`.

    Args:
        title: `info.title`.
        version: `info.version`; by default the contract version of a single service, else
            `name/version` of each service joined with ", " (no service: Burrow's version).
        max_wait: BURROW_GATEWAY_MAX_WAIT, the longest `Prefer: wait=N` honoured (described).
        auth: False when the gateway runs with BURROW_GATEWAY_AUTH=none: no security schemes,
            no `security`, no 401 responses.
        routes: the route table the gateway serves; its paths are the document's.
        forward_headers: BURROW_GATEWAY_FORWARD_HEADERS: each is an optional header parameter
            of every operation's path, passed on to the service.
    """
    schemas = _base_schemas()
    replies: list[str] = []
    for svc in services:
        operations = contract(svc)["operations"]
        for op in svc.operations.values():
            key = _key(op)
            schemas[f"{key}_request"] = hoist(operations[op.route]["request"], schemas)
            schemas[f"{key}_reply"] = hoist(operations[op.route]["reply"], schemas)
            schemas[f"{key}_webhook"] = _webhook_schema(op, f"{key}_reply")
            replies.append(f"{key}_reply")
    schemas["JobStatus"] = _job_status_schema(replies)
    every = [op for svc in services for op in svc.operations.values()]
    paths: dict[str, Any] = {}
    for route in routes:
        for path, operation in route.paths(every):
            item = paths.setdefault(path, {})
            item[route.method.lower()] = _operation(
                route, operation, auth, max_wait, forward_headers
            )
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": _info(services, title, version),
        "tags": [
            {"name": svc.name, "description": svc.description or svc.name} for svc in services
        ],
        "paths": paths,
        "components": _components(schemas, max_wait, auth, forward_headers),
    }
    if auth:
        doc["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc


def _key(op: Operation[Any, Any]) -> str:
    return op.route.replace(".", "_")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _SCHEMAS + name}


def _header_ref(name: str) -> dict[str, str]:
    """The `components.headers` entry of the response header `name` (named without "-")."""
    return {"$ref": "#/components/headers/" + name.replace("-", "")}


def _info(services: Sequence[Service], title: str, version: str | None) -> dict[str, Any]:
    return {
        "title": title,
        "version": version or _default_version(services),
        "description": (
            "Every operation of "
            + (", ".join(svc.name for svc in services) or "no service")
            + f" over HTTP: `{CALL.method} {CALL.path}` calls it (200), or with "
            f"`Prefer: respond-async` submits a job (202) read at `{JOB.method} {JOB.path}` or "
            f"delivered to `{CALLBACK_HEADER}` as a signed Standard Webhook. Errors are RFC "
            "9457 problems."
        ),
    }


def _default_version(services: Sequence[Service]) -> str:
    if len(services) == 1:
        return services[0].version
    if services:
        return ", ".join(f"{svc.name}/{svc.version}" for svc in services)
    try:
        return metadata.version("burrow")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "0.0.0"


# -- paths ------------------------------------------------------------------------------------


def _operation(
    route: Route,
    op: Operation[Any, Any] | None,
    auth: bool,
    max_wait: float,
    forward_headers: Sequence[str] = (),
) -> dict[str, Any]:
    """The OpenAPI operation of `route`; `op`: the operation it is documented for, when the
    route stands for one path per operation (its models, doc and callback are the operation's).
    """
    found: dict[str, Any] = (
        {"operationId": route.operation_id, "summary": route.summary}
        if op is None
        else _described(op, max_wait)
    )
    parameters = [*route.parameters]
    if route.per_operation:
        parameters += [_forwarded_key(name) for name in forward_headers]
    if parameters:
        found["parameters"] = [{"$ref": f"#/components/parameters/{name}"} for name in parameters]
    if route.body and op is not None:
        found["requestBody"] = {
            "required": True,
            "content": {_JSON: {"schema": _ref(f"{_key(op)}_request")}},
        }
    ok: dict[str, Any] = {"description": route.reply.description}
    if route.reply.headers:
        ok["headers"] = {name: _header_ref(name) for name in route.reply.headers}
    schema = route.reply.schema
    if schema is None and op is not None:
        ok["content"] = {_JSON: {"schema": _ref(f"{_key(op)}_reply")}}
    elif isinstance(schema, str):
        ok["content"] = {_JSON: {"schema": _ref(schema)}}
    else:
        ok["content"] = {_JSON: {"schema": copy.deepcopy(schema)}}
    responses: dict[str, Any] = {"200": ok}
    if route.accepted:
        responses["202"] = {"$ref": "#/components/responses/Accepted"}
    secured = auth and route.authenticated
    responses |= _problems(("401", *route.problems) if secured else route.problems)
    found["responses"] = responses
    if route.accepted and op is not None:
        found["callbacks"] = {"jobFinished": _callback(op, auth)}
    if auth and not route.authenticated:
        found["security"] = []  # open: no API key needed
    return found


def _described(op: Operation[Any, Any], max_wait: float) -> dict[str, Any]:
    """operationId, tag, summary and description of one operation's path."""
    doc = op.description or op.route
    deadline = (
        f"{min(op.timeout, max_wait):g} s (its timeout, at most BURROW_GATEWAY_MAX_WAIT)"
        if op.timeout
        else "BURROW_DEFAULT_DEADLINE"
    )
    return {
        "operationId": _key(op),
        "tags": [op.service],
        "summary": doc.splitlines()[0],
        "description": f"{doc}\n\nDefault deadline without `Prefer: wait=N`: {deadline}.",
    }


def _callback(op: Operation[Any, Any], auth: bool) -> dict[str, Any]:
    post: dict[str, Any] = {
        "operationId": f"{_key(op)}_jobFinished",
        "summary": f"{op.route} finished (sent when the request named {CALLBACK_HEADER})",
        "parameters": [
            _webhook_header("webhook-id", "The job id; the same on every retry.", {}),
            _webhook_header(
                "webhook-timestamp", "Unix seconds of this attempt.", {"pattern": "^[0-9]+$"}
            ),
            _webhook_header(
                "webhook-signature",
                "`v1,` + base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` keyed "
                "with the base64-decoded part of BURROW_GATEWAY_WEBHOOK_SECRET after `whsec_`.",
                {"pattern": r"^v1,[A-Za-z0-9+/]+={0,2}( v1,[A-Za-z0-9+/]+={0,2})*$"},
            ),
        ],
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": _ref(f"{_key(op)}_webhook")}},
        },
        "responses": {
            "2XX": {"description": "Delivered."},
            "default": {
                "description": (
                    "Not delivered: retried with doubling delays (BURROW_RETRY_BASE_DELAY, "
                    "BURROW_MAX_RETRIES), then dead-lettered; so is no answer in time."
                )
            },
        },
    }
    if auth:
        post["security"] = []  # signed, not authenticated with the gateway's keys
    return {f"{{$request.header.{CALLBACK_HEADER}}}": {"post": post}}


def _webhook_header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": True,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _problems(statuses: Sequence[str]) -> dict[str, Any]:
    return {
        status: {"$ref": f"#/components/responses/{_PROBLEMS[status][0]}"} for status in statuses
    }


# -- components -------------------------------------------------------------------------------


def _components(
    schemas: dict[str, Any], max_wait: float, auth: bool, forward_headers: Sequence[str]
) -> dict[str, Any]:
    parameters = _parameters(max_wait)
    for name in forward_headers:
        parameters[_forwarded_key(name)] = {
            "name": name,
            "in": "header",
            "required": False,
            "description": (
                f"Passed on to the service as the message header `{name.lower()}` "
                "(BURROW_GATEWAY_FORWARD_HEADERS), for its middleware."
            ),
            "schema": {"type": "string"},
        }
    components: dict[str, Any] = {
        "schemas": schemas,
        "responses": _responses(auth),
        "parameters": parameters,
        "headers": _headers(),
    }
    if auth:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key."},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    return components


def _responses(auth: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "Accepted": {
            "description": "Submitted: the job runs once; read it at `Location`.",
            "headers": {
                name: _header_ref(name)
                for name in ("Location", "Preference-Applied", "Retry-After")
            },
            "content": {_JSON: {"schema": _ref("JobAccepted")}},
        }
    }
    for status, (name, description) in _PROBLEMS.items():
        if status == "401" and not auth:
            continue
        response: dict[str, Any] = {
            "description": description,
            "content": {_PROBLEM_JSON: {"schema": _ref("Problem")}},
        }
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"$ref": "#/components/headers/Bearer"}}
        if status == "503":
            response["headers"] = {"Retry-After": _header_ref("Retry-After")}
        responses[name] = response
    return responses


def _parameters(max_wait: float) -> dict[str, Any]:
    return {
        "Prefer": {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": (
                "RFC 7240. `respond-async`: submit a job and answer 202 at once. `wait=N` "
                f"(seconds, honoured up to {max_wait:g}): without respond-async the call's "
                "deadline; with it, wait up to N s for the result (200 if it finished, else "
                "202)."
            ),
            "schema": {"type": "string"},
            "examples": {
                "async": {"value": "respond-async"},
                "asyncWait": {"value": "respond-async, wait=10"},
                "deadline": {"value": "wait=5"},
            },
        },
        "CallbackUrl": {
            "name": CALLBACK_HEADER,
            "in": "header",
            "required": False,
            "description": (
                "Needs `Prefer: respond-async`. When the job ends the gateway POSTs the signed "
                "webhook (callback jobFinished) here. Its host must be in "
                "BURROW_GATEWAY_CALLBACK_HOSTS, else 422."
            ),
            "schema": {"type": "string", "format": "uri"},
        },
        "JobId": {
            "name": "job_id",
            "in": "path",
            "required": True,
            "description": "`{service}.{operation}.{32 hex}`, from a 202's `job_id`.",
            "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
        },
    }


def _forwarded_key(name: str) -> str:
    """The `components.parameters` key of a forwarded header (`Forwarded_x-service-token`)."""
    return "Forwarded_" + re.sub(r"[^A-Za-z0-9._-]", "_", name.lower())


def _headers() -> dict[str, Any]:
    return {
        "Location": {
            "description": f"`{JOB.path}`.",
            "required": True,
            "schema": {"type": "string", "format": "uri-reference"},
        },
        "PreferenceApplied": {
            "description": "`respond-async` on a 202; `wait=N` on a 200 of a waited submit.",
            "schema": {"type": "string"},
        },
        "RetryAfter": {
            "description": "Seconds before asking again.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "Bearer": {"description": "`Bearer`.", "schema": {"type": "string"}},
    }


def _base_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": hoist(error_schema(), {})}
    schemas["Problem"] = _problem_schema()
    schemas["JobAccepted"] = _object(
        "JobAccepted",
        job_id={"type": "string", "pattern": JOB_ID_PATTERN},
        status={"const": "pending"},
        location={"type": "string", "pattern": "^" + re.escape(JOB.path.partition("{")[0])},
    )
    return schemas


def _object(title: str, **properties: Any) -> dict[str, Any]:
    """A closed object of `properties`, all required."""
    return {
        "title": title,
        "type": "object",
        "required": list(properties),
        "additionalProperties": False,
        "properties": properties,
    }


def _problem_schema() -> dict[str, Any]:
    return {
        "title": "Problem",
        "description": "RFC 9457 problem details.",
        "type": "object",
        "required": ["type", "title", "status", "detail", "code", "details", "retryable"],
        "properties": {
            "type": {"type": "string", "pattern": "^urn:burrow:error:[a-z_]+$"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": [*(c.value for c in ErrorCode), UNAUTHENTICATED]},
            "details": {"type": "object"},
            "retryable": {"type": "boolean"},
        },
    }


def _job_status_schema(replies: Sequence[str]) -> dict[str, Any]:
    job_id = {"type": "string", "pattern": JOB_ID_PATTERN}
    result = {"anyOf": [_ref(name) for name in replies]} if replies else {}
    return {
        "title": "JobStatus",
        "oneOf": [
            _object("JobPending", job_id=job_id, status={"const": "pending"}),
            _object("JobCompleted", job_id=job_id, status={"const": "completed"}, result=result),
            _object("JobFailed", job_id=job_id, status={"const": "failed"}, error=_ref("Error")),
        ],
    }


def _webhook_schema(op: Operation[Any, Any], reply: str) -> dict[str, Any]:
    job_id = {"type": "string", "pattern": f"^{re.escape(op.route)}\\.[0-9a-f]{{32}}$"}

    def body(outcome: str, event: str, **data: Any) -> dict[str, Any]:
        return _object(
            f"{op.route} {event}",
            type={"const": event},
            timestamp={"type": "string", "format": "date-time"},
            data=_object(
                "data",
                job_id=job_id,
                operation={"const": op.route},
                status={"const": outcome},
                **data,
            ),
        )

    return {
        "title": f"{op.route} webhook",
        "oneOf": [
            body("completed", "job.completed", result=_ref(reply)),
            body("failed", "job.failed", error=_ref("Error")),
        ],
    }
