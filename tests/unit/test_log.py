"""Logs beside the metrics: one structlog pipeline for Burrow's and aio-pika/aiormq's records.

JSON lines in production, a console renderer otherwise; the library loggers keep their names.
(Moved from tests/integration/test_metrics_logs.py: no broker is involved.)
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from service._observe.log import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_stdlib_logging() -> Iterator[None]:
    """Put back the root handlers and library levels configure_logging replaces."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, previous in libraries.items():
        logging.getLogger(name).setLevel(previous)


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_burrow_and_library_records(capsys: pytest.CaptureFixture[str]) -> None:
    """In JSON mode Burrow's and aiormq's/aio-pika's records are JSON lines with level and name."""
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(correlation_id="c-1", message_id="m-1")
    structlog.get_logger("burrow.test").info("handled", operation="calc.add")
    logging.getLogger("aiormq.connection").error("Connection %s lost", "amqp://x")
    logging.getLogger("aio_pika.robust_connection").error("reconnect failed")
    logging.getLogger("aiormq.connection").warning("below the library threshold")

    lines = _json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == [
        "handled",
        "Connection amqp://x lost",
        "reconnect failed",
    ]
    own, aiormq_line, aio_pika_line = lines
    assert own["logger"] == "burrow.test"
    assert own["operation"] == "calc.add"
    assert aiormq_line["logger"] == "aiormq.connection"
    assert aio_pika_line["logger"] == "aio_pika.robust_connection"
    for line in lines:
        assert line["correlation_id"] == "c-1"
        assert line["message_id"] == "m-1"
        assert line["level"] in ("info", "error")
        assert str(line["timestamp"]).endswith("Z")


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    """Console mode renders readable lines, for library records too."""
    configure_logging("console", "debug")
    structlog.get_logger("burrow.test").info("hello", operation="calc.add")
    logging.getLogger("aiormq.connection").error("library says hi")
    err = capsys.readouterr().err
    assert "hello" in err
    assert "operation" in err
    assert "library says hi" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_level_filters_burrow_records(capsys: pytest.CaptureFixture[str]) -> None:
    """At `warning`, info lines are dropped and warnings kept."""
    configure_logging("json", "warning")
    log = structlog.get_logger("burrow.test")
    log.info("quiet")
    log.warning("loud")
    assert [line["event"] for line in _json_lines(capsys.readouterr().err)] == ["loud"]


def test_burrow_loggers_print_on_stderr_while_structlog_is_unconfigured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With no logging configuration (a script using a Client), Burrow's lines go to stderr,
    never stdout, and structlog's configuration is left as it was."""
    structlog.reset_defaults()
    before = structlog.get_config()
    log = get_logger("burrow.transport")
    log.info("broker connected", url="amqp://guest:***@127.0.0.1:5672/")
    log.bind(link="client").warning("broker connection lost")
    out, err = capsys.readouterr()
    assert out == ""
    assert "broker connected" in err
    assert "broker connection lost" in err
    assert structlog.get_config() == before
    assert not structlog.is_configured()


def test_burrow_loggers_follow_the_users_structlog_configuration() -> None:
    """Once the user configured structlog, Burrow's lines go where theirs go, even through a
    logger made before the configuration."""
    log = get_logger("burrow.transport")
    out = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=out),
    )
    log.info("broker connected", link="client")
    assert json.loads(out.getvalue()) == {"event": "broker connected", "link": "client"}


def test_burrow_loggers_go_through_configure_logging(capsys: pytest.CaptureFixture[str]) -> None:
    """Under `configure_logging` (burrow run, the CLI) they are the pipeline's JSON lines on
    stderr, with their logger name."""
    configure_logging("json", "info")
    get_logger("burrow.transport").info("broker connected")
    out, err = capsys.readouterr()
    assert out == ""
    [line] = _json_lines(err)
    assert (line["event"], line["logger"]) == ("broker connected", "burrow.transport")
