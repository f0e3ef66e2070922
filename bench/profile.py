"""Profiles Burrow's server and client under W2 with py-spy and ranks the hot spots.

`python -m bench.profile [seconds]` writes collapsed stacks to bench/results/profile-*.txt
and prints, per process, the functions with the most self and inclusive samples.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson

from bench.run import RESULTS, ROOT, Proc, _delete_prefixed

__all__ = ["main", "rank"]


def rank(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample shares from a py-spy `--format raw` file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{collapsed.name}: {total} samples", "  self:"]
    out += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive (service/ only):")
    ours = [(f, n) for f, n in inclusive.most_common() if "service/" in f][:top]
    out += [f"    {n / total:6.1%}  {f}" for f, n in ours]
    return "\n".join(out)


def _short(frame: str) -> str:
    # py-spy frames look like `function (path/to/file.py:line)`; keep the file tail only.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{where}:{name}"


def main() -> int:
    """Run W2 against one Burrow server and record both processes."""
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    ns = f"bench{uuid.uuid4().hex[:6]}-prof"
    common = {"ns": ns, "queue_type": "classic", "loop": "uvloop"}
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def spawn(role: str, **args: object) -> Proc:
        argv = [sys.executable, "-m", "bench.worker", "burrow", role]
        return Proc([*argv, orjson.dumps({**common, **args}).decode()], logs / f"prof-{role}.log")

    server = spawn("serve", prefetch=64)
    server.expect("READY", 60)
    client = spawn("w2", warmup=64, calls=10_000_000, inflight=64)
    client.expect("READY", 60)
    time.sleep(2)  # let the loop reach its steady state before sampling
    outputs = {"server": server.pid, "client": client.pid}
    spies = [
        subprocess.Popen(
            [
                *(str(ROOT / ".venv/bin/py-spy"), "record", "--format", "raw", "-r", "250"),
                *("-d", str(seconds), "--nonblocking", "--pid", str(pid)),
                *("-o", str(RESULTS / f"profile-{name}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in outputs.items()
    ]
    for spy in spies:
        spy.wait(seconds + 60)
    client.close()
    server.close()
    asyncio.run(_delete_prefixed(ns))
    for name in outputs:
        print(rank(RESULTS / f"profile-{name}.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
