"""Contracts: schemas/ is what the code generates, every schema is valid, AsyncAPI 3.0 holds."""

from __future__ import annotations

import enum
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate
from pydantic import BaseModel, Field, create_model

from service import Model, Service, load_settings
from service._protocol import contracts
from service.example import calc
from service.gateway import _openapi as openapi

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
NODE = ROOT / "clients" / "node"
ASYNCAPI_SCHEMA = (
    NODE / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
)


def _settings() -> Any:
    return load_settings(namespace="burrow")


@pytest.fixture(scope="module")
def asyncapi_meta_schema() -> dict[str, Any]:
    """The official AsyncAPI 3.0.0 JSON Schema, from the @asyncapi/specs npm package."""
    if not ASYNCAPI_SCHEMA.exists():
        if shutil.which("npm") is None:
            pytest.fail("npm is needed to fetch @asyncapi/specs (apt-get install npm)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE, check=True, timeout=300)
    return dict(json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8")))


def test_checked_in_schemas_match_the_code(tmp_path: Path) -> None:
    """Regenerating the contracts gives exactly the files in schemas/ (run `make schemas`)."""
    written = openapi.export([calc], _settings(), tmp_path)
    expected = {path.name for path in written}
    assert {path.name for path in SCHEMAS.iterdir()} == expected
    for path in written:
        assert (SCHEMAS / path.name).read_text(encoding="utf-8") == path.read_text(
            encoding="utf-8"
        ), f"schemas/{path.name} drifted from the code; run `make schemas`"


def test_every_json_schema_passes_the_2020_12_meta_schema() -> None:
    """Each generated message schema is a valid JSON Schema 2020-12 document."""
    documents = ("contract.json", "openapi.json")  # not schemas: checked by their own tests
    files = [path for path in SCHEMAS.glob("*.json") if path.name not in documents]
    assert files
    for path in files:
        schema = json.loads(path.read_text(encoding="utf-8"))
        assert schema["$schema"] == contracts.SCHEMA_DIALECT
        jsonschema.Draft202012Validator.check_schema(schema)


def test_openapi_document_validates() -> None:
    """schemas/openapi.json, the gateway's document, is valid OpenAPI 3.1."""
    document = json.loads((SCHEMAS / "openapi.json").read_text(encoding="utf-8"))
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_asyncapi_document_validates(asyncapi_meta_schema: dict[str, Any]) -> None:
    """schemas/asyncapi.yaml validates against the official AsyncAPI 3.0.0 schema."""
    document = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert document["asyncapi"] == "3.0.0"
    errors = list(jsonschema.Draft7Validator(asyncapi_meta_schema).iter_errors(document))
    assert errors == [], [error.message for error in errors[:5]]


def test_asyncapi_validation_catches_a_broken_document(
    asyncapi_meta_schema: dict[str, Any],
) -> None:
    """The validator is not vacuous: a wrong operation action is reported."""
    document = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text(encoding="utf-8"))
    document["operations"]["calc_add_call"]["action"] = "sideways"
    assert list(jsonschema.Draft7Validator(asyncapi_meta_schema).iter_errors(document))


def test_asyncapi_describes_request_reply_and_bindings() -> None:
    """calc.add is a receive operation on the rpc exchange with a reply via reply_to."""
    document = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text(encoding="utf-8"))
    operation = document["operations"]["calc_add_call"]
    assert operation["reply"]["address"]["location"] == "$message.header#/reply_to"
    channel = document["channels"]["calc_add_call"]
    assert channel["address"] == "calc.add"
    assert channel["bindings"]["amqp"]["exchange"]["name"] == "burrow.rpc"


class _Old(Model):
    a: int
    b: int


class _Reply(Model):
    sum: int


def _service(request: type[BaseModel], reply: type[BaseModel], version: str = "1.0.0") -> Service:
    svc = Service("shop", version=version)

    async def add(req: Any) -> Any:
        raise NotImplementedError

    add.__annotations__ = {"req": request, "return": reply}
    svc.add_operation(add)
    return svc


def _compare(old: Service, new: Service) -> list[contracts.Change]:
    return contracts.compare(
        {old.name: contracts.contract(old)}, {new.name: contracts.contract(new)}
    )


def test_removed_request_field_is_breaking() -> None:
    """Dropping a request field breaks callers that still send it."""

    class New(Model):
        a: int

    changes = _compare(_service(_Old, _Reply), _service(New, _Reply))
    assert any(c.breaking and c.where.endswith(".b") for c in changes)


