"""Cross-language proof of the wire contract: the Node.js client in clients/node, written from
docs/protocol.md alone, runs its own test suite against a real Burrow serving calc.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from service import Settings
from service.example import calc
from tests.conftest import AppFactory

__all__: list[str] = []

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
# One budget for `npm ci` (first run only) and the suite, under the 90 s the test may take.
BUDGET = 85.0


async def _run(*argv: str, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command in clients/node without blocking the loop; return its code and output."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=NODE_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # so a timeout can end the runner and its per-file children
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = await process.communicate()
        return -1, f"timed out after {timeout} s\n" + output.decode(errors="replace")
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def _ensure_node_modules(env: dict[str, str], timeout: float) -> None:
    """Install clients/node's locked dependencies once, or fail saying what is missing."""
    if (NODE_DIR / "node_modules" / "amqplib").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed: the Node client's dependencies cannot be installed")
    code, output = await _run(npm, "ci", "--no-audit", "--no-fund", env=env, timeout=timeout)
    if code != 0:
        pytest.fail(f"npm ci failed in {NODE_DIR} (exit {code}):\n{output}")


@pytest.mark.slow
async def test_node_client_suite_passes(start_app: AppFactory, settings: Settings) -> None:
    """The Node client's suite (call, errors, submit and result reads, events, close) passes."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the cross-language test cannot run")
    env = {
        **os.environ,
        "BURROW_AMQP_URL": settings.amqp_urls()[0],
        "BURROW_NAMESPACE": settings.namespace,
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUDGET
    await _ensure_node_modules(env, timeout=BUDGET / 2)
    await start_app(calc)
    # Bounded inside node too: a hung test fails on its own and open handles cannot keep it alive.
    code, output = await _run(
        node,
        "--test",
        "--test-timeout=30000",
        "--test-force-exit",
        env=env,
        timeout=deadline - loop.time(),
    )
    assert code == 0, f"node --test exited with {code}:\n{output}"
    assert "# fail 0" in output, output
    assert "# skipped 0" in output, output
