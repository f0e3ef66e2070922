"""Liveness and readiness: ready means connected, every consumer attached and making
progress, and not draining."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service._amqp.link import Link
from service._observe import metrics


class Progress(Protocol):
    """A consumer side that can tell which queues have deliveries held past their timeout."""

    def stuck(self) -> dict[str, int]:
        """Per queue, the deliveries held past the handler timeout."""
        ...


@dataclass
class Health:
    """What `/readyz` reports, computed from the links each time it is asked."""

    links: Sequence[Link] = field(default_factory=tuple)
    draining: bool = False
    consumers: Sequence[Progress] = field(default_factory=tuple)
    prefetch: int | None = None  # per consumer: that many stuck deliveries stall it
    checks: Sequence[Callable[[], list[str]]] = ()  # other parts' problems (the outbox relay)

    def __post_init__(self) -> None:
        for link in self.links:
            metrics.watch_link(link)

    def problems(self) -> list[str]:
        """Why the service is not ready; empty when it is."""
        found: list[str] = []
        if self.draining:
            found.append("draining: shutting down")
        for link in self.links:
            if link.fatal is not None:
                found.append(f"{link.name}: {link.fatal}")
            elif not link.ready.is_set():
                why = f" ({link.last_error})" if link.last_error else ""
                found.append(f"{link.name}: not connected{why}")
            elif link.attached < len(link.consumers):
                found.append(f"{link.name}: {link.attached}/{len(link.consumers)} consumers")
            if link.blocked:
                found.append(f"{link.name}: blocked by the broker (resource alarm)")
        if self.prefetch is not None:
            for consumer in self.consumers:
                for queue, held in sorted(consumer.stuck().items()):
                    if held >= self.prefetch:
                        found.append(
                            f"consumer of {queue}: all {self.prefetch} prefetch slots held "
                            "past the handler timeout; no progress"
                        )
        for check in self.checks:
            found.extend(check())
        return found

    @property
    def ready(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems()
