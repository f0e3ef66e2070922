"""Where one sequential call's time goes: W1 split into its two broker hops and two processes.

`python -m bench.hops [calls] [rounds]` runs W1 (`calls` sequential calls, default 3,000) for
`burrow`, `burrow-unconfirmed` (the same without publisher confirms: what they cost Burrow's own
code), `aio-pika-raw-confirmed` and `aio-pika-raw`, tools alternating for `rounds` rounds
(default 2). Every worker records when asyncio hands it bytes read from its socket and when it
writes bytes (`CLOCK_MONOTONIC`, which all processes share), and each call is split into:

- `client→server`: the client writes the request; the server's next read (broker hop);
- `server`: that read; the server's next write (the reply);
- `server→client`: that write; the client's next read (broker hop);
- `client`: that read; the client's next request write.

Medians per call, then the median over rounds. The timestamps are taken in Python, so each
process part includes its own socket read; the hops include the broker and both kernels.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import itertools
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.run import RESULTS, Proc, _delete_prefixed

__all__ = ["install", "main", "split"]

TOOLS = ("burrow", "burrow-unconfirmed", "aio-pika-raw-confirmed", "aio-pika-raw")
PARTS = ("client→server", "server", "server→client", "client")
ENV = "BENCH_HOPS_OUT"  # set: the worker records its socket reads and writes to this prefix
_MESSAGE_BYTES = 100  # a request or reply write is larger than any ack or heartbeat frame


def install(prefix: str) -> None:
    """Record every read handed to asyncio streams and every write; save them at exit."""
    from asyncio import streams  # noqa: PLC0415

    events: list[tuple[int, str, int]] = []
    clock = time.perf_counter_ns
    received = streams.StreamReaderProtocol.data_received
    write = streams.StreamWriter.write

    def data_received(self: Any, data: bytes) -> None:
        events.append((clock(), "r", len(data)))
        received(self, data)

    def written(self: Any, data: Any) -> None:
        events.append((clock(), "w", len(data)))
        write(self, data)

    streams.StreamReaderProtocol.data_received = data_received  # type: ignore[method-assign]
    streams.StreamWriter.write = written  # type: ignore[method-assign]

    def save() -> None:
        lines = "".join(f"{at} {what} {size}\n" for at, what, size in events)
        Path(f"{prefix}.{os.getpid()}").write_text(lines)

    atexit.register(save)


def _load(prefix: str) -> list[tuple[int, str, int]]:
    (path,) = Path(prefix).parent.glob(Path(prefix).name + ".*")
    events = [(int(a), b, int(c)) for a, b, c in (line.split() for line in path.open())]
    path.unlink()
    return events


def split(client: list[tuple[int, str, int]], server: list[tuple[int, str, int]]) -> list[float]:
    """Median µs of each of PARTS over the calls found in both processes' records."""
    s_reads = [at for at, what, _ in server if what == "r"]
    s_writes = [at for at, what, size in server if what == "w" and size > _MESSAGE_BYTES]
    c_reads = [at for at, what, _ in client if what == "r"]
    requests = [at for at, what, size in client if what == "w" and size > _MESSAGE_BYTES]
    parts: list[list[int]] = [[], [], [], []]
    for sent, following in itertools.pairwise(requests):
        i = bisect.bisect_right(s_reads, sent)
        if i == len(s_reads):
            break
        taken = s_reads[i]
        j = bisect.bisect_right(s_writes, taken)
        if j == len(s_writes):
            break
        replied = s_writes[j]
        k = bisect.bisect_right(c_reads, replied)
        if k == len(c_reads) or not c_reads[k] < following:
            continue  # not one call's clean sequence (e.g. a heartbeat in between)
        got = c_reads[k]
        spans = (taken - sent, replied - taken, got - replied, following - got)
        for part, span in zip(parts, spans, strict=True):
            part.append(span)
    return [statistics.median(part) / 1000 for part in parts]


def _round(tool: str, calls: int, logs: Path) -> tuple[float, list[float]]:
    ns = f"bench{uuid.uuid4().hex[:6]}-hops"
    common = {"ns": ns, "tool": tool, "queue_type": "classic", "loop": "uvloop"}
    prefix = str(RESULTS / f"hops-{uuid.uuid4().hex[:6]}")
    argv = [sys.executable, "-m", "bench.worker", tool]
    try:
        os.environ[ENV] = prefix + "-server"
        server = Proc([*argv, "serve", _json({**common, "prefetch": 64})], logs / "hops-serve.log")
        try:
            server.expect("READY", 60)
            os.environ[ENV] = prefix + "-client"
            client = Proc([*argv, "w1", _json({**common, "warmup": 300, "calls": calls})],
                          logs / "hops-w1.log")  # fmt: skip
            try:
                p50 = float(client.result(300)["p50_us"])
                client.popen.wait(30)
            finally:
                client.close()
        finally:
            server.close()
            del os.environ[ENV]
        return p50, split(_load(prefix + "-client"), _load(prefix + "-server"))
    finally:
        asyncio.run(_delete_prefixed(ns))


def _json(data: dict[str, Any]) -> str:
    return orjson.dumps(data).decode()


def main() -> int:
    """Run the rounds and print the table (markdown)."""
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 3_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[tuple[float, list[float]]]] = {tool: [] for tool in TOOLS}
    for r in range(rounds):
        for tool in TOOLS[r % len(TOOLS) :] + TOOLS[: r % len(TOOLS)]:
            found[tool].append(_round(tool, calls, logs))
    print("| part of one call | " + " | ".join(TOOLS) + " |")
    print("| --- |" + " --- |" * len(TOOLS))
    rows = [("W1 p50", [statistics.median(p50 for p50, _ in found[t]) for t in TOOLS])]
    for n, part in enumerate(PARTS):
        rows.append((part, [statistics.median(parts[n] for _, parts in found[t]) for t in TOOLS]))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{v:,.0f} µs" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
