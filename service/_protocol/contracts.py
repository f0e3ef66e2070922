"""Contracts as artifacts: JSON Schemas and an AsyncAPI 3.0 document generated from the models,
and the breaking-change check between two versions of them.

`schemas/contract.json` is the machine-readable whole (what the check compares); one JSON Schema
file per message and `schemas/asyncapi.yaml` are for other tools and languages.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from service._protocol.config import Settings
from service._protocol.errors import ErrorCode
from service._protocol.jobs import JobState
from service._protocol.registry import Service
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_CALLBACK,
    H_DEADLINE,
    H_JOB_ID,
    H_KIND,
    H_STATUS,
    H_VERSION,
    HEADER_KINDS,
    JOB_ID_PATTERN,
    Kind,
    Names,
    Status,
)

# What users call on `service.contracts` (the rest is used inside the package).
__all__ = ["compare", "export", "load_contract"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _schema(model: type[BaseModel], mode: str, title: str) -> dict[str, Any]:
    schema = model.model_json_schema(mode=mode)  # type: ignore[arg-type]
    return {"$schema": SCHEMA_DIALECT, "$id": f"urn:burrow:{title}", **schema}


def reply_schema(model: type[BaseModel] | None, title: str) -> dict[str, Any]:
    """The reply body's schema: the reply model's, or for an operation without one (`-> None`)
    the empty object it answers with (docs/protocol.md §5.2)."""
    if model is not None:
        return _schema(model, "serialization", title)
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"urn:burrow:{title}",
        "title": "NoReply",
        "description": "The operation has no reply model: it answers an empty object.",
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }


def error_schema() -> dict[str, Any]:
    """The error body of an error reply or `.failed` completion."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": "urn:burrow:error",
        "title": "Error",
        "type": "object",
        "required": ["code", "message", "details", "retryable"],
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
            "message": {"type": "string"},
            "details": {"type": "object"},
            "retryable": {"type": "boolean"},
        },
    }


def job_status_schema() -> dict[str, Any]:
    """The body of the reply to a `result` call (docs/protocol.md §7.3)."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": "urn:burrow:job-status",
        "title": "JobStatus",
        "type": "object",
        "required": ["job_id", "state"],
        "additionalProperties": False,
        "properties": {
            "job_id": {"type": "string", "pattern": JOB_ID_PATTERN},
            "state": {"type": "string", "enum": [state.value for state in JobState]},
            "result": {"description": "the operation's reply JSON; only when completed"},
            "error": {"$ref": "urn:burrow:error", "description": "only when failed"},
        },
    }


def envelope_schema() -> dict[str, Any]:
    """The AMQP headers Burrow reads and writes (docs/protocol.md)."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": "urn:burrow:envelope-headers",
        "title": "EnvelopeHeaders",
        "type": "object",
        "description": (
            "AMQP field-table values; how each AMQP type is read is in docs/protocol.md §3. "
            "Text may also arrive as a byte array or long string of UTF-8 bytes."
        ),
        "properties": {
            H_DEADLINE: {
                "type": "number",
                "exclusiveMinimum": 0,
                "exclusiveMaximum": 2**53,
                "description": (
                    "ms since the epoch; Burrow sends an integer and accepts any integer "
                    "width, a float, double or decimal (rounded), or an AMQP timestamp; any "
                    "other value present is refused with INVALID_ARGUMENT"
                ),
            },
            H_KIND: {
                "type": "string",
                "enum": [kind.value for kind in Kind if kind in HEADER_KINDS],
                "description": "other values and types are treated as absent",
            },
            H_STATUS: {"type": "string", "enum": [status.value for status in Status]},
            H_VERSION: {
                "type": ["string", "integer"],
                "pattern": "^[0-9]+$",
                "description": "a string or an integer; another type is refused (INVALID_ARGUMENT)",
            },
            H_JOB_ID: {"type": "string", "pattern": JOB_ID_PATTERN},
            H_CALLBACK: {"type": "string", "maxLength": 255},
        },
    }


def contract(service: Service) -> dict[str, Any]:
    """Everything other services depend on, as one JSON-able document."""
    return {
        "service": service.name,
        "version": service.version,
        "accepts": list(service.accepts),
        "operations": {
            op.route: {
                "description": op.description,
                "request": _schema(op.request, "validation", f"{op.route}.request"),
                "reply": reply_schema(op.reply, f"{op.route}.reply"),
            }
            for op in service.operations.values()
        },
        "events": {
            name: _schema(model, "serialization", f"event.{name}")
            for name, model in sorted(service.events.items())
        },
        "subscriptions": {
            sub.route: {
                "pattern": sub.pattern,
                "group": sub.group,
                "event": _schema(sub.request, "validation", f"{sub.route}.event"),
            }
            for sub in service.subscriptions.values()
        },
    }


