"""A broker's refusal of the handshake is read from what each supported aiormq raises."""

from __future__ import annotations

from pamqp import commands as spec
from pamqp.exceptions import AMQPInternalError

from service.transport import _describe, _vhost_refusal

__all__: list[str] = []


def test_a_refused_vhost_is_read_from_aiormq_before_7_2() -> None:
    """aiormq 7.1 raises pamqp's AMQPInternalError with the broker's Connection.Close among its
    arguments (7.2 on: an InvalidFrameError); both are the broker's refusal."""
    close = spec.Connection.Close(reply_code=530, reply_text="NOT_ALLOWED - vhost shop not found")
    refused = AMQPInternalError("one of ['Connection.OpenOk']", close)
    assert _vhost_refusal(refused) == "NOT_ALLOWED - vhost shop not found"
    assert _describe(refused).startswith("the broker closed the connection: 530 NOT_ALLOWED")
