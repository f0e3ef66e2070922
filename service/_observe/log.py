"""Logging: structlog JSON lines in production, a readable console on a terminal.

Standard-library loggers (aio-pika, aiormq, aiohttp) are routed through the same pipeline.
`configure_logging` is for processes Burrow runs (`burrow run`, the CLI); a library use of
Burrow (a `Client` in a script) configures nothing: Burrow's loggers (`get_logger`) follow the
process's structlog configuration, and while there is none they print on stderr, never on
stdout, whose output is the script's own.
Every line passes `redact_secrets` last: a broker or Redis URL anywhere in it (a message, a
field, an exception's text) is shown with its password masked (`config.redact_url`). Message ids
are strings in every line: an absent `correlation_id` is `""`, never `null`.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal, TextIO

import structlog

from service._protocol.config import redact_url


def get_logger(name: str) -> Any:
    """A structlog logger named `name` for Burrow's own lines (`burrow.transport`, …).

    Its processors, wrapper class and caching are structlog's configuration at the time it is
    first used, as for `structlog.get_logger`; what it writes to is the configured logger
    factory's logger once anybody (the user, or `configure_logging`) configured structlog, and
    before that a `PrintLogger` on stderr, where structlog's default would print on stdout.
    Nothing global is changed.
    """
    return structlog.wrap_logger(_Destination(name))


class _Destination:
    """The logger under a Burrow logger, chosen at every use: structlog's configured logger
    factory's (made once per factory), or while structlog is unconfigured a `PrintLogger` on
    the current `sys.stderr`."""

    __slots__ = ("_factory", "_file", "_made", "_printer", "name")

    def __init__(self, name: str) -> None:
        self.name = name  # what `structlog.stdlib.add_logger_name` reads
        self._factory: Any = None
        self._made: Any = None
        self._file: TextIO | None = None
        self._printer: structlog.PrintLogger | None = None

    def target(self) -> Any:
        """The logger to write to now."""
        if structlog.is_configured():
            factory = structlog.get_config()["logger_factory"]
            if factory is not self._factory:
                self._factory, self._made = factory, factory(self.name)
            return self._made
        if self._printer is None or self._file is not sys.stderr:
            self._file = sys.stderr  # replaced by a test's capture, say: follow it
            self._printer = structlog.PrintLogger(self._file)
        return self._printer

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.target(), attribute)

    def __repr__(self) -> str:
        return f"<burrow logger {self.name!r} to {self.target()!r}>"


_URL = re.compile(r"\b(?:amqps?|rediss?|postgres(?:ql)?)://\S+", re.IGNORECASE)


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
