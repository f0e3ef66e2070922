"""Submit under faults (docs/protocol.md §7): a broker restart mid-stream of submits, a service
`kill -9` between its handler and its completion, and a submitter gone before it read anything.

One oracle for all three (`JobBook.assert_sound`): every confirmed submit ends with exactly one
readable result — the right value for its input, read with `client.job(id, route).result()` by
two fresh clients that did not submit it — or a dead letter; none is lost, and none has two
different results. The handler stamps every run with a fresh nonce, so two runs never give the
same reply: the fresh reads, the submitter's own handle (where it read one) and every
completion event of the job must hold the same reply, naming a run the handler really made.
Submits that raised (never confirmed) are not jobs and are not counted; a handler run for a key
nobody submitted is a phantom.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from service import App, Client, Model, Service, ServiceError, Unavailable
from service._calling.jobs import Job
from service._protocol.jobs import JobState
from service._protocol.topology import service_topology
from service._protocol.vocabulary import Names, PublishKind
from service._serving.dispatcher import Dispatcher
from service._serving.middleware import Request, Result
from service._serving.settlement import Publish
from service._stores.sqlite import SqliteJobStore
from service.testing import delete_entities
from tests.conftest import delete_topology
from tests.faults.conftest import MakeClient, RunApp, make_settings
from tests.faults.harness import Ledger, PrivateBroker, wait_until, watch_loss

__all__ = ["Square", "Squared", "jobs_service", "serve"]

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "jobs"
ROUTE = f"{SERVICE}.square"
_READ_TIMEOUT = 15.0  # one fresh read of a finished job answers at once; bound for the others


class Square(Model):
    """One job: `key` names it in the book, `x` is its input."""

    key: str
    x: int
    delay_ms: int = 0


class Squared(Model):
    """The job's result; `run` is a nonce fresh for each handler run."""

    key: str
    square: int
    run: str


Record = Callable[[str, str], None]  # (key, run nonce): one handler run
Gate = Callable[[str], Awaitable[None]]


def jobs_service(record: Record, *, gate: Gate | None = None) -> Service:
    """The `jobs` service: `square` squares x, records its run, and returns the run's nonce.

    Args:
        record: called with the key and a fresh nonce when a run has done its work.
        gate: awaited with the key before the work (to hold chosen jobs).
    """
    svc = Service(SERVICE)

    async def square(req: Square) -> Squared:
        """Square x after `delay_ms`; every run has its own nonce."""
        if gate is not None:
            await gate(req.key)
        if req.delay_ms:
            await asyncio.sleep(req.delay_ms / 1000)
        run = uuid.uuid4().hex
        record(req.key, run)
        return Squared(key=req.key, square=req.x * req.x, run=run)

    svc.add_operation(square)
    return svc


# -- the oracle ----------------------------------------------------------------------------

Outcome = tuple[str, Any]  # ("result", decoded reply) | ("error", wire code)


async def _outcome(job: Job, timeout: float) -> Outcome:
    try:
        return "result", await job.result(timeout=timeout)
    except ServiceError as exc:
        return "error", exc.code.value


