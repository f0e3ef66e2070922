"""One benchmark process: a server, consumer, RPC client or producer of one tool.

Speaks to the orchestrator on stdout: `READY` once attached, `RESULT <json>` when done.
The measuring loops live here, identical for every tool; only the tool's calls differ.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import signal
import sys
import time
from types import ModuleType
from typing import Any

import orjson

from bench.common import median, percentile
from bench.tools import TOOLS

__all__ = ["main"]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _result(data: dict[str, Any]) -> None:
    _say("RESULT " + orjson.dumps(data).decode())


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve(tool: ModuleType, args: dict[str, Any]) -> None:
    await tool.serve(
        args["ns"], args["queue_type"], args["prefetch"], _stop_event(), lambda: _say("READY")
    )


async def _consume(tool: ModuleType, args: dict[str, Any]) -> None:
    expected = int(args["events"])
    done = asyncio.Event()
    stop = _stop_event()
    marks: dict[str, float] = {}
    count = 0

    def on_event() -> None:
        nonlocal count
        count += 1
        if count == 1:
            marks["first"] = time.time()
        if count >= expected:
            marks["last"] = time.time()
            done.set()

    async def watch() -> None:
        await done.wait()
        _result({"count": count, **marks})
        stop.set()

    watcher = asyncio.ensure_future(watch())
    await tool.consume(
        args["ns"],
        args["queue_type"],
        prefetch=args["prefetch"],
        on_event=on_event,
        stop=stop,
        ready=lambda: _say("READY"),
    )
    watcher.cancel()


async def _rpc(tool: ModuleType, args: dict[str, Any], inflight: int) -> None:
    call, close = await tool.open_caller(args["ns"], args["queue_type"])
    for i in range(int(args.get("warmup", 0))):
        if await call(i, 1) != i + 1:
            raise AssertionError("wrong sum")
    total = int(args["calls"])
    latencies: list[int] = []
    counter = itertools.count()

    async def lane() -> None:
        while (i := next(counter)) < total:
            started = time.perf_counter_ns()
            result = await call(i, 2)
            latencies.append(time.perf_counter_ns() - started)
            if result != i + 2:
                raise AssertionError("wrong sum")

    _say("READY")
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    await close()
    us = [ns / 1000 for ns in latencies]
    _result(
        {
            "calls": len(us),
            "elapsed": elapsed,
            "calls_per_s": len(us) / elapsed,
            "p50_us": median(us),
            "p99_us": percentile(us, 99),
        }
    )


async def _produce(tool: ModuleType, args: dict[str, Any]) -> None:
    publish, close = await tool.open_publisher(args["ns"], args["queue_type"])
    total = int(args["events"])
    counter = itertools.count()

    async def lane() -> None:
        while (i := next(counter)) < total:
            await publish(i)

    _say("READY")
    first = time.time()
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(int(args["window"]))))
    elapsed = time.perf_counter() - started
    await close()
    _result({"first": first, "elapsed": elapsed, "publish_per_s": total / elapsed})


async def _main(tool_id: str, role: str, args: dict[str, Any]) -> None:
    tool = importlib.import_module(f"bench.tools.{TOOLS[tool_id]}")
    if role == "serve":
        await _serve(tool, args)
    elif role == "consume":
        await _consume(tool, args)
    elif role == "w1":
        await _rpc(tool, args, 1)
    elif role == "w2":
        await _rpc(tool, args, int(args["inflight"]))
    elif role == "produce":
        await _produce(tool, args)
    else:
        raise SystemExit(f"unknown role {role}")


def main() -> int:
    """`python -m bench.worker TOOL ROLE JSON_ARGS`."""
    tool_id, role, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    args = orjson.loads(raw)
    coro = _main(tool_id, role, args)
    if args.get("loop", "uvloop") == "uvloop":
        import uvloop  # noqa: PLC0415

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
