"""Unit tests of the gateway's OpenAPI 3.1 document: valid, exactly the gateway's routes, the
contracts' schemas, and bodies the gateway sends validate against it (and wrong ones do not)."""

from __future__ import annotations

import importlib.metadata
import json
import re
from enum import StrEnum
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service import ErrorCode, InvalidArgument, Model, Service
from service._protocol.contracts import contract
from service.example import AddRequest, calc
from service.gateway._openapi import openapi_document
from service.gateway._routes import JOB_ID_PATTERN
from service.gateway._server import problem as problem_answer

__all__: list[str] = []

DOC_URI = "urn:burrow:test:openapi"
JOB_ID = "calc.add." + "0123456789abcdef" * 2
JSON = "application/json"
PROBLEM = "application/problem+json"


class Colour(StrEnum):
    """A colour."""

    RED = "red"
    BLUE = "blue"


class Point(Model):
    """A point."""

    x: int
    y: int


class MeasureRequest(Model):
    """A path of points."""

    points: list[Point]
    colour: Colour = Colour.RED


class MeasureReply(Model):
    """Its length and where it starts."""

    length: float
    start: Point | None = None


shapes = Service("shapes", version="2.1.0")


@shapes.operation(timeout=5)
async def measure(req: MeasureRequest) -> MeasureReply:
    """Measure a path.

    Nested models end up in components.schemas.
    """
    return MeasureReply(length=float(len(req.points)), start=req.points[0] if req.points else None)


def _validator(doc: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A 2020-12 validator of the schema at `pointer` in `doc`, its refs resolved in `doc`."""
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(DOC_URI, resource)
    return Draft202012Validator({"$ref": f"{DOC_URI}#{pointer}"}, registry=registry)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _body(doc: dict[str, Any], path: str, method: str, status: str, media: str = JSON) -> str:
    """The pointer to the body schema of a response, following a components/responses ref."""
    response = doc["paths"][path][method]["responses"][status]
    base = response["$ref"][1:] if "$ref" in response else f"/paths/{_escape(path)}/{method}"
    if "$ref" not in response:
        base += f"/responses/{status}"
    return f"{base}/content/{_escape(media)}/schema"


def _names(schema: Any) -> Any:
    """`schema` with every `$ref` cut to the schema name, and no `$schema`/`$id`/`$defs`."""
    if isinstance(schema, dict):
        return {
            k: (v.rsplit("/", 1)[1] if k == "$ref" else _names(v))
            for k, v in schema.items()
            if k not in ("$schema", "$id", "$defs")
        }
    if isinstance(schema, list):
        return [_names(item) for item in schema]
    return schema


def _walk(value: Any) -> list[tuple[str, Any]]:
    """Every (key, value) pair of nested dicts in `value`."""
    found: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            found.append((k, v))
            found += _walk(v)
    elif isinstance(value, list):
        for item in value:
            found += _walk(item)
    return found


@pytest.mark.parametrize("auth", [True, False])
def test_the_calc_document_is_valid_openapi_3_1(auth: bool) -> None:
    """The document for service.example:calc passes openapi_spec_validator as OpenAPI 3.1."""
    doc = openapi_document([calc], auth=auth)
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_documents_with_nested_models_several_or_no_services_are_valid() -> None:
    """Nested models, several services and none still give a valid document."""
    for services in ([shapes], [calc, shapes], []):
        validate(openapi_document(services))


def test_the_paths_are_exactly_the_gateway_routes() -> None:
    """One literal POST path per operation, plus GET /v1/jobs/{job_id} and GET /openapi.json."""
    doc = openapi_document([calc, shapes])
    routes = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == {
        ("/v1/calc/add", "post"),
        ("/v1/calc/divide", "post"),
        ("/v1/calc/slow_square", "post"),
        ("/v1/shapes/measure", "post"),
        ("/v1/jobs/{job_id}", "get"),
        ("/openapi.json", "get"),
    }


@pytest.mark.parametrize("service", [calc, shapes], ids=lambda svc: svc.name)
def test_every_operation_has_the_contract_request_and_reply_schemas(service: Service) -> None:
    """Request and 200 schemas are contracts.py's, with its $defs moved to components."""
    doc = openapi_document([service])
    components = doc["components"]["schemas"]
    for route, expected in contract(service)["operations"].items():
        post = doc["paths"]["/v1/" + route.replace(".", "/")]["post"]
        body = post["requestBody"]
        assert body["required"] is True
        request = body["content"][JSON]["schema"]["$ref"].rsplit("/", 1)[1]
        reply = post["responses"]["200"]["content"][JSON]["schema"]["$ref"].rsplit("/", 1)[1]
        assert _names(components[request]) == _names(expected["request"])
        assert _names(components[reply]) == _names(expected["reply"])
        defs = expected["request"].get("$defs", {}) | expected["reply"].get("$defs", {})
        for name, sub in defs.items():
            assert _names(components[name]) == _names(sub)
    refs = [v for k, v in _walk(doc) if k == "$ref"]
    assert all(ref.startswith("#/components/") for ref in refs)
    assert "$defs" not in {k for k, _ in _walk(doc)}


def test_an_operation_carries_its_doc_headers_and_callback() -> None:
    """operationId, summary from the doc, the Prefer and callback headers, the jobFinished hook."""
    doc = openapi_document([calc, shapes], max_wait=42)
    post = doc["paths"]["/v1/shapes/measure"]["post"]
    assert post["operationId"] == "shapes_measure"
    assert post["summary"] == "Measure a path."
    assert "Nested models" in post["description"]
    assert "5 s" in post["description"]
    params = [
        doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]] for p in post["parameters"]
    ]
    assert {(p["name"], p["in"]) for p in params} == {
        ("Prefer", "header"),
        ("Burrow-Callback-Url", "header"),
    }
    prefer = next(p for p in params if p["name"] == "Prefer")
    assert "respond-async" in prefer["description"]
    assert "wait=N" in prefer["description"]
    assert "42" in prefer["description"]
    callback = post["callbacks"]["jobFinished"]["{$request.header.Burrow-Callback-Url}"]["post"]
    headers = {p["name"] for p in callback["parameters"]}
    assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert "2XX" in callback["responses"]
    responses = post["responses"]
    assert set(responses) == {
        "200",
        "202",
        "401",
        "403",
        "404",
        "409",
        "413",
        "422",
        "500",
        "503",
        "504",
    }
    assert doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"] == [
        {"$ref": "#/components/parameters/JobId"}
    ]
    assert doc["components"]["parameters"]["JobId"]["schema"]["pattern"] == JOB_ID_PATTERN