def export(services: Sequence[Service], settings: Settings, directory: Path) -> list[Path]:
    """Write contract.json, one schema per message, and asyncapi.yaml; return the files
    (`service.gateway._openapi.export` adds the gateway's document)."""

    directory.mkdir(parents=True, exist_ok=True)
    written: dict[Path, str] = {}
    contracts = {svc.name: contract(svc) for svc in services}
    written[directory / "contract.json"] = json_text(contracts)
    written[directory / "error.json"] = json_text(error_schema())
    written[directory / "envelope-headers.json"] = json_text(envelope_schema())
    written[directory / "job-status.json"] = json_text(job_status_schema())
    for doc in contracts.values():
        for route, op in doc["operations"].items():
            written[directory / f"{route}.request.json"] = json_text(op["request"])
            written[directory / f"{route}.reply.json"] = json_text(op["reply"])
        for name, schema in doc["events"].items():
            written[directory / f"event.{name}.json"] = json_text(schema)
    written[directory / "asyncapi.yaml"] = yaml.safe_dump(
        asyncapi_document(services, settings), sort_keys=False, width=100
    )
    for path, text in written.items():
        path.write_text(text, encoding="utf-8")
    return sorted(written)


def json_text(value: Any) -> str:
    """A document as schemas/ keeps it: indented, keys sorted, one final newline."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


# -- AsyncAPI ---------------------------------------------------------------------------------


def asyncapi_document(services: Sequence[Service], settings: Settings) -> dict[str, Any]:
    """An AsyncAPI 3.0 document: channels, operations, messages, AMQP bindings, request/reply."""
    names = Names(settings.namespace)
    schemas: dict[str, Any] = {"Error": hoist(error_schema(), {})}
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": " + ".join(svc.name for svc in services),
            "version": services[0].version if services else "0.0.0",
            "description": " ".join(svc.description for svc in services if svc.description)
            or "Burrow services",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:5672", "protocol": "amqp", "pathname": "/"},
        },
        "channels": {},
        "operations": {},
        "components": {"messages": {}, "schemas": schemas},
    }
    channels, operations = doc["channels"], doc["operations"]
    messages = doc["components"]["messages"]
    messages["Error"] = _message("Error", "Error", schemas)
    channels["reply"] = {
        "address": None,
        "description": f"The caller's direct reply-to queue ({DIRECT_REPLY_TO}).",
        "messages": {"reply": {"$ref": "#/components/messages/Error"}},
    }
    for svc in services:
        for op in svc.operations.values():
            key = op.route.replace(".", "_")
            req, rep = f"{key}_request", f"{key}_reply"
            schemas[req] = hoist(_schema(op.request, "validation", req), schemas)
            schemas[rep] = hoist(reply_schema(op.reply, rep), schemas)
            messages[req] = _message(op.route, req, schemas, correlated=True)
            messages[rep] = _message(f"{op.route}.reply", rep, schemas, correlated=True)
            channels[f"{key}_call"] = _channel(
                op.route, names.rpc_exchange, {"request": req}, op.description
            )
            channels[f"{key}_command"] = _channel(
                op.route, names.commands_exchange, {"request": req}, "cast or submit"
            )
            channels[f"{key}_reply"] = {
                "address": None,
                "messages": {
                    "reply": {"$ref": f"#/components/messages/{rep}"},
                    "error": {"$ref": "#/components/messages/Error"},
                },
            }
            completed = f"{key}_completed"
            channels[completed] = _channel(
                f"{op.route}.completed", names.events_exchange, {"result": rep}, "job finished"
            )
            channels[f"{key}_failed"] = _channel(
                f"{op.route}.failed", names.events_exchange, {"error": "Error"}, "job failed"
            )
            operations[f"{key}_call"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{key}_call"},
                "summary": op.description.splitlines()[0] if op.description else op.route,
                "reply": {
                    "address": {"location": "$message.header#/reply_to"},
                    "channel": {"$ref": f"#/channels/{key}_reply"},
                },
            }
            operations[f"{key}_command"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{key}_command"},
            }
            for outcome in ("completed", "failed"):
                operations[f"{key}_{outcome}"] = {
                    "action": "send",
                    "channel": {"$ref": f"#/channels/{key}_{outcome}"},
                }
        for name, model in sorted(svc.events.items()):
            key = "event_" + name.replace(".", "_")
            schemas[key] = hoist(_schema(model, "serialization", key), schemas)
            messages[key] = _message(name, key, schemas)
            channels[key] = _channel(name, names.events_exchange, {"event": key}, "event")
            operations[f"emit_{key}"] = {"action": "send", "channel": {"$ref": f"#/channels/{key}"}}
        for sub in svc.subscriptions.values():
            key = "subscription_" + sub.route.replace(".", "_")
            schemas[key] = hoist(_schema(sub.request, "validation", key), schemas)
            messages[key] = _message(sub.pattern, key, schemas)
            channels[key] = _channel(
                sub.pattern,
                names.events_exchange,
                {"event": key},
                f"group {sub.group}",
                queue=names.subscription_queue(sub.group, sub.name),
            )
            operations[key] = {"action": "receive", "channel": {"$ref": f"#/channels/{key}"}}
    return doc


def _channel(
    address: str,
    exchange: str,
    messages: dict[str, str],
    description: str,
    queue: str | None = None,
) -> dict[str, Any]:
    amqp: dict[str, Any] = {
        "is": "routingKey",
        "exchange": {
            "name": exchange,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        },
        "bindingVersion": "0.3.0",
    }
    if queue is not None:
        amqp = {
            "is": "queue",
            "queue": {
                "name": queue,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": "0.3.0",
        }
    return {
        "address": address,
        "description": description or address,
        "messages": {k: {"$ref": f"#/components/messages/{v}"} for k, v in messages.items()},
        "bindings": {"amqp": amqp},
    }


def _message(
    name: str, schema: str, schemas: dict[str, Any], *, correlated: bool = False
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{schema}"},
        "bindings": {"amqp": {"messageType": name, "bindingVersion": "0.3.0"}},
    }
    if correlated:
        message["correlationId"] = {"location": "$message.header#/correlation_id"}
    return message


def hoist(schema: dict[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    """Move pydantic's `$defs` into components.schemas and point the refs there."""
    schema = copy.deepcopy(schema)
    schema.pop("$schema", None)
    schema.pop("$id", None)
    for name, sub in schema.pop("$defs", {}).items():
        into.setdefault(name, _rewrite(sub))
    hoisted: dict[str, Any] = _rewrite(schema)
    return hoisted


