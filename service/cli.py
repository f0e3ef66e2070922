"""The `burrow` command: run a service, call its operations from a shell."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson

from service.app import App
from service.client import Client
from service.config import load_settings
from service.errors import BurrowError, ConfigError, ServiceError
from service.log import configure_logging
from service.registry import Service

__all__ = ["main", "load_target"]

DEFAULT_TARGET = "service.example:calc"


def load_target(target: str) -> list[Service]:
    """Import `module:attr` and return the Service(s) it names."""
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ConfigError(f"target {target!r} must look like module:attribute")
    value = getattr(importlib.import_module(module_name), attr)
    services = list(value) if isinstance(value, (list, tuple)) else [value]
    if not services or not all(isinstance(svc, Service) for svc in services):
        raise ConfigError(f"{target} is not a Service or a list of Services")
    return services


def _run(coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not on every platform
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro())


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    services = load_target(args.target)
    return _run(lambda: App(*services, settings=settings).run())


def _cmd_call(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_format, "error")
    try:
        payload = orjson.loads(args.payload)
    except orjson.JSONDecodeError as exc:
        print(f"error: payload is not JSON: {exc}", file=sys.stderr)
        return 2

    async def call() -> int:
        async with Client(settings) as client:
            reply = await client.call(args.operation, payload, timeout=args.timeout)
        sys.stdout.write(orjson.dumps(reply).decode() + "\n")
        return 0

    return _run(call)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="burrow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run services until SIGTERM")
    run.add_argument("target", nargs="?", default=DEFAULT_TARGET, help="module:attribute")
    run.set_defaults(func=_cmd_run)

    call = commands.add_parser("call", help="call an operation and print its reply")
    call.add_argument("operation", help="service.operation, e.g. calc.add")
    call.add_argument("payload", help="request as JSON")
    call.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    call.set_defaults(func=_cmd_call)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `burrow` command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ServiceError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        if exc.details:
            print(orjson.dumps(exc.details).decode(), file=sys.stderr)
        return 1
    except BurrowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
