"""The one HTTP port: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready).

Probes and scrapes only; never business traffic. Deploy files name these paths (checked by tests).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service._runtime.health import Health

METRICS_PATH = "/metrics"
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"


class HttpServer:
    """aiohttp server for probes and metrics; port 0 picks a free one (see `port`)."""

    def __init__(self, health: Health, host: str, port: int) -> None:
        self.health = health
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        """The aiohttp application with the three routes (GET and HEAD)."""
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._metrics)
        app.router.add_get(LIVENESS_PATH, self._healthz)
        app.router.add_get(READINESS_PATH, self._readyz)
        return app

    async def start(self) -> None:
        """Bind and serve."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])  # (host, port, …) of the bound socket

    async def close(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        problems = self.health.problems()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})
