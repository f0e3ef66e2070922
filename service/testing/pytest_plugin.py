"""The pytest plugin Burrow installs (entry point `burrow`): run a test's services on the
in-memory broker or on RabbitMQ, chosen per run.

- `--burrow-backend memory|rabbitmq` (or `BURROW_TEST_BACKEND`; default `memory`);
- `--burrow-amqp-url URL`: the RabbitMQ of the `rabbitmq` backend (or `BURROW_TEST_AMQP_URL`;
  default: `BURROW_AMQP_URL`, as for the services themselves);
- the `burrow_serve` fixture: `async with burrow_serve(svc) as served:` is `service.testing.serve`
  on that backend, so one test runs on both.

The options are set as those variables for the whole run, so a plain `serve(svc)` (and a
subprocess) follows them too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from service.testing import BACKEND_VARIABLE, URL_VARIABLE, Served, serve


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--burrow-backend` and `--burrow-amqp-url`."""
    group = parser.getgroup("burrow")
    group.addoption(
        "--burrow-backend",
        choices=("memory", "rabbitmq"),
        default=None,
        help=f"where burrow_serve runs services (default: ${BACKEND_VARIABLE}, else memory)",
    )
    group.addoption(
        "--burrow-amqp-url",
        default=None,
        help=f"the RabbitMQ of the rabbitmq backend (default: ${URL_VARIABLE}, "
        "else $BURROW_AMQP_URL)",
    )


# The variables the options set, with what they held before the run (None: unset).
_SET: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Set `BURROW_TEST_BACKEND` / `BURROW_TEST_AMQP_URL` from the options, for `serve`."""
    chosen: dict[str, str | None] = {
        BACKEND_VARIABLE: config.getoption("--burrow-backend", None),
        URL_VARIABLE: config.getoption("--burrow-amqp-url", None),
    }
    for variable, value in chosen.items():
        if value:
            _SET.setdefault(variable, os.environ.get(variable))
            os.environ[variable] = value


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put the variables back as they were before the run."""
    for variable, before in _SET.items():
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before
    _SET.clear()


@pytest.fixture
def burrow_backend(request: pytest.FixtureRequest) -> str:
    """The backend of this run: the option, else the environment variable, else `memory`."""
    chosen: str | None = request.config.getoption("--burrow-backend")
    return chosen or os.environ.get(BACKEND_VARIABLE) or "memory"


@pytest.fixture
def burrow_serve(
    request: pytest.FixtureRequest, burrow_backend: str
) -> Callable[..., AbstractAsyncContextManager[Served]]:
    """`service.testing.serve` bound to this run's backend (and `--burrow-amqp-url`)."""
    bound: dict[str, Any] = {"backend": burrow_backend}
    url: str | None = request.config.getoption("--burrow-amqp-url")
    if url:
        bound["amqp_url"] = url
    served: Callable[..., AbstractAsyncContextManager[Served]] = functools.partial(serve, **bound)
    return served
