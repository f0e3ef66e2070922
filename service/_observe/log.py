"""Logging: structlog JSON lines in production, a readable console on a terminal.

Standard-library loggers (aio-pika, aiormq, aiohttp) are routed through the same pipeline.
Every line passes `redact_secrets` last: a broker or Redis URL anywhere in it (a message, a
field, an exception's text) is shown with its password masked (`config.redact_url`). Message ids
are strings in every line: an absent `correlation_id` is `""`, never `null`.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal

import structlog

from service._protocol.config import redact_url

_URL = re.compile(r"\b(?:amqps?|rediss?)://\S+", re.IGNORECASE)


def _redact_text(text: str) -> str:
    if "://" not in text:  # the common case: nothing to look at
        return text
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


def redact_secrets(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Processor: mask URL passwords in every text value (and in lists of texts)."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = _redact_text(value)
        elif isinstance(value, list | tuple) and any(isinstance(item, str) for item in value):
            event_dict[key] = [_redact_text(i) if isinstance(i, str) else i for i in value]
    return event_dict


def empty_ids(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Processor: an id field bound as None (a message without a correlation id) reads `""`,
    as in the per-message `handled` line, so a query on the field needs one spelling."""
    for key in _ID_FIELDS:
        if key in event_dict and event_dict[key] is None:
            event_dict[key] = ""
    return event_dict


_ID_FIELDS = ("message_id", "correlation_id")


def _said_by_the_link(record: logging.LogRecord) -> bool:
    """Filter: drop aiormq's "error when creating transport" line; the link logs the same
    failure as one line with the URL and the cause (`broker connection failed`)."""
    return not (record.name == "aiormq.connection" and record.msg == _AIORMQ_CONNECT_ERROR)


_AIORMQ_CONNECT_ERROR = "error when creating transport: %r"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info"
) -> None:
    """Install the processors once per process; safe to call again (last call wins)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = _LEVELS.get(level, logging.ERROR)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_said_by_the_link)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                empty_ids,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiormq logs every broker hiccup at WARNING with tracebacks; our own lines say it better.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.ERROR))
