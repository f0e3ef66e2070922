"""The `burrow` command: run a service, call its operations from a shell.

Mistakes a first run makes (a module that is not found, a busy port, a broker that cannot be
reached) end in one `error:` line and a non-zero exit code, not a traceback. A call, cast or
submit that failed names its message on that line (`message_id=…`, and `correlation_id=…`
for a call; `job_id=…` for a job's result), as the service's log and dead letters do. The
caller commands print their result alone on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import orjson
import pydantic_core

from service._amqp.tools import tail
from service._calling.client import Client, HeaderValue, check_headers
from service._calling.rpc_client import tag
from service._observe.log import configure_logging, get_logger
from service._outbox import schema as outbox_schema
from service._outbox.relay import configured_relay
from service._protocol import codec, contracts
from service._protocol.config import Settings, load_settings
from service._protocol.errors import (
    BurrowError,
    ConfigError,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from service._protocol.registry import Service
from service._protocol.topology import Topology, service_topology, to_definitions
from service._runtime.app import App
from service._runtime.health import Health
from service._runtime.http import HttpServer
from service._serving.dead_letters import DeadLetterTool, json_line, readable_body
from service.gateway import _openapi as openapi
from service.gateway._routes import split_job_id

DEFAULT_TARGET = "service.example:calc"

_log = get_logger("burrow.cli")


def load_target(target: str) -> list[Service]:
    """Import `module:attr` and return the Service(s) it names.

    The current directory comes first on `sys.path` (as with uvicorn and `python -m`), so
    `burrow run greeter:svc` finds ./greeter.py.

    Raises:
        ConfigError: the target is malformed, its module is not found, the module has no such
            attribute, or the attribute is not a Service or a list of Services. An error the
            module's own code raises while it is imported propagates with its traceback.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"target {target!r} must look like module:attribute, e.g. greeter:svc")
    _import_from_cwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise  # a module the target's code imports is missing: its traceback says where
        raise _not_found(module_name, exc.name) from None
    value = getattr(module, attr, None)
    services = list(value) if isinstance(value, list | tuple) else [value]
    if services and all(isinstance(svc, Service) for svc in services):
        return cast(list[Service], services)
    found = [f"{module_name}:{name}" for name, item in vars(module).items() if _is_service(item)]
    hint = f"; it has {', '.join(found)}" if found else f"; {module_name} declares no Service"
    if not hasattr(module, attr):
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}{hint}")
    kind = f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__
    raise ConfigError(f"{target} is not a Service or a list of Services but {kind}{hint}")


def _import_from_cwd() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _is_service(value: object) -> bool:
    items = value if isinstance(value, list | tuple) and value else [value]
    return all(isinstance(item, Service) for item in items)


def _not_found(module_name: str, missing: str) -> ConfigError:
    target = "" if missing == module_name else f" (for {module_name!r})"
    return ConfigError(
        f"no module named {missing!r}{target} in {os.getcwd()} or on sys.path: run burrow "
        f"from the directory that holds {missing.replace('.', '/')}.py, or install it"
    )


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
    if args.reload:
        if args.workers > 1:
            raise ConfigError("--reload runs one process: drop --workers")
        return _run_reloading(args.target)
    services = load_target(args.target)
    if args.workers > 1:
        return _run_workers(args.target, args.workers, settings.http_port)
    try:
        return _run(lambda: App(*services, settings=settings).run())
    except OSError as exc:
        # The HTTP port is the only thing App binds; other OSErrors keep their traceback.
        problem = _BIND_PROBLEMS.get(exc.errno or 0)
        if problem is None or "bind" not in str(exc):
            raise
        where = f"{settings.http_host}:{settings.http_port}"
        raise ConfigError(f"cannot serve HTTP on {where}: {problem}") from None


def _cmd_gateway(args: argparse.Namespace) -> int:
    from service.gateway._server import Gateway  # noqa: PLC0415 - only this command needs it

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    services = [svc for target in args.targets or [DEFAULT_TARGET] for svc in load_target(target)]
    gateway = Gateway(*services, settings=settings)
    try:
        return _run(gateway.run)
    except OSError as exc:
        problem = _BIND_PROBLEMS.get(exc.errno or 0)
        if problem is None or "bind" not in str(exc):
            raise
        raise ConfigError(
            f"cannot serve HTTP on {settings.http_port} or {settings.gateway_port}: "
            + problem.replace("BURROW_HTTP_PORT", "BURROW_HTTP_PORT / BURROW_GATEWAY_PORT")
        ) from None


