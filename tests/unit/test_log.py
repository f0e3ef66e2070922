"""Logs beside the metrics: one structlog pipeline for Burrow's and aio-pika/aiormq's records.

JSON lines in production, a console renderer otherwise; the library loggers keep their names.
(Moved from tests/integration/test_metrics_logs.py: no broker is involved.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from service._observe.log import configure_logging


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