def test_optional_request_field_is_compatible() -> None:
    """Adding an optional request field is a compatible change."""

    class New(Model):
        a: int
        b: int
        note: str | None = None

    changes = _compare(_service(_Old, _Reply), _service(New, _Reply))
    assert changes
    assert not any(c.breaking for c in changes)


def test_new_required_field_and_narrowed_type_are_breaking() -> None:
    """A new required request field, or a request type narrowed, is flagged."""

    class Required(Model):
        a: int
        b: int
        c: int

    class Narrowed(Model):
        a: int
        b: bool

    assert any(c.breaking for c in _compare(_service(_Old, _Reply), _service(Required, _Reply)))
    assert any(c.breaking for c in _compare(_service(_Old, _Reply), _service(Narrowed, _Reply)))


def test_removed_reply_field_and_operation_are_breaking() -> None:
    """Callers miss a required reply field that is gone; a removed operation breaks every caller."""

    class Thin(Model):
        total: int

    old = _service(_Old, _Reply)
    assert any(c.breaking for c in _compare(old, _service(_Old, Thin)))
    gone = Service("shop")
    changes = _compare(old, gone)
    assert [c.what for c in changes if c.breaking] == ["operation removed"]


def test_added_reply_field_is_breaking() -> None:
    """A reply gaining a field, even an optional one, breaks callers whose model forbids extras."""

    class Wider(Model):
        sum: int
        note: str | None = None

    changes = _compare(_service(_Old, _Reply), _service(_Old, Wider))
    assert [(c.where, c.breaking) for c in changes] == [("shop.add reply.note", True)]
    assert "unknown fields are forbidden" in changes[0].what


def test_added_reply_field_is_compatible_when_readers_ignore_extras() -> None:
    """When the old reply model ignores unknown fields, adding one breaks nobody."""

    class Open(BaseModel):
        sum: int

    class Wider(BaseModel):
        sum: int
        note: str | None = None

    changes = _compare(_service(_Old, Open), _service(_Old, Wider))
    assert [(c.where, c.breaking) for c in changes] == [("shop.add reply.note", False)]


def test_removed_optional_reply_field_is_compatible() -> None:
    """Callers fill in the default of an optional reply field that is no longer sent."""

    class Full(Model):
        sum: int
        note: str | None = None

    changes = _compare(_service(_Old, Full), _service(_Old, _Reply))
    assert [(c.where, c.breaking) for c in changes] == [("shop.add reply.note", False)]


def test_type_and_constraint_rules_follow_who_reads() -> None:
    """Accepting more is fine where the service reads and breaks where it sends; less, reversed."""

    class Small(Model):
        n: int = Field(le=10)

    class Large(Model):
        n: int = Field(le=100)

    class Nullable(Model):
        n: int | None

    class Plain(Model):
        n: int

    def broken(
        request: type[Model], reply: type[Model], new_request: type[Model], new_reply: type[Model]
    ) -> list[str]:
        changes = _compare(_service(request, reply), _service(new_request, new_reply))
        assert changes
        return [c.where for c in changes if c.breaking]

    assert broken(Small, Plain, Large, Plain) == []  # the service accepts more
    assert broken(Plain, Small, Plain, Large) == ["shop.add reply.n"]  # it may send more
    assert broken(Plain, Large, Plain, Small) == []  # it sends less
    assert broken(Plain, Plain, Nullable, Plain) == []  # null now accepted
    assert broken(Plain, Plain, Plain, Nullable) == ["shop.add reply.n"]  # null now sent


def test_enum_values_follow_who_reads() -> None:
    """A new enum value is fine in a request and breaks in a reply (checked in `$defs`)."""

    def holder(*values: str) -> type[Model]:
        kind = enum.Enum("Kind", {value.upper(): value for value in values})  # type: ignore[misc]
        return create_model("Holder", kind=(kind, ...), __base__=Model)

    two, three = holder("a", "b"), holder("a", "b", "c")
    request = _compare(_service(two, _Reply), _service(three, _Reply))
    assert [(c.where, c.breaking) for c in request] == [("shop.add request Kind", False)]
    reply = _compare(_service(_Old, two), _service(_Old, three))
    assert [(c.where, c.breaking) for c in reply] == [("shop.add reply Kind", True)]
    assert reply[0].what.startswith("constraints widened (enum)")


class _Sale(Model):
    sku: str


def _emitter(model: type[Model]) -> Service:
    svc = Service("shop")
    svc.event("shop.sold", model)
    return svc


