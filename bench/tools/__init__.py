"""One module per tool, each written the way that tool's own documentation recommends.

Every module offers the same four coroutines: `serve`, `open_caller`, `consume`, `open_publisher`
(`burrow-unconfirmed`, what confirms cost Burrow in `bench.hops`, only the first two); W6's tools
also offer `open_submitter`. A tool whose API is blocking (Celery) sets `BLOCKING` and offers
`serve_blocking` and `open_submitter_blocking` instead, driven from threads. W8's
`outbox_tool` (the outbox against direct emit) runs its own processes
(`python -m bench.tools.outbox_tool ROLE`), so it is not in `TOOLS`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["Caller", "Publisher", "Closer", "Waiter", "Submitter", "TOOLS"]

Caller = Callable[[int, int], Awaitable[int]]
Publisher = Callable[[int], Awaitable[None]]
Closer = Callable[[], Awaitable[None]]
# W6: a submit returns once the broker has the job; awaiting the waiter returns its sum.
Waiter = Callable[[], Awaitable[int]]
Submitter = Callable[[int, int], Awaitable[Waiter]]

# tool id -> module under bench.tools
TOOLS = {
    "burrow": "burrow_tool",
    "burrow-quorum": "burrow_tool",
    "burrow-link": "burrow_link_tool",
    "burrow-unconfirmed": "burrow_unconfirmed_tool",  # bench.hops only: what confirms cost
    "aio-pika-raw": "raw_tool",
    "aio-pika-raw-confirmed": "raw_confirmed_tool",
    "aio-pika-patterns": "patterns_tool",
    "faststream": "faststream_tool",
    "aiormq-loop": "aiormq_tool",
    "celery-rpc": "celery_tool",
    "celery-redis": "celery_tool",
}