def test_the_problem_code_enum_is_error_codes_plus_unauthenticated() -> None:
    """Problem.code is exactly the wire ErrorCode values and UNAUTHENTICATED."""
    problem = openapi_document([calc])["components"]["schemas"]["Problem"]
    assert problem["properties"]["code"]["enum"] == [
        *(c.value for c in ErrorCode),
        "UNAUTHENTICATED",
    ]


def test_every_problem_response_is_problem_json() -> None:
    """Every 4xx/5xx response is application/problem+json of Problem; 503 has Retry-After."""
    doc = openapi_document([calc])
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status in operation["responses"]:
                if status.startswith(("4", "5")):
                    schema: Any = doc
                    for part in _body(doc, path, method, status, PROBLEM).split("/")[1:]:
                        schema = schema[part.replace("~1", "/").replace("~0", "~")]
                    assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)
    responses = doc["components"]["responses"]
    assert "Retry-After" in responses["Unavailable"]["headers"]
    assert "WWW-Authenticate" in responses["Unauthenticated"]["headers"]


async def test_a_real_add_reply_validates_and_a_wrong_one_does_not() -> None:
    """calc.add's real reply passes its 200 schema; a wrong type, field or none fails."""
    doc = openapi_document([calc])
    validator = _validator(doc, _body(doc, "/v1/calc/add", "post", "200"))
    reply = await calc.operations["add"].handler(AddRequest(a=2, b=3))
    validator.validate(reply.model_dump(mode="json"))
    for wrong in ({"sum": "5"}, {"sum": 5, "extra": 1}, {}, {"quotient": 1.5}):
        assert not validator.is_valid(wrong), wrong
    request = _validator(doc, "/components/schemas/calc_add_request")
    assert request.is_valid({"a": 1, "b": 2})
    assert not request.is_valid({"a": 1})


async def test_a_nested_reply_and_request_validate() -> None:
    """Bodies with nested models and enums validate through the hoisted components."""
    doc = openapi_document([shapes])
    request = {"points": [{"x": 0, "y": 0}, {"x": 3, "y": 4}], "colour": "blue"}
    _validator(doc, "/components/schemas/shapes_measure_request").validate(request)
    assert not _validator(doc, "/components/schemas/shapes_measure_request").is_valid(
        {"points": [{"x": 0}], "colour": "green"}
    )
    reply = await shapes.operations["measure"].handler(MeasureRequest.model_validate(request))
    _validator(doc, _body(doc, "/v1/shapes/measure", "post", "200")).validate(
        reply.model_dump(mode="json")
    )