_BIND_PROBLEMS = {
    errno.EADDRINUSE: "the port is in use; set BURROW_HTTP_PORT to a free one (0 picks any)",
    errno.EACCES: "not allowed to listen there; set BURROW_HTTP_PORT above 1023",
    errno.EADDRNOTAVAIL: "BURROW_HTTP_HOST is not an address of this machine",
}


def _run_reloading(target: str) -> int:
    """Serve `target` in a child process and restart it whenever a .py file under the current
    directory changes (development only: in-flight work is cut after a few seconds)."""
    try:
        import watchfiles  # noqa: PLC0415 - optional: the `reload` extra
    except ImportError:
        raise ConfigError(
            "--reload needs watchfiles: pip install 'burrow[reload]' (or pip install watchfiles)"
        ) from None
    # Fail now on a module that is not there; errors in its code show (and heal) in the child.
    module_name = target.partition(":")[0]
    _import_from_cwd()
    top = module_name.partition(".")[0]
    if top and importlib.util.find_spec(top) is None:
        raise _not_found(module_name, top)
    logging.getLogger("watchfiles").setLevel(logging.ERROR)  # its SIGTERM lines are warnings
    root = Path.cwd()

    def reloading(changes: set[tuple[Any, str]]) -> None:
        changed = sorted(os.path.relpath(path, root) for _, path in changes)
        _log.info("files changed; restarting", files=changed[:10])

    _log.info("watching for changes", directory=str(root))
    watchfiles.run_process(
        root,
        target=shlex.join([sys.executable, "-m", "service.cli", "run", target]),
        target_type="command",
        watch_filter=watchfiles.PythonFilter(),
        callback=reloading,
    )
    return 0