def _rewrite(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else _rewrite(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(item) for item in value]
    return value


# -- breaking changes -------------------------------------------------------------------------
#
# A change breaks when a message valid under one side's schema is refused by the other side's
# model. Who reads decides the direction: the service reads requests and the events it
# subscribes to (the new model must accept everything the old one did), its peers read replies
# and events it emits with the old model (they must accept everything the new one sends). A
# `service.Model` forbids unknown fields, so a field the reader does not know is refused.


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two contracts."""

    where: str
    what: str
    breaking: bool

    def __str__(self) -> str:
        return f"{'BREAKING' if self.breaking else 'compatible'}: {self.where}: {self.what}"


@dataclass(frozen=True, slots=True)
class _Side:
    """Which way a message flows: `service_reads` (a request, a consumed event) or peers read."""

    service_reads: bool
    peers: str  # who is at the other end, for the messages: "callers", "subscribers", …


_REQUEST = _Side(service_reads=True, peers="callers")
_REPLY = _Side(service_reads=False, peers="callers")
_EVENT = _Side(service_reads=False, peers="subscribers")
_CONSUMED = _Side(service_reads=True, peers="publishers")


def load_contract(ref: str, root: Path) -> dict[str, Any]:
    """The contracts at a directory (holding contract.json) or a git ref of the repository."""
    path = Path(ref)
    if path.is_dir():
        return dict(json.loads((path / "contract.json").read_text(encoding="utf-8")))
    shown = subprocess.run(
        ["git", "show", f"{ref}:schemas/contract.json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode != 0:
        return {}  # nothing published at that ref: nothing can break
    return dict(json.loads(shown.stdout))


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every change from `old` to `new` contracts, each marked breaking or compatible.

    Requests and subscribed events are read by the service, replies and emitted events by its
    peers (see the comment above). A breaking change is allowed when the major version went up.
    """
    changes: list[Change] = []
    for service, before in old.items():
        after = new.get(service)
        if after is None:
            changes.append(Change(service, "service removed", True))
            continue
        found = _operations(before["operations"], after["operations"])
        found += _events(before["events"], after["events"])
        found += _subscriptions(before.get("subscriptions", {}), after.get("subscriptions", {}))
        if _major(after["version"]) > _major(before["version"]):
            found = [Change(c.where, c.what + " (major version bumped)", False) for c in found]
        changes += found
    return changes


def _operations(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    found: list[Change] = []
    for route, op in old.items():
        if route not in new:
            found.append(Change(route, "operation removed", True))
            continue
        found += _diff(f"{route} request", op["request"], new[route]["request"], _REQUEST)
        found += _diff(f"{route} reply", op["reply"], new[route]["reply"], _REPLY)
    found += [Change(route, "operation added", False) for route in sorted(new.keys() - old)]
    return found


def _events(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    found: list[Change] = []
    for name, schema in old.items():
        if name not in new:
            found.append(Change(name, "event removed: subscribers no longer get it", True))
        else:
            found += _diff(f"event {name}", schema, new[name], _EVENT)
    found += [Change(name, "event added", False) for name in sorted(new.keys() - old)]
    return found


def _subscriptions(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """What the service consumes: publishers are not broken by a subscriber going or moving."""
    found: list[Change] = []
    for route, sub in old.items():
        now = new.get(route)
        if now is None:
            found.append(Change(route, "subscription removed", False))
            continue
        if sub["pattern"] != now["pattern"]:
            what = f"pattern changed from {sub['pattern']!r} to {now['pattern']!r}"
            found.append(Change(route, what, False))
        if sub["group"] != now["group"]:
            what = f"group changed from {sub['group']!r} to {now['group']!r} (a new queue)"
            found.append(Change(route, what, False))
        found += _diff(f"{route} event", sub["event"], now["event"], _CONSUMED)
    found += [Change(route, "subscription added", False) for route in sorted(new.keys() - old)]
    return found


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def _diff(where: str, old: dict[str, Any], new: dict[str, Any], side: _Side) -> list[Change]:
    """Compare a model's schemas, and each nested model or enum both versions define."""
    changes = _diff_object(where, old, new, side)
    old_defs, new_defs = old.get("$defs", {}), new.get("$defs", {})
    for name, schema in old_defs.items():
        if name not in new_defs:
            continue  # a field now refers elsewhere: its type change is reported there
        if _is_object(schema) and _is_object(new_defs[name]):
            changes += _diff_object(f"{where} {name}", schema, new_defs[name], side)
        else:
            changes += _diff_value(f"{where} {name}", schema, new_defs[name], side)
    return changes


def _is_object(schema: dict[str, Any]) -> bool:
    return "properties" in schema or schema.get("type") == "object"


def _diff_object(where: str, old: dict[str, Any], new: dict[str, Any], side: _Side) -> list[Change]:
    changes: list[Change] = []
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    old_req, new_req = set(old.get("required", [])), set(new.get("required", []))
    # The reader's model decides whether an unknown field is refused: the new one when the
    # service reads, the old one (still in the peers' code) when peers read.
    closed = (new if side.service_reads else old).get("additionalProperties") is False
    was_closed = old.get("additionalProperties") is False
    if side.service_reads and closed != was_closed:
        if closed:
            what = f"unknown fields now refused: {side.peers} may send some"
        else:
            what = "unknown fields now ignored"
        changes.append(Change(where, what, closed))
    for field in sorted(old_props.keys() - new_props.keys()):
        changes.append(_removed(f"{where}.{field}", field in old_req, closed, side))
    for field in sorted(new_props.keys() - old_props.keys()):
        changes.append(_added(f"{where}.{field}", field in new_req, closed, side))
    for field in sorted(old_props.keys() & new_props.keys()):
        spot = f"{where}.{field}"
        if field in new_req and field not in old_req:
            if side.service_reads:
                changes.append(
                    Change(spot, f"field became required: {side.peers} may omit it", True)
                )
            else:
                changes.append(Change(spot, "field became required", False))
        if field in old_req and field not in new_req:
            # Burrow writes every field of a model, defaults included: it is still sent.
            what = "field became optional" if side.service_reads else "field gained a default"
            changes.append(Change(spot, what, False))
        changes += _diff_value(spot, old_props[field], new_props[field], side)
    return changes


def _removed(spot: str, required: bool, closed: bool, side: _Side) -> Change:
    """A field gone: refused when the service reads it, missed by peers that required it."""
    if side.service_reads:
        if closed:
            what = f"field removed: refused from {side.peers} still sending it"
            what += " (unknown fields are forbidden)"
            return Change(spot, what, True)
        return Change(spot, "field removed (unknown fields are ignored)", False)
    if required:
        what = f"required field removed: {side.peers} on the old model refuse messages without it"
        return Change(spot, what, True)
    what = f"optional field removed: {side.peers} on the old model fill in its default"
    return Change(spot, what, False)


def _added(spot: str, required: bool, closed: bool, side: _Side) -> Change:
    """A new field: missing from what peers send, or unknown to the peers' old models."""
    if side.service_reads:
        if required:
            what = f"required field added: refused from {side.peers} that do not send it"
            return Change(spot, what, True)
        return Change(spot, "optional field added", False)
    if closed:
        what = (
            f"field added: {side.peers} on the old model refuse it (unknown fields are forbidden)"
        )
        return Change(spot, what, True)
    return Change(spot, "field added (unknown fields are ignored)", False)


def _diff_value(where: str, old: dict[str, Any], new: dict[str, Any], side: _Side) -> list[Change]:
    """Compare one value's schema: its types, then (types equal) its constraints."""
    before, after = _types(old), _types(new)
    if before != after:
        move = "widened" if before <= after else "narrowed" if after <= before else "changed"
        return [_moved(where, "type", move, "", side)]
    was, now = _constraints(old), _constraints(new)
    moves = {key: _move(key, was.get(key), now.get(key)) for key in was.keys() | now.keys()}
    moves = {key: move for key, move in moves.items() if move}
    if not moves:
        return []
    kinds = set(moves.values())
    move = kinds.pop() if len(kinds) == 1 else "changed"
    return [_moved(where, "constraints", move, f" ({', '.join(sorted(moves))})", side)]


def _moved(where: str, subject: str, move: str, keys: str, side: _Side) -> Change:
    """A change of what a value may hold: fine when only the writer's side became stricter."""
    if side.service_reads:
        if move == "widened":
            return Change(where, f"{subject} widened{keys}", False)
        return Change(where, f"{subject} {move}{keys}: {side.peers} may send refused values", True)
    if move == "narrowed":
        return Change(where, f"{subject} narrowed{keys}", False)
    what = f"{subject} {move}{keys}: {side.peers} on the old model may refuse new values"
    return Change(where, what, True)


def _types(schema: dict[str, Any]) -> frozenset[str]:
    if "type" in schema:
        kinds = schema["type"]
        found = set(kinds if isinstance(kinds, list) else [kinds])
        return frozenset(found | ({"integer"} if "number" in found else set()))
    options: Iterable[dict[str, Any]] = schema.get("anyOf", []) or schema.get("oneOf", [])
    found_any: set[str] = set()
    for option in options:
        found_any |= _types(option)
    if "$ref" in schema:
        found_any.add("ref:" + str(schema["$ref"]))
    return frozenset(found_any) or frozenset({"any"})


# Keywords that do not restrict a value ("type" is compared by _types). Others not named in the
# bounds below (pattern, format, items, anyOf…) count as changed whenever they differ.
_NOT_CONSTRAINTS = frozenset(
    {"title", "description", "default", "examples", "type", "$id", "$schema", "$defs"}
)
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems"})


def _constraints(schema: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in schema.items() if k not in _NOT_CONSTRAINTS}
    if "const" in kept:  # Literal["a"] is const, Literal["a", "b"] an enum: one keyword
        kept["enum"] = [kept.pop("const")]
    return kept


def _move(key: str, old: Any, new: Any) -> str:
    """How one keyword moved: "" (not at all), "widened", "narrowed" or "changed"."""
    if old == new:
        return ""
    if old is None:
        return "narrowed"  # a new restriction
    if new is None:
        return "widened"
    if key == "enum":
        before = {json.dumps(v, sort_keys=True) for v in old}
        after = {json.dumps(v, sort_keys=True) for v in new}
        return "widened" if before <= after else "narrowed" if after <= before else "changed"
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
    if numbers and key in _LOWER_BOUNDS:
        return "widened" if new < old else "narrowed"
    if numbers and key in _UPPER_BOUNDS:
        return "widened" if new > old else "narrowed"
    return "changed"
