"""The OpenAPI 3.1 document of `burrow gateway`, generated from the services' models.

The request and reply schemas are the ones `service.contracts` writes to `schemas/` (the same
`contract()` output), with pydantic's `$defs` hoisted into `components.schemas`. The routes,
headers, job and problem bodies are those of the gateway (issue 17): `POST
/v1/{service}/{operation}`, `GET /v1/jobs/{job_id}` and `GET /openapi.json`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from service import contracts
from service.config import Settings
from service.contracts import contract, error_schema, hoist
from service.errors import ErrorCode
from service.registry import Operation, Service

__all__ = ["GATEWAY_JOB_ID_PATTERN", "UNAUTHENTICATED", "export", "openapi_document"]

GATEWAY_JOB_ID_PATTERN = r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\.[0-9a-f]{32}$"
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
_CALL_PROBLEMS = ("401", "403", "404", "409", "413", "422", "500", "503", "504")
_JOB_PROBLEMS = ("401", "404", "500", "503", "504")


def export(services: Sequence[Service], settings: Settings, directory: Path) -> list[Path]:
    """What `burrow schemas export` writes: the contracts (`service.contracts.export`) and
    the gateway's `openapi.json`; return the files."""
    written = contracts.export(services, settings, directory)
    document = openapi_document(
        services, max_wait=settings.gateway_max_wait, auth=settings.gateway_auth != "none"
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
) -> dict[str, Any]:
    """The OpenAPI 3.1.0 document for the gateway in front of `services`.

    Args:
        title: `info.title`.
        version: `info.version`; by default the contract version of a single service, else
            `name/version` of each service joined with ", " (no service: Burrow's version).
        max_wait: BURROW_GATEWAY_MAX_WAIT, the longest `Prefer: wait=N` honoured (described).
        auth: False when the gateway runs with BURROW_GATEWAY_AUTH=none: no security schemes,
            no `security`, no 401 responses.
    """
    schemas = _base_schemas()
    paths: dict[str, Any] = {}
    replies: list[str] = []
    for svc in services:
        operations = contract(svc)["operations"]
        for op in svc.operations.values():
            key = _key(op)
            schemas[f"{key}_request"] = hoist(operations[op.route]["request"], schemas)
            schemas[f"{key}_reply"] = hoist(operations[op.route]["reply"], schemas)
            schemas[f"{key}_webhook"] = _webhook_schema(op, f"{key}_reply")
            paths[f"/v1/{op.service}/{op.name}"] = {"post": _call(op, auth, max_wait)}
            replies.append(f"{key}_reply")
    schemas["JobStatus"] = _job_status_schema(replies)
    paths["/v1/jobs/{job_id}"] = {"get": _job(auth)}
    paths["/openapi.json"] = {"get": _self(auth)}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": _info(services, title, version),
        "tags": [
            {"name": svc.name, "description": svc.description or svc.name} for svc in services
        ],
        "paths": paths,
        "components": _components(schemas, max_wait, auth),
    }
    if auth:
        doc["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc


def _key(op: Operation[Any, Any]) -> str:
    return op.route.replace(".", "_")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _SCHEMAS + name}


def _info(services: Sequence[Service], title: str, version: str | None) -> dict[str, Any]:
    return {
        "title": title,
        "version": version or _default_version(services),
        "description": (
            "Every operation of "
            + (", ".join(svc.name for svc in services) or "no service")
            + " over HTTP: `POST /v1/{service}/{operation}` calls it (200), or with "
            "`Prefer: respond-async` submits a job (202) read at `GET /v1/jobs/{job_id}` or "
            "delivered to `Burrow-Callback-Url` as a signed Standard Webhook. Errors are RFC "
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


def _call(op: Operation[Any, Any], auth: bool, max_wait: float) -> dict[str, Any]:
    key = _key(op)
    doc = op.description or op.route
    deadline = (
        f"{min(op.timeout, max_wait):g} s (its timeout, at most BURROW_GATEWAY_MAX_WAIT)"
        if op.timeout
        else "BURROW_DEFAULT_DEADLINE"
    )
    responses: dict[str, Any] = {
        "200": {
            "description": "The reply.",
            "headers": {"Preference-Applied": {"$ref": "#/components/headers/PreferenceApplied"}},
            "content": {_JSON: {"schema": _ref(f"{key}_reply")}},
        },
        "202": {"$ref": "#/components/responses/Accepted"},
    }
    responses |= _problems(_CALL_PROBLEMS, auth)
    return {
        "operationId": key,
        "tags": [op.service],
        "summary": doc.splitlines()[0],
        "description": f"{doc}\n\nDefault deadline without `Prefer: wait=N`: {deadline}.",
        "parameters": [
            {"$ref": "#/components/parameters/Prefer"},
            {"$ref": "#/components/parameters/CallbackUrl"},
        ],
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": _ref(f"{key}_request")}},
        },
        "responses": responses,
        "callbacks": {"jobFinished": _callback(op, auth)},
    }


def _callback(op: Operation[Any, Any], auth: bool) -> dict[str, Any]:
    post: dict[str, Any] = {
        "operationId": f"{_key(op)}_jobFinished",
        "summary": f"{op.route} finished (sent when the request named Burrow-Callback-Url)",
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
    return {"{$request.header.Burrow-Callback-Url}": {"post": post}}


def _webhook_header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": True,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _job(auth: bool) -> dict[str, Any]:
    return {
        "operationId": "getJob",
        "summary": "A submitted job: pending, completed with its reply, or failed.",
        "parameters": [{"$ref": "#/components/parameters/JobId"}],
        "responses": {
            "200": {
                "description": "The job's state (`Retry-After` while pending).",
                "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
                "content": {_JSON: {"schema": _ref("JobStatus")}},
            },
            **_problems(_JOB_PROBLEMS, auth),
        },
    }


def _self(auth: bool) -> dict[str, Any]:
    get: dict[str, Any] = {
        "operationId": "getOpenApi",
        "summary": "This document.",
        "responses": {
            "200": {
                "description": "The OpenAPI 3.1 document.",
                "content": {_JSON: {"schema": {"type": "object"}}},
            }
        },
    }
    if auth:
        get["security"] = []
    return get


def _problems(statuses: Sequence[str], auth: bool) -> dict[str, Any]:
    return {
        status: {"$ref": f"#/components/responses/{_PROBLEMS[status][0]}"}
        for status in statuses
        if auth or status != "401"
    }


# -- components -------------------------------------------------------------------------------


def _components(schemas: dict[str, Any], max_wait: float, auth: bool) -> dict[str, Any]:
    components: dict[str, Any] = {
        "schemas": schemas,
        "responses": _responses(auth),
        "parameters": _parameters(max_wait),
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
                "Location": {"$ref": "#/components/headers/Location"},
                "Preference-Applied": {"$ref": "#/components/headers/PreferenceApplied"},
                "Retry-After": {"$ref": "#/components/headers/RetryAfter"},
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
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
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
            "name": "Burrow-Callback-Url",
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
            "schema": {"type": "string", "pattern": GATEWAY_JOB_ID_PATTERN},
        },
    }


def _headers() -> dict[str, Any]:
    return {
        "Location": {
            "description": "`/v1/jobs/{job_id}`.",
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
        job_id={"type": "string", "pattern": GATEWAY_JOB_ID_PATTERN},
        status={"const": "pending"},
        location={"type": "string", "pattern": "^/v1/jobs/"},
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
    job_id = {"type": "string", "pattern": GATEWAY_JOB_ID_PATTERN}
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