@dataclass
class JobBook:
    """Submits by job id, handler runs by key, and what every reader saw."""

    submitted: dict[str, tuple[str, int]] = field(default_factory=dict)  # confirmed: (key, x)
    handles: dict[str, Job] = field(default_factory=dict)  # the submitter's, when it is us
    attempted: set[str] = field(default_factory=set)  # keys of every submit tried
    unconfirmed: int = 0  # submits that raised: no job
    runs: dict[str, list[str]] = field(default_factory=dict)  # key -> nonce of each run
    pushed: dict[str, Outcome] = field(default_factory=dict)  # the submitter's handle read
    reads: dict[str, list[Outcome]] = field(default_factory=dict)  # the fresh clients read

    def run(self, key: str, nonce: str) -> None:
        """A handler run for `key` did its work (the `Record` of `jobs_service`)."""
        self.runs.setdefault(key, []).append(nonce)

    async def submit(self, client: Client, key: str, x: int, delay_ms: int = 0) -> Job | None:
        """Submit once; a submit that raises a retryable error is not confirmed, not a job."""
        self.attempted.add(key)
        try:
            job = await client.submit(ROUTE, {"key": key, "x": x, "delay_ms": delay_ms})
        except Unavailable:
            self.unconfirmed += 1
            return None
        self.submitted[job.id] = (key, x)
        self.handles[job.id] = job
        return job

    def confirmed(self, job_id: str, key: str, x: int) -> None:
        """A job another process submitted (and saw confirmed)."""
        self.attempted.add(key)
        self.submitted[job_id] = (key, x)

    async def settle(self, timeout: float) -> None:
        """Wait for the submitter's own handles: push, or the `result` polls after a reconnect."""
        ids = list(self.handles)
        outcomes = await asyncio.gather(*(_outcome(self.handles[i], timeout) for i in ids))
        self.pushed.update(zip(ids, outcomes, strict=True))

    async def read_all(self, readers: Sequence[Client], timeout: float = _READ_TIMEOUT) -> None:
        """Every confirmed job read by every reader, through `client.job(id, route)`."""
        window = asyncio.Semaphore(32)

        async def read(reader: Client, job_id: str) -> Outcome:
            async with window:
                return await _outcome(reader.job(job_id, ROUTE), timeout)

        ids = list(self.submitted)
        for reader in readers:
            outcomes = await asyncio.gather(*(read(reader, i) for i in ids))
            for job_id, outcome in zip(ids, outcomes, strict=True):
                self.reads.setdefault(job_id, []).append(outcome)

    def assert_sound(
        self,
        *,
        dead: set[str],
        queued: set[str],
        events: dict[str, list[Outcome]],
    ) -> str:
        """Every confirmed job: one readable, right result (or a dead letter); none lost, none
        with two results, every result from a real run with its completion event; no
        phantom runs. Returns the summary."""
        problems: dict[str, list[str]] = {}

        def bad(what: str, job_id: str, detail: Any = "") -> None:
            problems.setdefault(what, []).append(f"{job_id} {detail}".strip())

        for job_id, (key, x) in self.submitted.items():
            reads = self.reads.get(job_id, [])
            results = [value for kind, value in reads if kind == "result"]
            if not results and job_id in dead:
                continue  # dead-lettered: its one ending
            if len(results) != len(reads) or not results:
                bad("lost" if job_id not in queued else "still queued", job_id, reads)
                continue
            pushed = self.pushed.get(job_id)
            seen = results + [value for kind, value in events.get(job_id, [])]
            if pushed is not None:
                if pushed[0] != "result":
                    bad("the submitter's handle failed", job_id, pushed)
                seen.append(pushed[1])
            if len({json.dumps(value, sort_keys=True) for value in seen}) > 1:
                bad("two different results", job_id, seen)
            value = results[0]
            if not isinstance(value, dict) or {"key": key, "square": x * x} != {
                k: v for k, v in value.items() if k != "run"
            }:
                bad("wrong result", job_id, (key, x, value))
            elif value.get("run") not in self.runs.get(key, []):
                bad("a result no run produced", job_id, (value, self.runs.get(key)))
            if not events.get(job_id):
                bad("no completion event", job_id)
        for key in sorted(set(self.runs) - self.attempted):
            bad("phantom run", key)
        summary = self.summary(dead)
        assert not problems, (
            "; ".join(f"{what}: {len(items)} {items[:5]}" for what, items in problems.items())
            + f"; {summary}"
        )
        return summary

    def summary(self, dead: Collection[str] = ()) -> str:
        """Counts for the failure message."""
        reruns = sum(1 for nonces in self.runs.values() if len(nonces) > 1)
        return (
            f"confirmed={len(self.submitted)} unconfirmed={self.unconfirmed}"
            f" runs={sum(len(n) for n in self.runs.values())} rerun={reruns} dead={len(dead)}"
        )


