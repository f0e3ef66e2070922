"""Faults E3 and F1 of RELIABILITY.md: a nacked publish, and wrong credentials.

A nack must surface as an error and a metric; a bad password must fail fast and never be logged.
"""

from __future__ import annotations

import time

import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from service import BurrowError, PublishFailed, ResourceExhausted
from service.types import Outgoing
from tests.faults.conftest import MakeClient, MakeLink
from tests.faults.harness import PrivateBroker

__all__: list[str] = []

_PASSWORD = "Sup3r-S3cret-zq9x"


def _nacked() -> float:
    value = REGISTRY.get_sample_value(
        "burrow_messages_published_total", {"kind": "event", "outcome": "nacked"}
    )
    return value or 0.0


async def test_e3_nacked_publish_is_an_error(
    make_link: MakeLink, amqp_channel: AbstractChannel, namespace: str
) -> None:
    """E3: a publish the broker nacks (queue full, reject-publish) raises and is counted."""
    queue = f"{namespace}.bounded"
    await amqp_channel.declare_queue(
        queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    link = await make_link()

    def message(i: int) -> Outgoing:
        return Outgoing(exchange="", routing_key=queue, body=b"{}", message_id=f"e3-{i}")

    await link.publish(message(0), kind="event", mandatory=True)
    before = _nacked()
    with pytest.raises((ResourceExhausted, PublishFailed)) as caught:
        await link.publish(message(1), kind="event", mandatory=True)
    assert caught.value.retryable
    assert _nacked() == before + 1


async def test_f1_wrong_credentials_fail_fast(
    broker: PrivateBroker, make_client: MakeClient
) -> None:
    """F1: wrong credentials fail fast with an error that says the login was refused."""
    client = await make_client(broker.url_for("guest", _PASSWORD), start=False)
    started = time.monotonic()
    with pytest.raises(BurrowError) as caught:
        await client.start(timeout=8)
    elapsed = time.monotonic() - started
    text = str(caught.value).lower()
    assert "refused the login" in text or "credential" in text or "authentic" in text, text
    assert elapsed < 4, f"took {elapsed:.1f}s: retried until the timeout"


async def test_f1_password_never_logged(
    broker: PrivateBroker,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """F1: failed logins never put the password in a log line, stdout, stderr or the error."""
    client = await make_client(broker.url_for("guest", _PASSWORD), start=False)
    with capture_logs() as logs, pytest.raises(BurrowError) as caught:
        await client.start(timeout=2)
    assert logs, "the failed logins were not logged at all"
    out = capsys.readouterr()
    for where, text in (
        ("structlog", repr(logs)),
        ("stdlib logging", caplog.text),
        ("stdout", out.out),
        ("stderr", out.err),
        ("error", str(caught.value)),
    ):
        assert _PASSWORD not in text, f"password leaked to {where}"
