"""A lifespan under `burrow run`: opened once before serving, closed on SIGTERM only after the
message in flight was handled and answered."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

from service import Client, Settings
from tests.conftest import AMQP_URL

__all__: list[str] = []

MODULE = """
import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from service import Context, Model, Service, State

LOG = Path(__file__).with_name("lifespan.log")


def note(line: str) -> None:
    with LOG.open("a") as out:
        out.write(line + "\\n")


@asynccontextmanager
async def pool(state: State):
    note("open")
    state.pool = "pool-1"
    yield
    note("close")


svc = Service("held", lifespan=pool)


class Nap(Model):
    seconds: float


@svc.operation()
async def nap(req: Nap, ctx: Context) -> Nap:
    note("start " + ctx.state.get("pool", str))
    await asyncio.sleep(req.seconds)
    note("handled")
    return req
"""


async def test_lifespan_closes_on_sigterm_after_in_flight_work(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGTERM during a call: the call is answered, then the lifespan closes, once; exit 0."""
    (tmp_path / "heldsvc.py").write_text(textwrap.dedent(MODULE), encoding="utf-8")
    log = tmp_path / "lifespan.log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "BURROW_NAMESPACE": settings.namespace,
        "BURROW_AMQP_URL": AMQP_URL,
        "BURROW_HTTP_PORT": "0",
        "BURROW_LOG_LEVEL": "warning",
        "BURROW_QUEUE_TYPE": "classic",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "run", "heldsvc:svc", env=env
    )
    try:
        async with Client(settings) as client:
            for _ in range(150):
                try:
                    await client.call("held.nap", {"seconds": 0}, timeout=1)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            call = asyncio.ensure_future(client.call("held.nap", {"seconds": 1.5}, timeout=20))
            for _ in range(100):
                if log.read_text().count("start") == 2:
                    break
                await asyncio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert await call == {"seconds": 1.5}
        code = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0
    lines = log.read_text().splitlines()
    assert lines == ["open", "start pool-1", "handled", "start pool-1", "handled", "close"]
