"""The HTTP examples' error mapping (examples/http_errors.py), without a broker. (Moved from
tests/integration/test_examples.py.)"""

from __future__ import annotations

from examples.http_errors import HTTP_STATUS, error_answer
from service import ErrorCode, MessageTooLarge, QueueFull, ServiceError, Unavailable

__all__: list[str] = []


def test_every_error_code_has_one_status() -> None:
    """The mapping covers the closed set of codes; overload statuses carry Retry-After."""
    assert set(HTTP_STATUS) == set(ErrorCode)
    busy = error_answer(QueueFull("queue full"))
    assert (busy.status, busy.headers) == (503, {"Retry-After": "1"})
    assert busy.body["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert error_answer(Unavailable()).headers["Retry-After"] == "5"
    assert error_answer(MessageTooLarge("too big")).status == 413
    assert error_answer(ServiceError("boom")).status == 500
