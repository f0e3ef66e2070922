"""The wire format: JSON bodies and their limits; bytes in, validated models out.

Sits between the transport (bytes, properties) and handlers (pydantic models). Nothing is
ever unpickled or decompressed: only `application/json` in UTF-8 is accepted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any, TypeVar

import orjson
import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError

from service._protocol.errors import Internal, InvalidArgument, MessageTooLarge, ServiceError
from service._protocol.types import Delivery

CONTENT_TYPE = "application/json"
_ACCEPTED_ENCODINGS = frozenset({None, "", "identity", "utf-8", "utf8"})

MAX_ERROR_DETAILS = 20

M = TypeVar("M", bound=BaseModel)


class Model(BaseModel):
    """Base for request, reply and event models: unknown fields are an error, not ignored.

    Floats must be finite: NaN and ±Infinity are refused when a model is built, and would be
    written as `NaN`/`Infinity` (which `encode` refuses) rather than as a schema-breaking null.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, ser_json_inf_nan="constants"
    )


def check_envelope(delivery: Delivery, max_bytes: int) -> None:
    """Refuse what must not be parsed at all: oversize bodies, foreign content types/encodings."""
    if len(delivery.body) > max_bytes:
        raise MessageTooLarge(
            f"body of {len(delivery.body)} bytes exceeds the limit of {max_bytes}",
            details={"limit": max_bytes, "size": len(delivery.body)},
        )
    content_type = delivery.content_type
    if content_type != CONTENT_TYPE:  # the common case skips the normalisation below
        content_type = (content_type or "").split(";", 1)[0].strip().lower()
    if content_type != CONTENT_TYPE:
        given = _clip(delivery.content_type)  # "" when absent: details hold strings only
        shown = f"unsupported content type {given!r}" if given else "no content type"
        raise InvalidArgument(f"{shown}; send {CONTENT_TYPE}", details={"content_type": given})
    encoding = delivery.content_encoding
    if encoding and encoding.lower() not in _ACCEPTED_ENCODINGS:
        raise InvalidArgument(
            f"unsupported content encoding {_clip(delivery.content_encoding)!r}",
            details={"content_encoding": _clip(delivery.content_encoding)},
        )


# Numbers JSON cannot carry. pydantic's JSON parser reads `NaN`, `Infinity` and `-Infinity`
# and turns 1e400 into inf; orjson refuses those but turns integers beyond 64 bits into floats.
# Both fast paths stay: a scan says when the exact stdlib parser must look too. A non-finite
# number needs a NaN/Infinity token, a 3-digit exponent or 200+ digits before the point (the
# largest double is 1.8e308); orjson is exact within [-2**63, 2**64), i.e. below 20 digits.
# The scan is one translate and a few substring searches (~2 ms per MB; a regex takes ~15):
# digits read '0', e and E read 'e', and '+', '-' and the letters of NaN and Infinity stay;
# every other byte reads ' ', so a match in the scan is a match in the body.
def _scan_table() -> bytes:
    table = bytearray(b" " * 256)
    for char in b"0123456789":
        table[char] = ord("0")
    for char in b"+-NaIfinty":
        table[char] = char
    table[ord("e")] = table[ord("E")] = ord("e")
    return bytes(table)


_SCAN = _scan_table()
_NON_FINITE_SIGNS = (b"NaN", b"Infinity", b"e000", b"e+000", b"0" * 200)
_BIG_INT_SIGNS = (b"0" * 20, b"-" + b"0" * 19)


def _maybe(body: bytes, signs: tuple[bytes, ...]) -> bool:
    scan = body.translate(_SCAN)
    return any(sign in scan for sign in signs)


_NOT_JSON_NUMBER = "malformed JSON: NaN, Infinity and numbers beyond ±1.8e308 are not JSON numbers"


class _NonFinite(Exception):
    """A NaN/Infinity token or an out-of-range number met by the stdlib parser."""


def _no_constant(token: str) -> Any:
    raise _NonFinite(token)


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400 overflows to inf
        raise _NonFinite(text)
    return number