def _subscriber(model: type[Model], pattern: str = "shop.sold") -> Service:
    svc = Service("audit")

    async def on_sale(event: Any) -> None:
        raise NotImplementedError

    on_sale.__annotations__ = {"event": model, "return": None}
    svc.subscribe(pattern)(on_sale)
    return svc


def test_added_event_field_is_breaking() -> None:
    """An emitted event gaining a field breaks subscribers whose model forbids extras."""

    class Richer(Model):
        sku: str
        price: int | None = None

    changes = _compare(_emitter(_Sale), _emitter(Richer))
    assert [(c.where, c.breaking) for c in changes] == [("event shop.sold.price", True)]
    assert changes[0].what.startswith("field added: subscribers on the old model refuse it")


def test_subscription_event_model_is_checked_as_read_by_the_service() -> None:
    """A subscription's model is read by the service: like a request, not like an event it emits."""

    class Optional(Model):
        sku: str
        price: int | None = None

    class Required(Model):
        sku: str
        price: int

    class Renamed(Model):
        item: str

    def check(new: Service) -> list[tuple[str, bool]]:
        return [(c.where, c.breaking) for c in _compare(_subscriber(_Sale), new)]

    assert check(_subscriber(Optional)) == [("audit.on_sale event.price", False)]
    assert check(_subscriber(Required)) == [("audit.on_sale event.price", True)]
    assert sorted(check(_subscriber(Renamed))) == [
        ("audit.on_sale event.item", True),  # publishers do not send it
        ("audit.on_sale event.sku", True),  # publishers still send it: refused as unknown
    ]
    assert check(_subscriber(_Sale, pattern="shop.*")) == [("audit.on_sale", False)]
    assert check(Service("audit")) == [("audit.on_sale", False)]  # publishers are unaffected


def test_major_version_bump_allows_breaking_changes() -> None:
    """The same break is reported as allowed once the major version went up."""

    class New(Model):
        a: int

    changes = _compare(_service(_Old, _Reply), _service(New, _Reply, version="2.0.0"))
    assert changes
    assert not any(c.breaking for c in changes)


def test_cli_check_exits_non_zero_on_a_break(tmp_path: Path) -> None:
    """`burrow schemas check --against DIR` fails on a breaking change, passes on none."""
    contracts.export([calc], _settings(), tmp_path)
    same = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "burrow"), "schemas", "check", "--against", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert same.returncode == 0, same.stdout + same.stderr
    doc = json.loads((tmp_path / "contract.json").read_text(encoding="utf-8"))
    # The published reply lacked `sum`: today's calc.add adds it, which old callers refuse.
    reply = doc["calc"]["operations"]["calc.add"]["reply"]
    del reply["properties"]["sum"]
    reply["required"].remove("sum")
    (tmp_path / "contract.json").write_text(json.dumps(doc), encoding="utf-8")
    broken = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "burrow"), "schemas", "check", "--against", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert broken.returncode == 1
    lines = broken.stdout.splitlines()
    assert (
        "BREAKING: calc.add reply.sum: field added: callers on the old model refuse it "
        "(unknown fields are forbidden)"
    ) in lines
    assert lines[-1] == "1 breaking, 0 compatible change(s)"


def test_operation_without_reply_model_has_an_empty_object_reply(
    tmp_path: Path, asyncapi_meta_schema: dict[str, Any]
) -> None:
    """A `-> None` operation's reply schema is the empty object it answers; every document
    (contract, JSON Schemas, AsyncAPI, OpenAPI) still generates and validates."""
    svc = Service("notes")

    @svc.operation()
    async def note(req: _Old) -> None:
        """Record it."""

    reply = contracts.contract(svc)["operations"]["notes.note"]["reply"]
    jsonschema.Draft202012Validator.check_schema(reply)
    jsonschema.validate({}, reply)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"sum": 1}, reply)
    written = {path.name: path for path in openapi.export([svc], _settings(), tmp_path)}
    assert "notes.note.reply.json" in written
    validate(json.loads(written["openapi.json"].read_text(encoding="utf-8")))
    document = yaml.safe_load(written["asyncapi.yaml"].read_text(encoding="utf-8"))
    errors = list(jsonschema.Draft7Validator(asyncapi_meta_schema).iter_errors(document))
    assert errors == [], [error.message for error in errors[:5]]
    with_reply = _service(_Old, _Reply)
    changes = contracts.compare(
        {"shop": contracts.contract(with_reply)},
        {"shop": {**contracts.contract(with_reply), "operations": {
            "shop.add": {**contracts.contract(with_reply)["operations"]["shop.add"],
                         "reply": reply}}}},
    )  # fmt: skip
    assert [change.breaking for change in changes] == [True]
