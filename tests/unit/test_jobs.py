"""Jobs end to end on the in-memory broker: the pushed completion, the record in the store, a
redelivered submit, a lost push, a lookup from anywhere and a store that is away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from prometheus_client import REGISTRY
from referencing import Registry, Resource

from service import Model, NotFound, Service, Unavailable
from service._protocol.jobs import JobRecord, JobState, JobStatus
from service._protocol.types import Outgoing
from service._protocol.vocabulary import DIRECT_REPLY_TO, H_JOB_ID, H_KIND, Kind
from service._stores.memory import MemoryJobStore
from service.testing import MemoryLink
from tests.unit.conftest import ServeApp

__all__: list[str] = []

SCHEMA = {
    name: json.loads((Path(__file__).resolve().parents[2] / "schemas" / f"{name}.json").read_text())
    for name in ("job-status", "error")
}


class Num(Model):
    """A number."""

    n: int


class Counter:
    """`count.double`, which says how often it ran and can be held at a gate."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.service = Service("count")

        @self.service.operation()
        async def double(req: Num) -> Num:
            """Twice n; n < 0 is refused."""
            self.runs.append(req.n)
            await self.gate.wait()
            if req.n < 0:
                raise ValueError("negative")
            return Num(n=2 * req.n)


class FlakyFinish(MemoryJobStore):
    """A store whose first `finish` finds it away."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """Unavailable once, then as usual."""
        if self.failures:
            self.failures -= 1
            raise Unavailable("store away")
        return await super().finish(key, record, ttl)


async def test_the_completion_is_pushed_and_recorded(serve_app: ServeApp) -> None:
    """result() is resolved by the pushed completion; the store holds the same result."""
    counter = Counter()
    app, client, _ = await serve_app(counter.service, job_store_url="memory://")
    job = await client.submit("count.double", {"n": 4})
    assert await job.result(timeout=5) == {"n": 8}
    record = await app.jobs.get(client.names.job_key(job.id))
    assert record is not None
    assert (record.state, record.route, record.body) == (
        JobState.COMPLETED,
        "count.double",
        b'{"n":8}',
    )


async def test_a_redelivered_submit_answers_with_the_first_result(serve_app: ServeApp) -> None:
    """The same submit delivered twice runs once; the copy is answered from the store."""
    counter = Counter()
    _, client, broker = await serve_app(counter.service, job_store_url="memory://")
    job = await client.submit("count.double", {"n": 5})
    assert await job.result(timeout=5) == {"n": 10}
    [submit] = [m for m in broker.published if m.link == "client"]
    again = client.job(job.id, "count.double")
    await client.link.publish(
        Outgoing(
            client.names.commands_exchange,
            "count.double",
            submit.body,
            message_id=str(submit.message_id),
            headers=dict(submit.headers),
            persistent=True,
        ),
        kind="command",
        mandatory=True,
    )
    await broker.drain()
    assert counter.runs == [5]
    assert await again.result(timeout=5) == {"n": 10}
    completions = [m for m in broker.published if m.kind == "completion" and m.exchange == ""]
    assert [m.body for m in completions] == [b'{"n":10}', b'{"n":10}']


async def test_a_failed_job_is_read_back_failed(serve_app: ServeApp) -> None:
    """A handler failure is pushed as the error and read back from the service as `failed`."""
    counter = Counter()
    _, client, _ = await serve_app(counter.service, job_store_url="memory://")
    job = await client.submit("count.double", {"n": -1})
    with pytest.raises(Exception, match="handler failed") as pushed:
        await job.result(timeout=5)
    status = await client.job(job.id, "count.double").status()
    assert status.state is JobState.FAILED
    assert status.error is not None
    assert status.error.code == getattr(pushed.value, "code", None)


async def test_a_lost_push_falls_back_to_asking_the_service(serve_app: ServeApp) -> None:
    """When the connection is replaced while a job runs, its result is read from the service."""
    counter = Counter()
    counter.gate.clear()
    _, client, _ = await serve_app(counter.service, job_store_url="memory://")
    job = await client.submit("count.double", {"n": 6})
    waiting = asyncio.ensure_future(job.result(timeout=5))
    await asyncio.sleep(0.05)
    assert isinstance(client.link, MemoryLink)
    await client.link.disconnect()  # the old reply address is gone
    assert len(client.rpc.awaiting) == 0
    counter.gate.set()
    assert await waiting == {"n": 12}


async def test_lookups_know_running_finished_and_unknown_jobs(serve_app: ServeApp) -> None:
    """A `result` call says running, then completed; an unknown id, or another operation's
    route, is NOT_FOUND."""
    counter = Counter()
    counter.gate.clear()
    _, client, _ = await serve_app(counter.service, job_store_url="memory://")
    job = await client.submit("count.double", {"n": 7})
    await asyncio.sleep(0.05)
    assert (await client.job(job.id, "count.double").status()).state is JobState.RUNNING
    counter.gate.set()
    await job.result(timeout=5)
    assert await client.job(job.id, "count.double").status() == JobStatus(
        job.id, JobState.COMPLETED, result={"n": 14}
    )
    with pytest.raises(NotFound):
        await client.job("never-submitted", "count.double").status()
    with pytest.raises(NotFound):
        await client.job("never-submitted", "count.double").result(timeout=0.2)


async def test_a_result_call_without_a_job_id_is_answered_invalid(serve_app: ServeApp) -> None:
    """A `result` call missing x-job-id gets INVALID_ARGUMENT back, not silence."""
    counter = Counter()
    _, client, _ = await serve_app(counter.service, job_store_url="memory://")
    with pytest.raises(Exception, match="x-job-id") as refused:
        await client.rpc.call_raw("count.double", b"{}", headers={H_KIND: Kind.RESULT}, timeout=2)
    assert getattr(refused.value, "code", None) == "INVALID_ARGUMENT"
    assert counter.runs == []


async def test_a_handle_without_route_reads_the_shared_store(
    serve_app: ServeApp, tmp_path: Path
) -> None:
    """client.job(id) with no route reads BURROW_JOB_STORE_URL itself (here a shared file)."""
    counter = Counter()
    url = f"sqlite://{tmp_path}/jobs.sqlite3"
    _, client, _ = await serve_app(counter.service, job_store_url=url)
    job = await client.submit("count.double", {"n": 8})
    await job.result(timeout=5)
    assert await client.job(job.id).result(timeout=1) == {"n": 16}


async def test_a_store_away_at_the_finish_retries_the_job(serve_app: ServeApp) -> None:
    """A result that could not be recorded is not announced: the job is retried, then done."""
    counter = Counter()
    app, client, _ = await serve_app(
        counter.service, job_store_url="memory://", retry_base_delay=0.05
    )
    app.servers[0].jobs = FlakyFinish()
    labels = {"service": "count", "operation": "count.double"}
    before = {
        outcome: REGISTRY.get_sample_value(
            "burrow_messages_handled_total", {**labels, "outcome": outcome}
        )
        or 0.0
        for outcome in ("retried", "ok")
    }
    job = await client.submit("count.double", {"n": 9})
    assert await job.result(timeout=5) == {"n": 18}
    assert counter.runs == [9, 9]
    # Counted (and logged) as what happened: one retry, then one success.
    for outcome in ("retried", "ok"):
        now = REGISTRY.get_sample_value(
            "burrow_messages_handled_total", {**labels, "outcome": outcome}
        )
        assert now == before[outcome] + 1, outcome


async def test_submit_sets_the_reply_address_and_no_queue_is_declared(
    serve_app: ServeApp,
) -> None:
    """A submit carries the job id as correlation id and the client's reply-to; no queue per
    job appears, however many are submitted."""
    counter = Counter()
    _, client, broker = await serve_app(counter.service, job_store_url="memory://")
    before = set(broker.queues)
    jobs = [await client.submit("count.double", {"n": n}) for n in range(20)]
    assert [await job.result(timeout=5) for job in jobs] == [{"n": 2 * n} for n in range(20)]
    assert set(broker.queues) == before
    first = next(m for m in broker.published if m.link == "client")
    assert first.headers[H_JOB_ID] == first.correlation_id == jobs[0].id
    assert first.reply_to is not None
    assert first.reply_to.startswith(DIRECT_REPLY_TO + ".")


async def test_result_call_replies_match_the_published_schema(serve_app: ServeApp) -> None:
    """Running, completed and failed `result` replies validate against schemas/job-status.json."""
    status_schema, error_schema = SCHEMA["job-status"], SCHEMA["error"]
    registry: Registry[Any] = Registry().with_resource(
        error_schema["$id"], Resource.from_contents(error_schema)
    )
    validator = Draft202012Validator(status_schema, registry=registry)
    counter = Counter()
    counter.gate.clear()
    _, client, _ = await serve_app(counter.service, job_store_url="memory://")
    running = await client.submit("count.double", {"n": 1})
    failed = await client.submit("count.double", {"n": -1})

    async def reply(job_id: str) -> Any:
        headers = {H_KIND: Kind.RESULT, H_JOB_ID: job_id}
        return json.loads(await client.rpc.call_raw("count.double", b"{}", headers=headers))

    await asyncio.sleep(0.05)
    bodies = [await reply(running.id)]
    counter.gate.set()
    await running.result(timeout=5)
    with pytest.raises(Exception, match="handler failed"):
        await failed.result(timeout=5)
    bodies += [await reply(running.id), await reply(failed.id)]
    assert [body["state"] for body in bodies] == ["running", "completed", "failed"]
    for body in bodies:
        validator.validate(body)
