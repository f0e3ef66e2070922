"""The gateway's routes, each spelled once: the server is routed by this table and the OpenAPI
document's paths are generated from it (issue 25).

A route names its method, its path template, the `Gateway` method that answers it and what its
OpenAPI operation says. A path with `{service}` and `{operation}` stands for one path per
operation (`POST /v1/calc/add`, …): it is documented once per operation, and each is a route
of its own in the metrics and logs; a path naming no operation is `unmatched` there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service._protocol.registry import Operation

# Every path under it needs an API key (when auth is on): served behind the check, documented
# with the 401 and the document's `security`; a path outside it is open (`security: []`).
API_PREFIX = "/v1/"
CALLBACK_HEADER = "Burrow-Callback-Url"  # a submit's callback URL (components.parameters)
# A job id the gateway hands out: `{service}.{operation}.{32 hex}` (the job route's `job_id`).
JOB_ID_PATTERN = r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\.[0-9a-f]{32}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def split_job_id(job_id: str) -> tuple[str, str] | None:
    """A job id the gateway handed out → (its operation's route, the service's job id), e.g.
    `calc.add.<hex>` → (`calc.add`, `<hex>`); None for anything else."""
    if _JOB_ID.fullmatch(job_id) is None:
        return None
    route, _, key = job_id.rpartition(".")
    return route, key


@dataclass(frozen=True, slots=True)
class Reply:
    """A route's 200 in the OpenAPI document.

    Attributes:
        schema: the name of a `components.schemas` entry, an inline schema, or None for the
            operation's reply model (a per-operation route only).
        headers: the response headers it may carry (`components.headers`, named without "-").
    """

    description: str
    schema: str | dict[str, Any] | None
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One route of the gateway: how it is served, labelled and documented.

    Attributes:
        method: the HTTP method; a GET also answers HEAD.
        path: the aiohttp path template.
        handler: the name of the `Gateway` method that answers it.
        reply: its 200.
        operation_id: its `operationId` (a per-operation route: `{service}_{operation}`).
        summary: its `summary` (a per-operation route: the first line of the operation's doc).
        parameters: its `components.parameters`, in order.
        problems: the statuses of its problem responses (`components.responses`); the 401 is
            added when the route needs an API key.
        body: the operation's request model is the JSON body (a per-operation route only).
        accepted: it may answer 202 Accepted and POST the job's completion to the callback URL
            (a per-operation route only).
    """

    method: str
    path: str
    handler: str
    reply: Reply
    operation_id: str = ""
    summary: str = ""
    parameters: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    body: bool = False
    accepted: bool = False

    def __post_init__(self) -> None:
        if not self.per_operation and (self.body or self.accepted or self.reply.schema is None):
            raise ValueError(f"{self.method} {self.path}: only a per-operation route has models")

    @property
    def per_operation(self) -> bool:
        """Whether the path stands for one path per operation (`{service}`, `{operation}`)."""
        return "{service}" in self.path and "{operation}" in self.path

    @property
    def authenticated(self) -> bool:
        """Whether it needs an API key when auth is on: every path under `API_PREFIX` does."""
        return self.path.startswith(API_PREFIX)

    def paths(
        self, operations: Iterable[Operation[Any, Any]]
    ) -> list[tuple[str, Operation[Any, Any] | None]]:
        """The paths it serves, each with its operation: one per operation, or its own."""
        if not self.per_operation:
            return [(self.path, None)]
        return [(self.path.format(service=op.service, operation=op.name), op) for op in operations]

    def served(self, match: Mapping[str, str]) -> str:
        """The path a request matched by the router stands for (`match`: its path values)."""
        if not self.per_operation:
            return self.path
        return self.path.format(service=match["service"], operation=match["operation"])

    def label(self, path: str) -> str:
        """The `route` label of the metrics and the log line for one of its `paths`."""
        return f"{self.method} {path}"


CALL = Route(
    "POST",
    API_PREFIX + "{service}/{operation}",
    "_operation",
    Reply("The reply.", None, ("Preference-Applied",)),
    parameters=("Prefer", "CallbackUrl"),
    problems=("403", "404", "409", "413", "422", "500", "503", "504"),
    body=True,
    accepted=True,
)
JOB = Route(
    "GET",
    API_PREFIX + "jobs/{job_id}",
    "_job",
    Reply("The job's state (`Retry-After` while pending).", "JobStatus", ("Retry-After",)),
    operation_id="getJob",
    summary="A submitted job: pending, completed with its reply, or failed.",
    parameters=("JobId",),
    problems=("404", "500", "503", "504"),
)
OPENAPI = Route(
    "GET",
    "/openapi.json",
    "_openapi",
    Reply("The OpenAPI 3.1 document.", {"type": "object"}),
    operation_id="getOpenApi",
    summary="This document.",
)
# Served and documented in this order.
ROUTES: tuple[Route, ...] = (CALL, JOB, OPENAPI)
