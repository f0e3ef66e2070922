"""Celery 5 as its documentation sets it up: W6's peer (`celery-rpc`, `celery-redis`).

RabbitMQ broker with publisher confirms (`confirm_publish`), persistent task messages (Celery's
default), the default prefork pool (concurrency = CPU count), `task_acks_late=True`, JSON, the
default prefetch multiplier; results on `rpc://` or on Redis. Celery's API is blocking, so this
module offers blocking calls (`BLOCKING = True`): the worker process runs `worker_main`, and
the client loop in `bench.worker` drives `delay()` / `.get()` from threads.

Every broker entity it declares is named under the run's namespace (task queue and exchange,
control and event exchanges, the worker's hostname; the control replies' exchange is
`reply.<ns>.ctl.pidbox`); the rpc backend's reply queues, which Celery names after the client
thread (`app.thread_oid`), are deleted by the client when it closes. Redis keys carry the
namespace as `global_keyprefix`; the orchestrator deletes them and the broker entities.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.result import AsyncResult  # type: ignore[import-untyped]
from celery.signals import worker_ready  # type: ignore[import-untyped]

from bench.common import AMQP_URL, REDIS_URL

__all__ = ["BLOCKING", "serve_blocking", "open_submitter_blocking"]

BLOCKING = True
RESULT_TIMEOUT = 120.0

for _name in ("celery", "kombu", "amqp", "billiard"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def _app(ns: str, tool: str, *, pool_limit: int | None = None) -> Celery:
    """The Celery app for one tool's namespace, with `calc.add` registered."""
    redis = tool == "celery-redis"
    app = Celery(ns, broker=AMQP_URL, backend=REDIS_URL if redis else "rpc://")
    queue = f"{ns}.jobs"
    conf: dict[str, Any] = {
        "task_default_queue": queue,
        "task_default_exchange": queue,
        "task_default_routing_key": queue,
        "task_acks_late": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
        "control_exchange": f"{ns}.ctl",
        "event_exchange": f"{ns}.ev",
        "event_queue_prefix": f"{ns}.ev",
        "result_expires": 600,  # the rpc reply queue's x-expires, the Redis keys' TTL
    }
    if pool_limit is not None:
        # One broker connection per submitting thread, so the window is the thread count.
        conf["broker_pool_limit"] = pool_limit
    if redis:
        conf["result_backend_transport_options"] = {"global_keyprefix": f"{ns}:"}
    app.conf.update(conf)

    def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    app.task(name="calc.add")(add)
    return app


def serve_blocking(ns: str, tool: str, ready: Callable[[], None]) -> None:
    """Run a Celery worker (prefork pool, default concurrency) until SIGTERM."""
    app = _app(ns, tool)

    def on_ready(**_: Any) -> None:
        ready()

    worker_ready.connect(on_ready, weak=False)
    app.worker_main(
        [
            "--quiet",  # no banner
            "worker",
            "--loglevel=WARNING",
            "--pool=prefork",
            f"--hostname={ns}.w@%h",
        ]
    )


Submit = Callable[[int, int], AsyncResult]
Get = Callable[[AsyncResult], int]


def open_submitter_blocking(
    ns: str, tool: str, window: int
) -> tuple[Submit, Get, Callable[[], None]]:
    """`delay()` a job, `.get()` its sum, and a close that drops this client's reply queues."""
    app = _app(ns, tool, pool_limit=window)
    add = app.tasks["calc.add"]
    oids: set[str] = set()

    def submit(a: int, b: int) -> AsyncResult:
        result: AsyncResult = add.delay(a, b)
        oids.add(app.thread_oid)
        return result

    def get(result: AsyncResult) -> int:
        reply: dict[str, int] = result.get(timeout=RESULT_TIMEOUT)
        return int(reply["sum"])

    def close() -> None:
        if tool == "celery-rpc":
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                for oid in oids:
                    with contextlib.suppress(Exception):
                        channel.queue_delete(oid)
        app.close()

    return submit, get, close
