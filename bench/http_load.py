"""W7's load generator: one aiohttp `ClientSession` (keep-alive) sending `POST <url>` with
`{"a": i, "b": 2}`, `concurrency` requests in flight, the same for every HTTP row.

`python -m bench.http_load JSON_ARGS` (`url`, `requests`, `warmup`, `concurrency`, `loop`);
speaks the worker protocol on stdout: `READY` after the warm-up (which opens every connection),
`RESULT <json>` once the measured requests are done. A request that does not answer 200 with the
right sum is counted by status (`statuses`) and fails the round in the orchestrator.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

from bench.common import median, percentile

__all__ = ["main"]

_HEADERS = {"content-type": "application/json"}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _run(args: dict[str, Any]) -> None:
    url, concurrency = str(args["url"]), int(args["concurrency"])
    statuses: Counter[str] = Counter()
    samples: list[str] = []  # the first few bodies that were not the expected answer
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, b: int) -> None:
            data = orjson.dumps({"a": i, "b": b})
            async with session.post(url, data=data, headers=_HEADERS) as r:
                body = await r.read()
            if r.status == 200 and orjson.loads(body).get("sum") == i + b:
                statuses["200"] += 1
                return
            statuses[str(r.status) if r.status != 200 else "200-wrong-body"] += 1
            if len(samples) < 5:
                samples.append(f"{r.status} {body[:300].decode(errors='replace')}")

        async def lanes(total: int, b: int, latencies: list[int] | None) -> None:
            counter = itertools.count()

            async def lane() -> None:
                while (i := next(counter)) < total:
                    started = time.perf_counter_ns()
                    await one(i, b)
                    if latencies is not None:
                        latencies.append(time.perf_counter_ns() - started)

            await asyncio.gather(*(lane() for _ in range(concurrency)))

        await lanes(max(int(args["warmup"]), concurrency), 1, None)
        warmup_statuses = dict(statuses)
        statuses.clear()
        latencies: list[int] = []
        total = int(args["requests"])
        _say("READY")
        cpu = time.process_time()
        started = time.perf_counter()
        await lanes(total, 2, latencies)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    us = [ns / 1000 for ns in latencies]
    _say(
        "RESULT "
        + orjson.dumps(
            {
                "requests": len(us),
                "elapsed": elapsed,
                "cpu_s": cpu,
                "calls_per_s": len(us) / elapsed,
                "p50_us": median(us),
                "p99_us": percentile(us, 99),
                "statuses": dict(statuses),
                "warmup_statuses": warmup_statuses,
                "bad_samples": samples,
            }
        ).decode()
    )


def main() -> int:
    """Run the load described by argv[1] (JSON)."""
    args = orjson.loads(sys.argv[1])
    if args.get("loop", "uvloop") == "uvloop":
        import uvloop  # noqa: PLC0415

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run(args))
    else:
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
