"""One benchmark process: a server, consumer, RPC client or producer of one tool.

Speaks to the orchestrator on stdout: `READY` once attached, `RESULT <json>` when done.
The measuring loops live here, identical for every tool; only the tool's calls differ.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    cpu = time.process_time()  # this client process's own CPU (W5), all threads
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    await close()
    us = [ns / 1000 for ns in latencies]
    _result(
        {
            "calls": len(us),
            "elapsed": elapsed,
            "cpu_s": cpu,
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


def _w6_result(total: int, submitted: float, done: float) -> dict[str, Any]:
    """W6's two rates, both from the first submit: submit phase alone, and to the last result."""
    return {
        "jobs": total,
        "submit_s": submitted,
        "total_s": done,
        "submits_per_s": total / submitted,
        "jobs_per_s": total / done,
    }


async def _w6(tool: ModuleType, args: dict[str, Any]) -> None:
    """W6 for an asyncio tool: `window` submits in flight, then `window` results awaited."""
    submit, close = await tool.open_submitter(args["ns"], args["queue_type"])
    window = int(args["window"])

    async def run(total: int, b: int) -> tuple[float, float]:
        waiters: list[Any] = [None] * total
        submits, results = itertools.count(), itertools.count()

        async def submit_lane() -> None:
            while (i := next(submits)) < total:
                waiters[i] = await submit(i, b)

        async def result_lane() -> None:
            while (i := next(results)) < total:
                if await waiters[i]() != i + b:
                    raise AssertionError("wrong sum")

        started = time.perf_counter()
        await asyncio.gather(*(submit_lane() for _ in range(window)))
        submitted = time.perf_counter() - started
        await asyncio.gather(*(result_lane() for _ in range(window)))
        return submitted, time.perf_counter() - started

    await run(int(args.get("warmup", 0)), 1)
    _say("READY")
    total = int(args["jobs"])
    submitted, done = await run(total, 2)
    await close()
    _result(_w6_result(total, submitted, done))


def _w6_blocking(tool: ModuleType, tool_id: str, args: dict[str, Any]) -> None:
    """W6 for a blocking client (Celery): `threads` (64 in flight, the default) or `sequential`."""
    window = int(args["window"])
    mode = args.get("mode", "threads")
    submit, get, close = tool.open_submitter_blocking(args["ns"], tool_id, window)
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="lane") as pool:

        def run(total: int, b: int) -> tuple[float, float]:
            if mode == "sequential":
                return _sequential(submit, get, total, b)
            return _threaded(pool, submit, get, total, b, window=window)

        run(int(args.get("warmup", 0)), 1)
        _say("READY")
        total = int(args["jobs"])
        submitted, done = run(total, 2)
    close()
    _result({**_w6_result(total, submitted, done), "mode": mode})


def _sequential(
    submit: Callable[[int, int], Any], get: Callable[[Any], int], total: int, b: int
) -> tuple[float, float]:
    """One `delay()` after another (each waits for its confirm), then one `.get()` each."""
    started = time.perf_counter()
    handles = [submit(i, b) for i in range(total)]
    submitted = time.perf_counter() - started
    for i, handle in enumerate(handles):
        if get(handle) != i + b:
            raise AssertionError("wrong sum")
    return submitted, time.perf_counter() - started


def _threaded(
    pool: ThreadPoolExecutor,
    submit: Callable[[int, int], Any],
    get: Callable[[Any], int],
    total: int,
    b: int,
    *,
    window: int,
) -> tuple[float, float]:
    """`window` threads share the submits; once all are in, each gets the results it submitted.

    Each thread reads its own results: Celery's result backends are per thread by default, and
    its rpc reply queue is named after the thread, so the same threads serve every run (a new
    thread may reuse a finished one's id, and with it a reply queue still being consumed).
    """
    if total == 0:
        return 0.0, 0.0
    counter = itertools.count()
    marks: dict[str, float] = {}
    start = threading.Barrier(window + 1)

    def all_submitted() -> None:
        marks["submitted"] = time.perf_counter()

    submitted = threading.Barrier(window, action=all_submitted)

    def lane() -> None:
        mine: list[tuple[int, Any]] = []
        try:
            start.wait()
            while (i := next(counter)) < total:
                mine.append((i, submit(i, b)))
            submitted.wait()
        except BaseException:
            start.abort()
            submitted.abort()
            raise
        for i, handle in mine:
            if get(handle) != i + b:
                raise AssertionError("wrong sum")

    lanes = [pool.submit(lane) for _ in range(window)]
    start.wait()
    started = time.perf_counter()
    errors = [exc for exc in (lane.exception() for lane in lanes) if exc is not None]
    done = time.perf_counter()
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return marks["submitted"] - started, done - started


def _serve_blocking(tool: ModuleType, tool_id: str, args: dict[str, Any]) -> None:
    # Celery's prefork children inherit stdout; only the parent says READY, straight to fd 1.
    tool.serve_blocking(args["ns"], tool_id, lambda: os.write(1, b"READY\n"))


def _main_blocking(tool: ModuleType, tool_id: str, role: str, args: dict[str, Any]) -> None:
    if role == "serve":
        _serve_blocking(tool, tool_id, args)
    elif role == "w6":
        _w6_blocking(tool, tool_id, args)
    else:
        raise SystemExit(f"{tool_id} has no role {role}")


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
    elif role == "w6":
        await _w6(tool, args)
    else:
        raise SystemExit(f"unknown role {role}")


def main() -> int:
    """`python -m bench.worker TOOL ROLE JSON_ARGS`."""
    tool_id, role, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    args = orjson.loads(raw)
    if os.environ.get("BENCH_HOPS_OUT"):  # `python -m bench.hops`: record socket reads, writes
        from bench import hops  # noqa: PLC0415

        hops.install(os.environ["BENCH_HOPS_OUT"])
    tool = importlib.import_module(f"bench.tools.{TOOLS[tool_id]}")
    if getattr(tool, "BLOCKING", False):
        _main_blocking(tool, tool_id, role, args)
        return 0
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
