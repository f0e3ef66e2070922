"""The HTTP face: `Gateway` serves services' operations over HTTP, with webhooks for jobs.

`burrow gateway` runs it; the status each wire code maps to is public for HTTP clients.
"""

from __future__ import annotations

from service.gateway._server import (
    HTTP_STATUS,
    RETRY_AFTER_S,
    Gateway,
    http_status,
    retry_after,
)

__all__ = ["HTTP_STATUS", "RETRY_AFTER_S", "Gateway", "http_status", "retry_after"]