def _run_workers(target: str, workers: int, http_port: int) -> int:
    """N processes sharing the queues as competing consumers; worker i serves HTTP on port+i.

    SIGTERM/SIGINT are passed on; if one worker dies the others are stopped and the exit code
    is non-zero, so the supervisor (systemd, Kubernetes) restarts the whole unit.
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run", target],
            env={**os.environ, "BURROW_HTTP_PORT": str(http_port + i if http_port else 0)},
        )
        for i in range(workers)
    ]

    def forward(signum: int, _: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes: dict[int, int] = {}
    while len(codes) < len(children):
        for child in children:
            code = child.poll()
            if code is not None and child.pid not in codes:
                codes[child.pid] = code
                if code != 0:
                    forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return max((abs(code) for code in codes.values()), default=0)


def _cmd_call(args: argparse.Namespace) -> int:
    payload, headers = _payload(args.payload), _headers(args.header)

    async def call(client: Client) -> None:
        _print(await client.call(args.operation, payload, timeout=args.timeout, headers=headers))

    return _client_command(args, call)


def _headers(given: Sequence[str] | None) -> dict[str, HeaderValue]:
    """`--header NAME=VALUE` options → message headers (values as text), checked as the
    client checks them: a malformed or reserved one is a one-line usage error."""
    headers: dict[str, HeaderValue] = {}
    for option in given or ():
        name, equals, value = option.partition("=")
        if not equals or not name.strip():
            raise ConfigError(f"--header {option[:80]!r} must look like NAME=VALUE")
        headers[name.strip()] = value
    try:
        return check_headers(headers)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--header: {exc}") from None


def _payload(text: str) -> Any:
    # codec.decode_json, not orjson.loads: integers beyond 64 bits must stay exact.
    try:
        return codec.decode_json(text.encode("utf-8", "surrogateescape"))
    except InvalidArgument as exc:
        raise ConfigError(f"payload is not JSON: {exc.message}") from None


def _print(value: Any) -> None:
    try:
        text = orjson.dumps(value)
    except TypeError:
        # orjson refuses integers beyond 64 bits (and a few types): pydantic writes them exact.
        text = pydantic_core.to_json(value, inf_nan_mode="null", fallback=repr)
    sys.stdout.write(text.decode("utf-8", "backslashreplace") + "\n")
    sys.stdout.flush()


def _client_command(args: argparse.Namespace, action: Callable[[Client], Any]) -> int:
    settings = load_settings()
    _tool_logging(settings.log_format)

    async def run() -> int:
        client = Client(settings)
        try:
            await _connect(client)
            await action(client)
        finally:
            await client.close()
        return 0

    return _run(run)


async def _connect(client: Client) -> None:
    """Start `client`; a broker it cannot reach raises `Unavailable` naming the cause."""
    try:
        await client.start()
    except Unavailable:
        settings = client.settings
        problem = " ".join((client.link.last_error or "no answer").split())
        for url in settings.amqp_urls():
            secret = urlsplit(url).password
            if secret:
                problem = problem.replace(secret, "***")
        raise Unavailable(
            f"cannot reach the broker at {', '.join(settings.redacted_urls())} within "
            f"{settings.connect_timeout:g}s: {problem}"
        ) from None


def _cmd_cast(args: argparse.Namespace) -> int:
    payload, headers = _payload(args.payload), _headers(args.header)

    async def cast(client: Client) -> None:
        message_id = await client.cast(args.operation, payload, delay=args.delay, headers=headers)
        _print_id(args, "message_id", message_id)

    return _client_command(args, cast)


def _print_id(args: argparse.Namespace, key: str, value: str) -> None:
    """`{"<key>": "<value>"}`, or with `--id-only` the bare id (for `$(…)` and xargs)."""
    if args.id_only:
        sys.stdout.write(value + "\n")
        sys.stdout.flush()
    else:
        _print({key: value})


def _cmd_submit(args: argparse.Namespace) -> int:
    payload, headers = _payload(args.payload), _headers(args.header)

    async def submit(client: Client) -> None:
        job = await client.submit(args.operation, payload, delay=args.delay, headers=headers)
        if not args.wait:
            _print_id(args, "job_id", job.id)
            return
        try:
            result = await job.result(timeout=args.timeout)
        except ServiceError as exc:
            tag(exc, job_id=job.id)
            raise
        _print(result)

    return _client_command(args, submit)


def _cmd_job(args: argparse.Namespace) -> int:
    job_id, route = _job_reference(args.job_id, args.operation or "")
    headers = _headers(args.header)

    async def result(client: Client) -> None:
        job = client.job(job_id, route, headers=headers)
        try:
            found = await job.result(timeout=args.timeout)
        except ServiceError as exc:
            tag(exc, job_id=job_id)
            raise
        _print(found)

    return _client_command(args, result)


def _job_reference(given: str, operation: str) -> tuple[str, str]:
    """What `burrow job` is given → (the service's job id, its route or ""): an id as
    `burrow submit --id-only` prints it, the JSON line `burrow submit` prints, or a gateway
    job id (`calc.add.<hex>`, which names its operation)."""
    text = given.strip()
    if text.startswith("{"):
        try:
            found = orjson.loads(text)
        except orjson.JSONDecodeError:
            found = None
        if not isinstance(found, dict) or not isinstance(found.get("job_id"), str):
            raise ConfigError(f"{text[:80]!r} is not what burrow submit prints: no job_id")
        text = found["job_id"]
    split = split_job_id(text)
    if split is None:
        return text, operation
    route, job_id = split
    if operation and operation != route:
        raise ConfigError(f"job {text!r} is a job of {route}, not of {operation}")
    return job_id, route


def _cmd_emit(args: argparse.Namespace) -> int:
    payload, headers = _payload(args.payload), _headers(args.header)

    async def emit(client: Client) -> None:
        routed = await client.emit(args.event, payload, delay=args.delay, headers=headers)
        _print({"routed": routed})

    return _client_command(args, emit)


def _cmd_tail(args: argparse.Namespace) -> int:
    settings = load_settings()
    _tool_logging(settings.log_format)

    async def run() -> int:
        async for event in tail(settings, args.pattern):
            _emit(
                {
                    "event": event.routing_key,
                    "headers": event.headers,
                    "body": readable_body(event.body),
                }
            )
        return 0

    return _run(run)


def _tool_logging(fmt: Any) -> None:
    """The commands other than `run` report a failure as one `error:` line: the connection
    attempts' own log lines (aiormq, the link) would only repeat it."""
    configure_logging(fmt, "error")
    for name in ("aiormq", "aio_pika", "burrow.transport"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _emit(value: Any) -> None:
    sys.stdout.write(json_line(value) + "\n")
    sys.stdout.flush()


def _cmd_definitions(args: argparse.Namespace) -> int:
    settings = load_settings()
    topology = Topology()
    for svc in load_target(args.target):
        topology = topology.merge(service_topology(svc, settings))
    text = orjson.dumps(
        to_definitions(topology, vhost=args.vhost), option=orjson.OPT_INDENT_2
    ).decode()
    if args.output == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    return 0


def _cmd_outbox(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    if args.action == "init":
        if settings.outbox_dsn is None:
            raise ConfigError("no outbox database: set BURROW_OUTBOX_DSN")
        dsn = settings.outbox_dsn.get_secret_value()
        _run(lambda: _outbox_init(dsn, settings.outbox_schema))
        print(f"outbox and inbox tables ready in schema {settings.outbox_schema!r}")
        return 0
    return _run(lambda: _outbox_relay(settings))


async def _outbox_init(dsn: str, schema: str) -> int:
    await outbox_schema.init(dsn, schema)
    return 0


async def _outbox_relay(settings: Settings) -> int:
    """`burrow outbox relay` until SIGTERM/SIGINT (exit 0), or 1 if the broker refused it; with
    `/metrics`, `/healthz` and `/readyz` on BURROW_HTTP_PORT, as `burrow run` serves them."""
    relay = configured_relay(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    http = HttpServer(Health(checks=[relay.problems]), settings.http_host, settings.http_port)
    await http.start()
    try:
        return await relay.run(stop)
    finally:
        await http.close()


def _cmd_dlq(args: argparse.Namespace) -> int:
    settings = load_settings()
    _tool_logging(settings.log_format)
    tool = DeadLetterTool(settings, args.service)

    async def run() -> int:
        if args.action == "list":
            for letter in await tool.list(args.limit):
                _emit(letter.summary())
        elif args.action == "show":
            if not args.ids:
                raise ConfigError("name the message ids to show")
            found = await tool.show(args.ids, args.limit)
            for letter in found:
                _emit(letter.detail())
            missing = set(args.ids) - {letter.message_id for letter in found}
            if missing:
                print(
                    f"error: {len(missing)} message id(s) not in the first {args.limit} letters",
                    file=sys.stderr,
                )
                return 1
        elif args.action == "replay":
            if not args.ids and not args.all:
                raise ConfigError("name message ids to replay, or pass --all")
            report = await tool.replay(None if args.all else args.ids)
            _emit(report.to_dict())
            if report.skipped or report.missing:
                print(
                    f"error: {len(report.skipped)} letter(s) skipped and left in the dead-letter "
                    f"queue, {len(report.missing)} message id(s) not found",
                    file=sys.stderr,
                )
                return 1
        else:
            if not args.yes:
                raise ConfigError("purge deletes every dead letter: pass --yes")
            _emit({"purged": await tool.purge()})
        return 0

    return _run(run)


def _cmd_schemas(args: argparse.Namespace) -> int:
    settings = load_settings()
    services = load_target(args.target)
    directory = Path(args.dir)
    if args.action == "export":
        for path in openapi.export(services, settings, directory):
            print(path)
        return 0
    old = contracts.load_contract(args.against, Path.cwd())
    new = {svc.name: contracts.contract(svc) for svc in services}
    changes = contracts.compare(old, new)
    for change in changes:
        print(change)
    breaking = [change for change in changes if change.breaking]
    print(f"{len(breaking)} breaking, {len(changes) - len(breaking)} compatible change(s)")
    return 1 if breaking else 0


def _header_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--header",
        "-H",
        action="append",
        metavar="NAME=VALUE",
        help="a message header for the service's middleware (repeatable)",
    )


def _id_only_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--id-only", action="store_true", help=f"print the bare {what}, not a JSON object"
    )


def _client_commands(commands: Any) -> None:
    """The commands that act as a caller: call, cast, submit, job, emit, tail."""
    call = commands.add_parser("call", help="call an operation and print its reply")
    call.add_argument("operation", help="service.operation, e.g. calc.add")
    call.add_argument("payload", help="request as JSON")
    call.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _header_option(call)
    call.set_defaults(func=_cmd_call)

    cast = commands.add_parser(
        "cast", help='send a fire-and-forget command; print {"message_id": …}'
    )
    cast.add_argument("operation", help="service.operation")
    cast.add_argument("payload", help="request as JSON")
    cast.add_argument("--delay", type=float, default=None, help="deliver after S seconds")
    _header_option(cast)
    _id_only_option(cast, "message id")
    cast.set_defaults(func=_cmd_cast)

    submit = commands.add_parser(
        "submit", help='submit a job; print {"job_id": …}, or (--wait) its result'
    )
    submit.add_argument("operation", help="service.operation")
    submit.add_argument("payload", help="request as JSON")
    submit.add_argument("--wait", action="store_true", help="wait for and print the result")
    submit.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits")
    submit.add_argument("--delay", type=float, default=None, help="start after S seconds")
    _header_option(submit)
    _id_only_option(submit, "job id")
    submit.set_defaults(func=_cmd_submit)

    job = commands.add_parser("job", help="print the result of a submitted job")
    job.add_argument(
        "job_id",
        help="a job id, the JSON burrow submit prints, or a gateway job id (calc.add.<hex>)",
    )
    job.add_argument(
        "--operation",
        "-o",
        help="the job's operation (calc.add): ask its service, from any machine; "
        "without it, read BURROW_JOB_STORE_URL directly",
    )
    job.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    _header_option(job)
    job.set_defaults(func=_cmd_job)

    emit = commands.add_parser("emit", help="publish a domain event")
    emit.add_argument("event", help="routing key, e.g. orders.eu.created")
    emit.add_argument("payload", help="event as JSON")
    emit.add_argument("--delay", type=float, default=None, help="publish after S seconds")
    _header_option(emit)
    emit.set_defaults(func=_cmd_emit)

    tail_cmd = commands.add_parser("tail", help="print events matching a pattern as JSON lines")
    tail_cmd.add_argument("pattern", help="topic pattern, e.g. 'calc.#'")
    tail_cmd.set_defaults(func=_cmd_tail)


def _version() -> str:
    try:
        return importlib.metadata.version("burrow")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="burrow", description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run services until SIGTERM")
    run.add_argument(
        "target",
        nargs="?",
        default=DEFAULT_TARGET,
        help="module:attribute, imported from the current directory first",
    )
    run.add_argument(
        "--workers", type=int, default=1, help="processes sharing the queues (HTTP on port+i)"
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="restart when a .py file under the current directory changes (development; "
        "needs watchfiles: the reload extra)",
    )
    run.set_defaults(func=_cmd_run)

    gateway = commands.add_parser(
        "gateway", help="serve the services' operations as an HTTP API (calls them over AMQP)"
    )
    gateway.add_argument(
        "targets",
        nargs="*",
        metavar="target",
        help=f"module:attribute of each service to expose (default {DEFAULT_TARGET})",
    )
    gateway.set_defaults(func=_cmd_gateway)

    _client_commands(commands)

    dlq = commands.add_parser("dlq", help="list, show, replay or purge dead letters")
    dlq.add_argument("action", choices=["list", "show", "replay", "purge"])
    dlq.add_argument("service", help="service whose dead-letter queue to use (or scheduler)")
    dlq.add_argument("ids", nargs="*", help="message ids (show, replay)")
    dlq.add_argument(
        "--all", action="store_true", help="replay every dead letter (unreadable ones stay)"
    )
    dlq.add_argument(
        "--limit", type=int, default=1000, help="look at most at this many (list, show)"
    )
    dlq.add_argument("--yes", action="store_true", help="confirm purge")
    dlq.set_defaults(func=_cmd_dlq)

    outbox = commands.add_parser(
        "outbox",
        help="create the outbox and inbox tables (init), or publish committed rows (relay)",
    )
    outbox.add_argument("action", choices=["init", "relay"])
    outbox.set_defaults(func=_cmd_outbox)

    schemas = commands.add_parser("schemas", help="export contracts or check them for breaks")
    schemas.add_argument("action", choices=["export", "check"])
    schemas.add_argument("target", nargs="?", default=DEFAULT_TARGET, help="module:attribute")
    schemas.add_argument("--dir", default="schemas", help="directory of the exported contracts")
    schemas.add_argument(
        "--against", default="HEAD", help="git ref or directory holding the older contract.json"
    )
    schemas.set_defaults(func=_cmd_schemas)

    definitions = commands.add_parser(
        "definitions", help="print the RabbitMQ definitions (exchanges, queues, bindings)"
    )
    definitions.add_argument("target", nargs="?", default=DEFAULT_TARGET, help="module:attribute")
    definitions.add_argument("--vhost", default="/", help="virtual host to declare them in")
    definitions.add_argument("-o", "--output", default="-", help="file to write (default stdout)")
    definitions.set_defaults(func=_cmd_definitions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `burrow` command; returns the exit code."""
    args = _parser().parse_args(argv)
    _early_logging()
    try:
        code: int = args.func(args)
    except ServiceError as exc:
        print(error_line(exc), file=sys.stderr)
        if exc.details:
            print(codec.encode(exc.details).decode(), file=sys.stderr)
        return 1
    except BurrowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def error_line(exc: ServiceError) -> str:
    """The one `error:` line of a failed call, cast or submit: its code, its message, and the
    message it is about (its note, `message_id=… correlation_id=…`), to find it in the
    service's log and dead letters."""
    notes = "; ".join(getattr(exc, "__notes__", ()))
    which = f" ({notes})" if notes else ""
    return f"error: {exc.code.value}: {exc.message}{which}"


def _early_logging() -> None:
    """What is logged before the settings are read (an unknown `BURROW_*` variable) comes out
    on stderr in the format asked for; each command configures logging again once it has them."""
    asked = os.environ.get("BURROW_LOG_FORMAT", "").lower()
    fmt: Literal["auto", "json", "console"] = (
        "json" if asked == "json" else "console" if asked == "console" else "auto"
    )
    configure_logging(fmt, "warning")