class CompletionTap:
    """A durable quorum queue bound to the `jobs.square.completed|failed` events: every
    completion event published, kept across a broker restart, read when drained."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.names = Names(namespace)
        self.queue = f"{namespace}.test.completions"
        self.events: dict[str, list[Outcome]] = {}
        self.started = False

    async def start(self) -> CompletionTap:
        """Declare and bind the queue (the service declared the events exchange)."""
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                self.queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            self.started = True
            await queue.bind(self.names.events_exchange, routing_key=f"{ROUTE}.*")
        finally:
            await connection.close()
        return self

    async def drain(self) -> dict[str, list[Outcome]]:
        """Take every event there now into `events` (by job id); return all taken so far."""
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(self.queue, ensure=True)
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                kind = "result" if message.headers.get("x-status") == "ok" else "error"
                body = json.loads(message.body)
                value = body if kind == "result" else body.get("code")
                self.events.setdefault(message.correlation_id or "?", []).append((kind, value))
        finally:
            await connection.close()
        return self.events


@pytest.fixture
async def tap(broker: PrivateBroker, namespace: str) -> AsyncIterator[CompletionTap]:
    """The completion tap of this test (started by the test, deleted after it)."""
    completions = CompletionTap(broker.url, namespace)
    yield completions
    if completions.started:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await delete_entities([completions.queue], [], broker.url)


async def _leftovers(url: str, namespace: str) -> tuple[set[str], set[str]]:
    """Once the service stopped: ids still in its queues, ids in its DLQ (both taken)."""
    names = Names(namespace)
    left = Ledger()
    await left.drain(
        url,
        [names.request_queue(SERVICE), names.commands_queue(SERVICE)],
        [names.dead_letter_queue(SERVICE)],
    )
    return left.queued, left.dead


def _store_url(tmp_path: Path) -> str:
    """A job store of this test only: an SQLite file every process of the test shares."""
    return f"sqlite://{tmp_path / 'jobs.sqlite3'}"


# -- processes of our own ----------------------------------------------------------------------


@dataclass
class Child:
    """A Python process this test started: its stdout read line by line, stderr in a file."""

    process: asyncio.subprocess.Process
    log: Path

    def tail(self) -> str:
        """The end of its stderr, for failure messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return "(no log)"

    async def line(self, timeout: float) -> str:
        """Its next line on stdout that starts with `@ ` (logs go there too), without it; fail
        with its log when it ends or stays silent."""
        assert self.process.stdout is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await self.process.stdout.readline()
            except TimeoutError:
                raise AssertionError(f"no line within {timeout}s; log:\n{self.tail()}") from None
            if not raw:
                await self.process.wait()
                raise AssertionError(f"exited {self.process.returncode}; log:\n{self.tail()}")
            if raw.startswith(b"@ "):
                return raw[2:].decode().strip()

    async def kill(self) -> None:
        """SIGKILL it and reap it."""
        self.process.kill()
        await asyncio.wait_for(self.process.wait(), 30)


Spawn = Callable[..., Awaitable[Child]]


def _child_env(url: str, namespace: str, **extra: str) -> dict[str, str]:
    """The environment of a child: this test's broker and namespace, fault-test timings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BURROW_", "FAULT_"))}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    settings = make_settings(url, namespace)
    env |= {
        "BURROW_AMQP_URL": url,
        "BURROW_NAMESPACE": namespace,
        "BURROW_HEARTBEAT": str(settings.heartbeat),
        "BURROW_PUBLISH_TIMEOUT": str(settings.publish_timeout),
        "BURROW_CONNECT_TIMEOUT": str(settings.connect_timeout),
        "BURROW_RECONNECT_MIN_DELAY": str(settings.reconnect_min_delay),
        "BURROW_RECONNECT_MAX_DELAY": str(settings.reconnect_max_delay),
        "BURROW_LOG_LEVEL": "warning",
    }
    return env | extra


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start `python -c <code> [args]` with an environment; each child still running after the test
    is stopped (SIGTERM, then SIGKILL after 30 s) — only the children started here."""
    children: list[Child] = []

    async def start(code: str, env: dict[str, str], name: str, *args: str) -> Child:
        log = tmp_path / f"{name}-{len(children)}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                code,
                *args,
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        child = Child(process, log)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.process.returncode is None:
            child.process.terminate()
            try:
                await asyncio.wait_for(child.process.wait(), 30)
            except TimeoutError:
                await child.kill()


# -- the service process of the kill -9 test ---------------------------------------------------

SERVE = "from tests.faults.test_jobs import serve; serve()"
AFTER_HANDLER, AFTER_RECORD = "after-handler", "after-record"


