"""Contracts: schemas/ is what the code generates, every schema is valid, AsyncAPI 3.0 holds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service import Model, Service, contracts, load_settings
from service.example import calc

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
    written = contracts.export([calc], _settings(), tmp_path)
    expected = {path.name for path in written}
    assert {path.name for path in SCHEMAS.iterdir()} == expected
    for path in written:
        assert (SCHEMAS / path.name).read_text(encoding="utf-8") == path.read_text(
            encoding="utf-8"
        ), f"schemas/{path.name} drifted from the code; run `make schemas`"


def test_every_json_schema_passes_the_2020_12_meta_schema() -> None:
    """Each generated message schema is a valid JSON Schema 2020-12 document."""
    files = [path for path in SCHEMAS.glob("*.json") if path.name != "contract.json"]
    assert files
    for path in files:
        schema = json.loads(path.read_text(encoding="utf-8"))
        assert schema["$schema"] == contracts.SCHEMA_DIALECT
        jsonschema.Draft202012Validator.check_schema(schema)


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


def _service(request: type[Model], reply: type[Model], version: str = "1.0.0") -> Service:
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
    """Readers of a reply lose a field; a removed operation breaks every caller."""

    class Thin(Model):
        total: int

    old = _service(_Old, _Reply)
    assert any(c.breaking for c in _compare(old, _service(_Old, Thin)))
    gone = Service("shop")
    changes = _compare(old, gone)
    assert [c.what for c in changes if c.breaking] == ["operation removed"]


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
    doc["calc"]["operations"]["calc.add"]["reply"]["properties"]["extra"] = {"type": "string"}
    (tmp_path / "contract.json").write_text(json.dumps(doc), encoding="utf-8")
    broken = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "burrow"), "schemas", "check", "--against", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert broken.returncode == 1
    assert "BREAKING: calc.add reply.extra: field removed" in broken.stdout
