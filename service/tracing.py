"""W3C trace context: `traceparent` carried from a request to its reply, events and onward calls.

The trace of the message being handled lives in a context variable, so a `Client` used inside
a handler continues it without being told.
"""

from __future__ import annotations

import os
import random
import re
from contextvars import ContextVar, Token

from service.vocabulary import H_TRACEPARENT

__all__ = ["HEADER", "parse", "child", "current", "activate", "deactivate", "trace_id"]

HEADER = H_TRACEPARENT
_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_current: ContextVar[str | None] = ContextVar("burrow_traceparent", default=None)


def parse(value: object) -> str | None:
    """A valid traceparent header value, or None (hostile or malformed input is dropped)."""
    if not isinstance(value, str | bytes):
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    match = _FORMAT.match(text)
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return text


def child(parent: str | None) -> str:
    """A traceparent for an outgoing message: same trace, new span (a new trace if none)."""
    span = f"{random.getrandbits(64) or 1:016x}"  # ids, not secrets: no syscall per message
    if parent is None:
        return f"00-{os.urandom(16).hex()}-{span}-01"
    return f"{parent[:36]}{span}{parent[52:]}"


def current() -> str | None:
    """The traceparent of the message being handled in this task, if any."""
    return _current.get()


def activate(traceparent: str | None) -> Token[str | None]:
    """Make `traceparent` current for this task (until `deactivate`)."""
    return _current.set(traceparent)


def deactivate(token: Token[str | None]) -> None:
    """Restore the trace that was current before `activate`."""
    _current.reset(token)


def trace_id(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a traceparent, for log lines."""
    return traceparent[3:35] if traceparent else None