def _key_of(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        key = json.loads(body).get("key")
        return key if isinstance(key, str) else None
    return None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_crash(window: str, key: str) -> None:
    """Make this process die by SIGKILL when the job of `key` reaches `window`.

    The dispatcher handles a submit as: the middleware chain runs the handler and returns its
    `Result`; `_finish_job` records the outcome in the job store; `_carry_out` publishes the
    completions (the push to the submitter first), each confirmed, then acks. So:

    - `after-handler`: at the entry of `_finish_job` — the handler has returned (its run is
      recorded by the test), the store still says *running*, nothing is published or acked;
    - `after-record`: at the first completion `_publish` of the job — the outcome is committed
      in the store, no completion left the process, the submit is still unacked.

    A real SIGKILL (no handler, no flush, no close): the kernel closes the sockets and the
    broker requeues the unacked submit.
    """
    if window == AFTER_HANDLER:
        finish_job = Dispatcher._finish_job

        async def crash_before_record(self: Dispatcher, request: Request, result: Result) -> Result:
            if _key_of(request.delivery.body) == key:
                _die()
            return await finish_job(self, request, result)

        Dispatcher._finish_job = crash_before_record  # type: ignore[method-assign]
    elif window == AFTER_RECORD:
        publish = Dispatcher._publish

        async def crash_before_completion(self: Dispatcher, step: Publish) -> None:
            if step.kind is PublishKind.COMPLETION and _key_of(step.message.body) == key:
                _die()
            await publish(self, step)

        Dispatcher._publish = crash_before_completion  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown crash window {window!r}")


def serve() -> None:
    """The service process: `jobs` on the settings of `BURROW_*`; each run appended to the file
    `FAULT_RUNS_FILE` (`key nonce pid`, one write each: it survives a SIGKILL); with
    `FAULT_CRASH_AT`, dies in that window for the key `FAULT_CRASH_KEY`. Prints `@ ready` once
    serving; SIGTERM stops it gracefully."""
    asyncio.run(_serve())


async def _serve() -> None:
    fd = os.open(os.environ["FAULT_RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(key: str, nonce: str) -> None:
        os.write(fd, f"{key} {nonce} {os.getpid()}\n".encode())

    window = os.environ.get("FAULT_CRASH_AT")
    if window:
        _install_crash(window, os.environ["FAULT_CRASH_KEY"])
    app = App(jobs_service(record), http=False)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await app.start()
    await app.wait_ready(30)
    print("@ ready", flush=True)
    await stop.wait()
    await app.stop()
    os.close(fd)


def _runs_from(path: Path) -> list[tuple[str, str, int]]:
    """(key, nonce, pid) of every run the service processes recorded."""
    if not path.exists():
        return []
    return [
        (key, nonce, int(pid))
        for key, nonce, pid in (line.split() for line in path.read_text().splitlines())
    ]


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_broker_restart_mid_stream_of_submits(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    tap: CompletionTap,
    namespace: str,
    tmp_path: Path,
) -> None:
    """A broker restart under a stream of submits: every confirmed one ends with one result."""
    book = JobBook()
    app = await run_app(jobs_service(book.run), job_store_url=_store_url(tmp_path))
    await tap.start()
    client = await make_client()
    server = app.servers[0]
    client_lost = watch_loss(client.link)
    stop = asyncio.Event()

    async def stream() -> None:
        i = 0
        while not stop.is_set():
            await book.submit(client, f"a-{i}", i, delay_ms=200)
            i += 1
            await asyncio.sleep(0.01)

    streaming = asyncio.create_task(stream())
    try:
        await wait_until(lambda: len(book.submitted) >= 80, 30, "80 submits confirmed")
        # Jobs in flight when the broker goes: their handlers are cut, or their completion
        # cannot be published; their submits come back after the restart.
        await wait_until(lambda: server.in_flight >= 3, 10, "jobs in flight")
        await broker.stop_app()
        # Down until a submit met the outage (one waiting on the reconnect could wait out a
        # short outage and pass): bound, the publish timeout (3 s) and ε.
        await wait_until(lambda: book.unconfirmed > 0, 20, "a submit failing in the outage")
        await broker.start_app()
        mark = len(book.submitted)
        await wait_until(lambda: len(book.submitted) >= mark + 60, 40, "60 confirmed after it")
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await streaming
    await app.wait_ready(30)
    assert await broker.consumer_count(Names(namespace).commands_queue(SERVICE)) == 1
    await book.settle(timeout=60)
    await book.read_all([await make_client(), await make_client()])
    await app.stop()
    queued, dead = await _leftovers(broker.url, namespace)
    summary = book.assert_sound(dead=dead, queued=queued, events=await tap.drain())
    assert client_lost.is_set(), f"the submitter never lost its connection: {summary}"
    assert not queued, f"submits left in the queues: {sorted(queued)[:5]}; {summary}"


@pytest.mark.slow
@pytest.mark.parametrize("window", [AFTER_HANDLER, AFTER_RECORD])
async def test_service_killed_between_handler_and_completion(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    make_client: MakeClient,
    spawn: Spawn,
    tap: CompletionTap,
    namespace: str,
    tmp_path: Path,
    window: str,
) -> None:
    """kill -9 of the service after the handler, before the completion: one result on restart."""
    names = Names(namespace)
    store_path = tmp_path / "jobs.sqlite3"
    runs_file = tmp_path / "runs.txt"
    env = _child_env(
        broker.url,
        namespace,
        BURROW_JOB_STORE_URL=_store_url(tmp_path),
        BURROW_PREFETCH="8",
        FAULT_RUNS_FILE=str(runs_file),
    )
    book = JobBook()
    marked = "k-10"
    try:
        first = await spawn(SERVE, env | {"FAULT_CRASH_AT": window, "FAULT_CRASH_KEY": marked}, "a")
        assert await first.line(30) == "ready"
        await tap.start()
        submitter = await make_client()
        for i in range(30):
            await book.submit(submitter, f"k-{i}", i, delay_ms=100)
        assert len(book.submitted) == 30, book.summary()
        marked_id = next(j for j, (key, _) in book.submitted.items() if key == marked)

        async with asyncio.timeout(30):
            await first.process.wait()
        assert first.process.returncode == -signal.SIGKILL, first.tail()
        # In the window: the handler ran once, no completion left the process.
        runs = _runs_from(runs_file)
        assert [pid for key, _, pid in runs if key == marked] == [first.process.pid], runs
        assert marked_id in submitter.rpc.awaiting, "the completion was pushed before the kill"
        assert marked_id not in await tap.drain(), "a completion event before the kill"
        store = SqliteJobStore(store_path)
        try:
            held = await store.get(names.job_key(marked_id))
        finally:
            await store.close()
        assert held is not None
        expected = JobState.RUNNING if window == AFTER_HANDLER else JobState.COMPLETED
        assert held.state is expected, held

        second = await spawn(SERVE, env, "b")
        assert await second.line(30) == "ready"
        await book.settle(timeout=30)
        await book.read_all([await make_client(), await make_client()])
        second.process.terminate()
        async with asyncio.timeout(30):
            assert await second.process.wait() == 0, second.tail()
        queued, dead = await _leftovers(broker.url, namespace)
        events = await tap.drain()
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                settings = make_settings(broker.url, namespace)
                await delete_topology(
                    service_topology(jobs_service(book.run), settings), url=broker.url
                )
    for key, nonce, _ in _runs_from(runs_file):
        book.run(key, nonce)
    summary = book.assert_sound(dead=dead, queued=queued, events=events)
    assert not queued, summary
    pids = [pid for key, _, pid in _runs_from(runs_file) if key == marked]
    final = book.reads[marked_id][0][1]["run"]
    if window == AFTER_HANDLER:
        # Not recorded: the redelivery ran it again, and only that second run is the result.
        assert pids == [first.process.pid, second.process.pid], (pids, summary)
        assert final == book.runs[marked][1], summary
    else:
        # Recorded: the redelivery is answered from the store; the handler does not run again.
        assert pids == [first.process.pid], (pids, summary)
        assert final == book.runs[marked][0], summary
    assert book.pushed[marked_id] == ("result", book.reads[marked_id][0][1]), summary


SUBMIT = """
import asyncio, json, sys
from service import Client

async def main():
    async with Client() as client:
        for i in range(int(sys.argv[1])):
            job = await client.submit("jobs.square", {"key": f"s-{i}", "x": i})
            print("@", json.dumps([job.id, f"s-{i}", i]), flush=True)
        print("@ done", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("gone", ["closed", "killed"])
async def test_submitter_gone_before_reading(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    spawn: Spawn,
    tap: CompletionTap,
    namespace: str,
    tmp_path: Path,
    gone: str,
) -> None:
    """A submitter closed or killed before reading: a new client reads every result, right."""
    count = 40
    book = JobBook()
    release = asyncio.Event()

    async def hold_odd(key: str) -> None:
        if int(key.rsplit("-", 1)[1]) % 2:
            await release.wait()  # the odd jobs end only after the submitter is gone

    app = await run_app(jobs_service(book.run, gate=hold_odd), job_store_url=_store_url(tmp_path))
    await tap.start()
    evens = {f"s-{i}" for i in range(0, count, 2)}
    if gone == "closed":
        submitter = await make_client()
        for i in range(count):
            job = await submitter.submit(ROUTE, {"key": f"s-{i}", "x": i})
            book.confirmed(job.id, f"s-{i}", i)  # its handle is dropped unread
        await wait_until(lambda: evens <= set(book.runs), 20, "the even jobs done")
        await submitter.close()
    else:
        env = _child_env(broker.url, namespace)
        child = await spawn(SUBMIT, env, "submitter", str(count))
        while (line := await child.line(30)) != "done":
            job_id, key, x = json.loads(line)
            book.confirmed(job_id, key, x)
        await wait_until(lambda: evens <= set(book.runs), 20, "the even jobs done")
        await child.kill()
    assert len(book.submitted) == count, book.summary()
    assert not set(book.runs) - evens, "odd jobs ended before the submitter was gone"
    release.set()
    await book.read_all([await make_client(), await make_client()])
    await app.stop()
    queued, dead = await _leftovers(broker.url, namespace)
    summary = book.assert_sound(dead=dead, queued=queued, events=await tap.drain())
    assert not dead, summary
    assert not queued, summary
    assert all(len(nonces) == 1 for nonces in book.runs.values()), book.runs
