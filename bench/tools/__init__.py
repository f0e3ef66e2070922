"""One module per tool, each written the way that tool's own documentation recommends.

Every module offers the same four coroutines: `serve`, `open_caller`, `consume`, `open_publisher`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["Caller", "Publisher", "Closer", "TOOLS"]

Caller = Callable[[int, int], Awaitable[int]]
Publisher = Callable[[int], Awaitable[None]]
Closer = Callable[[], Awaitable[None]]

# tool id -> module under bench.tools
TOOLS = {
    "burrow": "burrow_tool",
    "burrow-quorum": "burrow_tool",
    "aio-pika-raw": "raw_tool",
    "aio-pika-patterns": "patterns_tool",
    "faststream": "faststream_tool",
    "aiormq-loop": "aiormq_tool",
}
