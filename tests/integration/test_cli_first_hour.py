"""The first hour with `burrow`: a user's module served from its own directory, and each early
mistake (a wrong target, a busy port, a bad vhost or port, a typo'd variable) ending in one
`error:` line. Every run is the real executable, as a subprocess, on the test's namespace.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from service import Client, Service, load_settings
from service._protocol.topology import client_topology, service_topology
from tests.conftest import AMQP_URL, delete_topology
from tests.integration.test_cli_commands import BURROW, RUN_TIMEOUT, Run, run_burrow

__all__: list[str] = []

pytestmark = pytest.mark.slow

GREETER = """
from service import Context, Model, Service

svc = Service("greeter")


class Hello(Model):
    name: str


class Greeting(Model):
    text: str


@svc.operation()
async def hello(req: Hello) -> Greeting:
    return Greeting(text=f"hello {req.name}")


@svc.subscribe("greeter.greeted")
async def greeted(event: Greeting, ctx: Context) -> None:
    ctx.log.info("greeted", text=event.text)
"""


@pytest.fixture
async def project(tmp_path: Path, namespace: str) -> AsyncIterator[Path]:
    """A fresh directory holding a user's greeter.py; what it declares is deleted afterwards."""
    (tmp_path / "greeter.py").write_text(GREETER, encoding="utf-8")
    yield tmp_path
    spec = importlib.util.spec_from_file_location(f"greeter_{namespace}", tmp_path / "greeter.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    svc: Service = module.svc
    settings = load_settings(namespace=namespace, amqp_url=AMQP_URL)
    await delete_topology(service_topology(svc, settings), client_topology(settings))


def environment(namespace: str, **variables: str) -> dict[str, str]:
    """A `burrow` subprocess's environment: only this test's BURROW_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BURROW_")}
    env.update(
        BURROW_NAMESPACE=namespace,
        BURROW_AMQP_URL=AMQP_URL,
        BURROW_LOG_FORMAT="json",
        BURROW_HTTP_HOST="127.0.0.1",
        BURROW_HTTP_PORT="0",
        BURROW_JOB_STORE_URL="memory://",
    )
    env.update(variables)
    return env


async def burrow(cwd: Path, env: dict[str, str], *args: str) -> Run:
    """Run `burrow <args>` in `cwd` to completion."""
    return await run_burrow(*args, env=env, cwd=cwd)


def error_line(run: Run) -> str:
    """The one line a failed run printed on stderr (asserting it is one, and no traceback)."""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: "), run.stderr
    return lines[0]


class Served:
    """A `burrow run` process in the background, its JSON log lines read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.other: list[str] = []  # stderr lines that are not JSON (there should be none)
        self.ended = False  # stderr closed: the process (group) is gone
        self._changed = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.other.append(raw.decode(errors="replace"))
                continue
            async with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    def count(self, event: str, **fields: Any) -> int:
        """How many lines so far have this event and these fields."""
        return sum(
            1
            for line in self.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        )

    async def logged(self, event: str, times: int = 1, **fields: Any) -> None:
        """Wait until `times` lines with this event and these fields were logged."""
        async with asyncio.timeout(RUN_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self.count(event, **fields) >= times or self.ended)
        assert self.count(event, **fields) >= times, (self.lines, self.other)

    async def ready(self, times: int = 1) -> None:
        """Wait until the process has connected both links (`times` times: once per start)."""
        await self.logged("broker connected", times, link="consumer")
        await self.logged("broker connected", times, link="publisher")

    async def stop(self) -> int:
        """SIGTERM, then the exit code once the process is gone and its output read."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(RUN_TIMEOUT):
            code = await self.process.wait()
            await self._reader
        return code


@pytest.fixture
async def serve(project: Path, namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """Start `burrow run greeter:svc [args]` in the project directory, ready when returned."""
    started: list[Served] = []

    async def start(*args: str) -> Served:
        process = await asyncio.create_subprocess_exec(
            BURROW,
            "run",
            "greeter:svc",
            *args,
            cwd=project,
            env=environment(namespace),
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a failed test can kill --reload's child too
        )
        served = Served(process)
        started.append(served)
        await served.ready()
        return served

    yield start
    for served in started:
        if served.process.returncode is None:
            os.killpg(served.process.pid, signal.SIGKILL)
            await served.stop()


@pytest.fixture
def unused_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, and nothing else takes it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- serving a user's module --------------------------------------------------------------------


async def test_run_serves_a_module_from_the_current_directory(
    serve: Callable[..., Any], project: Path, namespace: str
) -> None:
    """`burrow run greeter:svc` imports ./greeter.py and `burrow call greeter.hello` answers."""
    await serve()
    run = await burrow(project, environment(namespace), "call", "greeter.hello", '{"name": "ann"}')
    assert (run.code, run.json()) == (0, {"text": "hello ann"}), run.stderr


async def test_unknown_operation_suggests_the_closest(
    serve: Callable[..., Any], project: Path, namespace: str
) -> None:
    """A call to a misspelt operation exits 1 with one NOT_FOUND line naming the right one
    (and the call's ids); a name like none of the service's gets no suggestion."""
    await serve()
    env = environment(namespace)
    misspelt = await burrow(project, env, "call", "greeter.helo", '{"name": "a"}')
    assert misspelt.code == 1
    assert without_ids(error_line(misspelt)) == (
        "error: NOT_FOUND: unknown operation 'greeter.helo'; did you mean 'greeter.hello'?"
    )
    unlike = await burrow(project, env, "call", "greeter.xyz", '{"name": "a"}')
    assert unlike.code == 1
    assert without_ids(error_line(unlike)) == "error: NOT_FOUND: unknown operation 'greeter.xyz'"


def without_ids(line: str) -> str:
    """An `error:` line of a failed call without the ids it ends with (asserting they are
    there: `(message_id=X correlation_id=X)`)."""
    found = re.fullmatch(r"(.*) \(message_id=(\S+) correlation_id=\2\)", line)
    assert found is not None, line
    return found[1]


async def test_sigterm_drains_and_logs_no_warning(serve: Callable[..., Any]) -> None:
    """SIGTERM logs one `draining` line, closes the links at info (not "connection lost"),
    and exits 0 with no warning or error line."""
    served: Served = await serve()
    assert await served.stop() == 0
    assert served.count("draining") == 1
    assert served.count("broker connection closed") == 2
    assert served.count("burrow stopped") == 1
    assert [line for line in served.lines if line["level"] != "info"] == []
    assert served.other == []


async def test_handler_log_lines_carry_empty_ids_not_null(
    serve: Callable[..., Any], project: Path, namespace: str
) -> None:
    """An event has no correlation id: its handler's `ctx.log` line and the `handled` line
    both say `""`, never null."""
    served: Served = await serve()
    run = await burrow(project, environment(namespace), "emit", "greeter.greeted", '{"text": "x"}')
    assert (run.code, run.json()) == (0, {"routed": True}), run.stderr
    await served.logged("handled", operation="greeter.greeted")
    await served.logged("greeted")
    ids = [
        line["correlation_id"]
        for line in served.lines
        if line["event"] in ("greeted", "handled") and line.get("operation") == "greeter.greeted"
    ]
    assert ids == ["", ""]


async def test_reload_restarts_on_a_changed_module(
    serve: Callable[..., Any], project: Path, namespace: str
) -> None:
    """`burrow run --reload` serves the new code once greeter.py changes, and stops on
    SIGTERM with exit code 0."""
    pytest.importorskip("watchfiles")
    served: Served = await serve("--reload")
    env = environment(namespace)
    before = await burrow(project, env, "call", "greeter.hello", '{"name": "ann"}')
    assert before.json() == {"text": "hello ann"}, before.stderr

    source = project / "greeter.py"
    source.write_text(source.read_text().replace('f"hello ', 'f"hi '), encoding="utf-8")
    await served.logged("files changed; restarting")
    await served.ready(times=2)
    after = await burrow(project, env, "call", "greeter.hello", '{"name": "ann"}')
    assert after.json() == {"text": "hi ann"}, after.stderr
    assert await served.stop() == 0


# -- one line per mistake ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("nosuchmodule:x", "no module named 'nosuchmodule' in "),
        ("greeter:nope", "module 'greeter' has no attribute 'nope'; it has greeter:svc"),
        ("greeter:Hello", "greeter:Hello is not a Service or a list of Services but the class"),
        ("greeter", "target 'greeter' must look like module:attribute"),
    ],
)
async def test_bad_target_is_one_line(
    project: Path, namespace: str, target: str, says: str
) -> None:
    """A target whose module, attribute or Service is missing exits 2 with one line."""
    run = await burrow(project, environment(namespace), "run", target)
    assert run.code == 2
    assert says in error_line(run)


async def test_busy_http_port_names_the_variable(project: Path, namespace: str) -> None:
    """An HTTP port already in use exits 2 with one line naming BURROW_HTTP_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = environment(namespace, BURROW_HTTP_PORT=port)
        run = await burrow(project, env, "run", "greeter:svc")
    assert run.code == 2
    line = error_line(run)
    assert f"127.0.0.1:{port}" in line
    assert "BURROW_HTTP_PORT" in line


async def test_bad_vhost_is_fatal_at_start_with_the_brokers_reason(
    project: Path, namespace: str
) -> None:
    """A vhost the broker does not have stops `burrow run` (exit 1) and `burrow call` (exit 2)
    with the broker's own reason, instead of retrying for ever."""
    url = f"{AMQP_URL.rstrip('/')}/{namespace}-no-such-vhost"
    env = environment(namespace, BURROW_AMQP_URL=url)
    reason = f"NOT_ALLOWED - vhost {namespace}-no-such-vhost not found"

    served = await burrow(project, env, "run", "greeter:svc")
    assert served.code == 1
    lines = [orjson.loads(line) for line in served.stderr.splitlines()]
    errors = [line for line in lines if line["level"] == "error"]
    # Each link that got as far as the vhost says so (the exit may beat the second one).
    refused = [line for line in errors if line["event"].startswith("broker refused the virtual")]
    assert 1 <= len(refused) <= 2
    assert all(reason in line["error"] for line in refused)
    # The second link's refusal may be logged after the exit decision, as the App stops.
    assert [line["event"] for line in errors if line not in refused] == [
        "fatal broker error; exiting"
    ]

    called = await burrow(project, env, "call", "greeter.hello", '{"name": "ann"}')
    assert called.code == 2
    assert reason in error_line(called)


async def test_refused_port_is_one_line_with_the_cause(
    project: Path, namespace: str, unused_port: int
) -> None:
    """A broker port nobody listens on: `burrow call` exits 1 with one line saying the
    connection was refused."""
    env = environment(namespace, BURROW_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{unused_port}/")
    run = await burrow(project, env, "call", "greeter.hello", '{"name": "ann"}')
    assert run.code == 1
    line = error_line(run)
    assert line.startswith("error: UNAVAILABLE: cannot reach the broker at amqp://guest:***@")
    assert "Connection refused" in line


async def test_refused_port_while_serving_warns_once_per_link(
    project: Path, namespace: str, unused_port: int
) -> None:
    """`burrow run` against a refused port retries, warning once per link with the cause
    (aiormq's own lines never show); here BURROW_STARTUP_TIMEOUT ends it with exit 1."""
    env = environment(
        namespace,
        BURROW_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{unused_port}/",
        BURROW_STARTUP_TIMEOUT="2",
        BURROW_RECONNECT_MIN_DELAY="0.05",
    )
    run = await burrow(project, env, "run", "greeter:svc")
    assert run.code == 1
    lines = [orjson.loads(line) for line in run.stderr.splitlines()]
    warnings = [line for line in lines if line["level"] == "warning"]
    assert sorted(line["link"] for line in warnings) == ["consumer", "publisher"]
    assert {line["event"] for line in warnings} == {"broker connection failed"}
    assert all("Connection refused" in line["error"] for line in warnings)
    assert not [line for line in lines if line.get("logger", "").startswith("aiormq")]


async def test_typo_variable_warns_with_the_closest(project: Path, namespace: str) -> None:
    """An unknown BURROW_* variable is one warning naming the closest setting, on stderr;
    stdout stays the command's output."""
    env = environment(namespace, BURROW_PREFECH="10")
    run = await burrow(project, env, "definitions", "greeter:svc")
    assert run.code == 0, run.stderr
    assert "queues" in run.json()
    (warning,) = [orjson.loads(line) for line in run.stderr.splitlines()]
    assert warning["level"] == "warning"
    assert "BURROW_PREFECH" in warning["event"]
    assert "did you mean BURROW_PREFETCH?" in warning["event"]


async def test_version_is_the_installed_one(project: Path, namespace: str) -> None:
    """`burrow --version` prints the installed package's version."""
    run = await burrow(project, environment(namespace), "--version")
    assert (run.code, run.stdout) == (0, f"burrow {importlib.metadata.version('burrow')}\n")


async def test_reload_without_watchfiles_says_how_to_install(project: Path, namespace: str) -> None:
    """`--reload` where watchfiles cannot be imported exits 2 with one line on installing it."""
    blocker = project / "blocked"
    blocker.mkdir()
    (blocker / "watchfiles.py").write_text("raise ImportError('not installed')\n")
    env = environment(namespace, PYTHONPATH=str(blocker))
    run = await burrow(project, env, "run", "greeter:svc", "--reload")
    assert run.code == 2
    assert "pip install 'burrow[reload]'" in error_line(run)


# -- quiet logs for what was asked for ----------------------------------------------------------


async def test_client_close_and_unheard_event_log_no_warning(namespace: str) -> None:
    """Closing a Client logs the link's close at info, and an event nobody subscribed to is
    an info line, not a warning."""
    client = Client(load_settings(namespace=namespace, amqp_url=AMQP_URL))
    with capture_logs() as logs:
        await client.start()
        assert await client.emit(f"{namespace}.nobody.listens", {}) is False
        await client.close()
    await delete_topology(client_topology(client.settings))
    assert [entry for entry in logs if entry["log_level"] not in ("info", "debug")] == []
    events = {entry["event"]: entry["log_level"] for entry in logs}
    assert events["event had no subscriber"] == "info"
    assert events["broker connection closed"] == "info"
