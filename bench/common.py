"""What every benchmark process shares: sizes, names, the event body, statistics, CPU clocks.

Kept free of any tool's imports so the orchestrator and every worker can load it cheaply.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AMQP_URL",
    "REDIS_URL",
    "Sizes",
    "FULL",
    "QUICK",
    "EVENT_EXCHANGE",
    "EVENT_QUEUE",
    "EVENT_KEY",
    "EVENT_PATTERN",
    "event_payload",
    "percentile",
    "median",
    "proc_cpu_seconds",
    "broker_pid",
]

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# W6's Redis result backend (celery-redis). Not db 0: the integration tests use that one.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does and how many repetitions are taken."""

    reps: int
    w1_warmup: int
    w1_calls: int
    w2_calls: int
    w2_inflight: int
    w3_events: int
    w3_window: int
    w3_prefetch: int
    limit_messages: int
    limit_window: int
    w6_jobs: int
    w6_window: int
    w7_requests: int
    w7_warmup: int
    w7_concurrency: int
    w8_events: int  # W8: events through the outbox, and through Client.emit
    w8_window: int  # W8: outbox transactions in flight (= the writers' pool of connections)
    w8_paced_events: int  # W8's paced run: events at `w8_rate` per second
    w8_rate: float


FULL = Sizes(
    reps=3,
    w1_warmup=200,
    w1_calls=3000,
    w2_calls=20_000,
    w2_inflight=64,
    w3_events=50_000,
    w3_window=64,
    w3_prefetch=256,
    limit_messages=50_000,
    limit_window=256,
    w6_jobs=2000,
    w6_window=64,
    w7_requests=10_000,
    w7_warmup=500,
    w7_concurrency=64,
    w8_events=20_000,
    w8_window=16,
    w8_paced_events=3_000,
    w8_rate=500.0,
)
QUICK = Sizes(
    reps=1,
    w1_warmup=20,
    w1_calls=300,
    w2_calls=2_000,
    w2_inflight=64,
    w3_events=5_000,
    w3_window=64,
    w3_prefetch=256,
    limit_messages=5_000,
    limit_window=256,
    w6_jobs=200,
    w6_window=64,
    w7_requests=1_000,
    w7_warmup=128,
    w7_concurrency=64,
    w8_events=2_000,
    w8_window=16,
    w8_paced_events=300,
    w8_rate=500.0,
)

EVENT_EXCHANGE = "events"  # suffix of `<ns>.events`, a durable topic exchange
EVENT_QUEUE = "orders-audit"  # suffix of `<ns>.orders-audit`, the consumer's queue
EVENT_KEY = "orders.created"
EVENT_PATTERN = "orders.*"


def event_payload(seq: int) -> dict[str, object]:
    """An event of about 100 bytes once encoded as JSON."""
    return {"seq": seq, "kind": "order.created", "order": f"ord-{seq:08d}", "note": "x" * 40}


def percentile(values: Sequence[float], pct: float) -> float:
    """The pct-th percentile (nearest rank) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        # The command name may hold spaces; fields after its closing parenthesis are fixed.
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def broker_pid() -> int | None:
    """The pid of the local RabbitMQ node's Erlang VM: the oldest `beam.smp` running rabbit.

    Other engineers may start short-lived extra nodes for fault tests; the shared node is the
    one that has been up longest.
    """
    found: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="ascii") as fh:
                if fh.read().strip() != "beam.smp":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                if b"rabbit boot" not in cmd.read().replace(b"\0", b" "):
                    continue
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                started = int(fh.read().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
        found.append((started, int(entry)))
    return min(found)[1] if found else None