def _exact_loads(text: str | bytes) -> Any:
    """Stdlib JSON with exact integers, refusing NaN, Infinity and overflowing floats."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def decode_model(model: type[M], body: bytes) -> M:
    """Parse and validate in one pass (pydantic's JSON path, straight from bytes).

    Integers keep their exact value at any size; NaN, Infinity and 1e400 are malformed JSON
    (whatever the field's type, `Any` included).
    """
    if _maybe(body, _NON_FINITE_SIGNS):
        try:
            _exact_loads(body)
        except _NonFinite:
            raise InvalidArgument(_NOT_JSON_NUMBER, details={"reason": "json"}) from None
        except (ValueError, RecursionError):
            pass  # not JSON at all (or too deep): pydantic says why, below
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from None


def decode_answer(body: bytes, model: type[BaseModel] | None = None) -> Any:
    """`decode_json` (or `decode_model` into `model`) for what a service answered, a reply's or
    completion's body. A body that is not JSON, or does not match the reply model, is the
    answering side's fault: `Internal` (same details), not `InvalidArgument`, which tells a
    caller that its own input was bad."""
    try:
        return decode_json(body) if model is None else decode_model(model, body)
    except InvalidArgument as exc:
        if model is not None and exc.details.get("reason") == "schema":
            raise _not_the_reply(model, exc) from None
        raise Internal(f"the answer's body is {exc.message}", details=exc.details) from None


def validate_answer(model: type[M], value: Any) -> M:
    """An answer already decoded (a job's result) validated into the caller's reply model;
    `Internal` when it does not match, as `decode_answer` says."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _not_the_reply(model, _invalid(exc)) from None


def _not_the_reply(model: type[BaseModel], invalid: InvalidArgument) -> Internal:
    problem = f"the answer does not match the reply model {model.__name__}"
    return Internal(problem, details=invalid.details)


def decode_json(body: bytes) -> Any:
    """Parse JSON without a schema (replies read by untyped callers, CLI).

    Integers keep their exact value at any size (orjson, unless a 20-digit run means one may
    be beyond 64 bits: then the stdlib parser); NaN, Infinity and 1e400 are malformed JSON.
    """
    if not _maybe(body, _BIG_INT_SIGNS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(
                f"malformed JSON: {exc.msg}", details={"reason": "json"}
            ) from None
    try:
        return _exact_loads(body)
    except _NonFinite:
        raise InvalidArgument(_NOT_JSON_NUMBER, details={"reason": "json"}) from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc.msg}", details={"reason": "json"}) from None
    except UnicodeDecodeError:
        raise InvalidArgument("malformed JSON: not UTF-8", details={"reason": "json"}) from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        problem = "malformed JSON: an integer has too many digits"
        raise InvalidArgument(problem, details={"reason": "json"}) from None
    except RecursionError:
        problem = "malformed JSON: nested too deeply"
        raise InvalidArgument(problem, details={"reason": "json"}) from None


def encode(value: Any) -> bytes:
    """Serialise a model, dict or list to compact JSON bytes; integers stay exact.

    Raises:
        ValueError: the value holds NaN or ±Infinity, which JSON cannot carry (a handler's
            reply: the caller gets INTERNAL, never a null where the schema promises a number).
    """
    if isinstance(value, BaseModel) and not _writes_constants(type(value)):
        _refuse_non_finite(value.model_dump())  # a model that would write NaN as null
    out = pydantic_core.to_json(value, inf_nan_mode="constants")
    if (b"NaN" in out or b"Infinity" in out) and _has_constants(out):
        raise ValueError("NaN or Infinity cannot be sent as JSON")
    return out


def encode_error(error: ServiceError) -> bytes:
    """An error body (§11). Details that JSON cannot carry (NaN, objects) are replaced by a
    note rather than losing the whole answer."""
    wire = error.to_wire()
    try:
        return encode(wire)
    except ValueError:  # also pydantic_core.PydanticSerializationError
        wire["details"] = {"dropped": "the error's details could not be encoded as JSON"}
        return encode(wire)


def _has_constants(out: bytes) -> bool:
    """Whether JSON written by pydantic holds a NaN/Infinity token (not just the text)."""
    try:
        json.loads(out, parse_constant=_no_constant, parse_int=str, parse_float=str)
    except _NonFinite:
        return True
    except (ValueError, RecursionError):
        return True  # cannot tell: refusing beats sending what may not be JSON
    return False


@functools.cache
def _writes_constants(cls: type[BaseModel]) -> bool:
    """Whether every model in `cls`'s schema writes non-finite floats as NaN/Infinity (like
    `Model`), so `encode` sees them; others (pydantic's default) write null."""
    stack: list[Any] = [cls.__pydantic_core_schema__]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            config = node.get("config")
            if isinstance(config, dict) and config.get("ser_json_inf_nan") != "constants":
                return False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return True


def _refuse_non_finite(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("NaN or Infinity cannot be sent as JSON")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)


def body_fingerprint(body: bytes) -> dict[str, Any]:
    """What logs may hold of an untrusted body: its size and a hash, never any of its bytes."""
    return {
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest()[:16],
    }


def _invalid(exc: ValidationError) -> InvalidArgument:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if errors and errors[0]["type"] == "json_invalid":
        return InvalidArgument(f"malformed JSON: {errors[0]['msg']}", details={"reason": "json"})
    fields = [
        {"loc": ".".join(str(part) for part in err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in errors[:MAX_ERROR_DETAILS]
    ]
    return InvalidArgument(
        f"request does not match the schema ({len(errors)} error(s))",
        details={"reason": "schema", "errors": fields},
    )


def _clip(value: str | None, limit: int = 64) -> str:
    if value is None:
        return ""
    return value if len(value) <= limit else value[:limit] + "…"