def test_the_202_body_and_a_problem_body_from_the_spec_validate() -> None:
    """The spec's 202 body and problem body validate; a wrong status or code does not."""
    doc = openapi_document([calc])
    accepted = _validator(doc, _body(doc, "/v1/calc/add", "post", "202"))
    job = {"job_id": JOB_ID, "status": "pending", "location": f"/v1/jobs/{JOB_ID}"}
    accepted.validate(job)
    assert not accepted.is_valid(job | {"status": "completed"})
    assert not accepted.is_valid(job | {"job_id": "calc.add.XYZ"})
    assert not accepted.is_valid({"job_id": JOB_ID, "status": "pending"})
    problem = _validator(doc, _body(doc, "/v1/calc/add", "post", "422", PROBLEM))
    # The gateway's own answer for an error, validated against the document it serves.
    answer = problem_answer(InvalidArgument("division by zero", details={"field": "b"}))
    assert isinstance(answer.body, bytes)
    body: dict[str, Any] = json.loads(answer.body)
    problem.validate(body)
    problem.validate(
        body
        | {"status": 401, "code": "UNAUTHENTICATED", "type": "urn:burrow:error:unauthenticated"}
    )
    assert not problem.is_valid(body | {"code": "TEAPOT"})
    assert not problem.is_valid({k: v for k, v in body.items() if k != "retryable"})


async def test_job_status_bodies_validate() -> None:
    """Pending, completed with a real reply and failed with a wire error validate; others not."""
    doc = openapi_document([calc])
    status = _validator(doc, _body(doc, "/v1/jobs/{job_id}", "get", "200"))
    reply = await calc.operations["add"].handler(AddRequest(a=1, b=1))
    error = InvalidArgument("division by zero", details={"field": "b"}).to_wire()
    status.validate({"job_id": JOB_ID, "status": "pending"})
    status.validate(
        {"job_id": JOB_ID, "status": "completed", "result": reply.model_dump(mode="json")}
    )
    status.validate({"job_id": JOB_ID, "status": "failed", "error": error})
    assert not status.is_valid({"job_id": JOB_ID, "status": "completed", "result": {"sum": "2"}})
    assert not status.is_valid({"job_id": JOB_ID, "status": "failed", "error": {"code": "NOPE"}})
    assert not status.is_valid({"job_id": "nope", "status": "pending"})
    assert not status.is_valid({"job_id": JOB_ID, "status": "completed"})
    assert re.match(JOB_ID_PATTERN, JOB_ID)


async def test_the_webhook_body_validates() -> None:
    """The callback's body: completed with the reply or failed with the error; of this route."""
    doc = openapi_document([calc])
    post = doc["paths"]["/v1/calc/add"]["post"]
    callback = post["callbacks"]["jobFinished"]["{$request.header.Burrow-Callback-Url}"]["post"]
    name = callback["requestBody"]["content"][JSON]["schema"]["$ref"].rsplit("/", 1)[1]
    webhook = _validator(doc, f"/components/schemas/{name}")
    reply = await calc.operations["add"].handler(AddRequest(a=1, b=2))
    data = {"job_id": JOB_ID, "operation": "calc.add", "status": "completed"}
    completed: dict[str, Any] = {
        "type": "job.completed",
        "timestamp": "2025-01-01T00:00:00Z",
        "data": data | {"result": reply.model_dump(mode="json")},
    }
    webhook.validate(completed)
    failed = {
        "type": "job.failed",
        "timestamp": "2025-01-01T00:00:00Z",
        "data": data | {"status": "failed", "error": InvalidArgument("no").to_wire()},
    }
    webhook.validate(failed)
    assert not webhook.is_valid(completed | {"type": "job.failed"})
    assert not webhook.is_valid(
        completed | {"data": completed["data"] | {"operation": "calc.divide"}}
    )


def test_auth_on_means_bearer_or_api_key_and_an_open_openapi_json() -> None:
    """With auth: bearer or X-API-Key everywhere, none on /openapi.json and on the callback."""
    doc = openapi_document([calc])
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": "An API key."}
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "X-API-Key")
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []
    assert "401" in doc["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]


def test_auth_false_leaves_no_security() -> None:
    """auth=False: no security requirement, no security scheme, no 401 anywhere."""
    doc = openapi_document([calc], auth=False)
    keys = {k for k, _ in _walk(doc)}
    assert "security" not in keys
    assert "securitySchemes" not in keys
    assert "401" not in keys
    assert "Unauthenticated" not in doc["components"]["responses"]


def test_the_version_defaults_to_the_contract_versions() -> None:
    """info.version: one service's version, `name/version` of several, else Burrow's version."""
    assert openapi_document([calc])["info"]["version"] == "1.0.0"
    assert openapi_document([calc, shapes])["info"]["version"] == "calc/1.0.0, shapes/2.1.0"
    assert openapi_document([])["info"]["version"] == importlib.metadata.version("burrow")
    assert openapi_document([calc], version="9.9.9", title="T")["info"] == {
        **openapi_document([calc])["info"],
        "version": "9.9.9",
        "title": "T",
    }
