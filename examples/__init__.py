"""Runnable examples of calling Burrow from web frameworks (see docs/calling.md).

`http_api` is an aiohttp (asyncio) app; `flask_app` a Flask (WSGI) one; both share `http_errors`.
"""

from __future__ import annotations

__all__: list[str] = []
