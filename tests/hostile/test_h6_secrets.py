"""H6: secrets stay out of output. A password with an unescaped `/ # ? @` in BURROW_AMQP_URL is
refused at start, naming the variable, never showing the password; refused bodies are logged
by size and hash only; URLs in log lines (ours or a library's) have their password masked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import aio_pika
import pytest
import structlog
from structlog.testing import capture_logs

from service import Client, InvalidArgument
from service._observe.log import configure_logging
from service._protocol.vocabulary import H_KIND, Names
from service.example import calc
from tests.brokers import TEST_BROKER
from tests.conftest import AppFactory
from tests.integration.test_async_support import next_dead_letter

__all__: list[str] = []

SECRET = "hunter2-Very-Secret"


@pytest.mark.parametrize("char", ["/", "#", "?", "@"], ids=["slash", "hash", "question", "at"])
def test_h6_unescaped_password_refused_at_start(char: str, namespace: str) -> None:
    """`burrow run` with a password holding an unescaped / # ? or @ exits non-zero within a few
    seconds, naming BURROW_AMQP_URL and percent-encoding, with no part of the password shown."""
    password = f"{SECRET[:7]}{char}{SECRET[7:]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BURROW_")},
        "BURROW_AMQP_URL": f"amqp://guest:{password}@{TEST_BROKER.host}:{TEST_BROKER.port}/",
        "BURROW_NAMESPACE": namespace,
        "BURROW_HTTP_PORT": "0",
        "BURROW_LOG_FORMAT": "json",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert elapsed < 20, f"took {elapsed:.1f}s: retrying instead of refusing?"
    assert "BURROW_AMQP_URL" in done.stderr
    assert "percent-encode" in done.stderr
    for part in (password, SECRET[:7], SECRET[7:], "Very-Secret"):
        assert part not in output
    assert "broker connection failed" not in output
    assert "burrow starting" not in output


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(f'{{"password": "{SECRET}"}}'.encode(), id="schema"),
        pytest.param(f'{{"password":"{SECRET}'.encode(), id="malformed"),
        pytest.param(f'{{"password": "{SECRET}", "a": NaN}}'.encode(), id="nan"),
    ],
)
async def test_h6_refused_body_logged_by_size_and_hash_only(
    start_app: AppFactory, client: Client, body: bytes
) -> None:
    """A refused call body holding a password appears in no log line: the `handled` line has
    its size and hash, not a byte of it."""
    await start_app(calc)
    with capture_logs() as logs, pytest.raises(InvalidArgument):
        await client.rpc.call_raw("calc.add", body, timeout=5)
    text = repr(logs)
    assert SECRET not in text
    assert "password" not in text
    [handled] = [entry for entry in logs if entry["event"] == "handled"]
    assert handled["body_size"] == len(body)
    assert handled["body_sha256"] == hashlib.sha256(body).hexdigest()[:16]
    assert "body_prefix" not in handled


async def test_h6_refused_cast_body_not_logged(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A refused cast (no caller: dead-lettered) holding a password is logged without it."""
    await start_app(calc)
    names = Names(namespace)
    exchange = await amqp_channel.get_exchange(names.commands_exchange, ensure=False)
    body = f'{{"password": "{SECRET}"}}'.encode()
    with capture_logs() as logs:
        await exchange.publish(
            aio_pika.Message(
                body, content_type="application/json", type="calc.add", headers={H_KIND: "cast"}
            ),
            routing_key="calc.add",
        )
        dead = await next_dead_letter(amqp_channel, names.dead_letter_queue("calc"))
    assert dead.body == body  # kept whole in the DLQ, where it can be inspected
    text = repr(logs)
    assert SECRET not in text
    assert "password" not in text
    assert any(entry.get("body_size") == len(body) for entry in logs)


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers and library levels: put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lib_level in libraries.items():
        logging.getLogger(name).setLevel(lib_level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("_restore_logging")
def test_h6_log_pipeline_masks_url_passwords(capsys: pytest.CaptureFixture[str]) -> None:
    """Any amqp:// or redis:// URL in a log line, ours or a library's, even with an unescaped
    character in its password, is written with the password masked."""
    configure_logging("json", "info")
    structlog.get_logger("burrow.test").warning(
        "connect failed", url=f"amqp://u:{SECRET}@rabbit/", urls=[f"amqps://u:{SECRET}@b/"]
    )
    logging.getLogger("aiormq.connection").error(
        "cannot connect to amqp://u:%s@rabbit:5672/ or redis://:%s@cache/0", "x/" + SECRET, SECRET
    )
    err = capsys.readouterr().err
    assert SECRET not in err
    assert "amqp://u:***@rabbit/" in err
    assert "amqps://u:***@b/" in err
    assert "amqp://u:***@rabbit:5672/" in err
    assert "redis://:***@cache/0" in err
