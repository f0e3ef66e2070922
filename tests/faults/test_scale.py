"""Fault G1 of RELIABILITY.md: several Burrow processes on one queue share the work.

Two Apps consume the same queues; one of them loses its connection mid-stream (through the proxy).
"""

from __future__ import annotations

import pytest

from service._protocol.vocabulary import Names
from tests.faults.conftest import MakeLink, RunApp
from tests.faults.harness import (
    FaultProxy,
    Hook,
    Ledger,
    PrivateBroker,
    cast,
    publish_until_confirmed,
    wait_until,
    work_service,
)

__all__: list[str] = []


@pytest.mark.slow
async def test_g1_two_apps_share_one_queue(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    proxy: FaultProxy,
    run_app: RunApp,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
) -> None:
    """G1: two Apps on one queue both get work and process each message once; when one loses
    its connection, only what it held in flight is processed again (by redelivery)."""
    names = Names(namespace)
    started_on: dict[str, set[str]] = {"a": set(), "b": set()}
    done_on: dict[str, set[str]] = {"a": set(), "b": set()}

    def instance(name: str) -> tuple[Hook, Hook]:
        async def began(key: str) -> None:
            started_on[name].add(key)

        async def finished(key: str) -> None:
            done_on[name].add(key)

        return began, finished

    began_a, finished_a = instance("a")
    began_b, finished_b = instance("b")
    app_a = await run_app(
        work_service(ledger, before=began_a, after=finished_a),
        url=broker.url_for("guest", "guest", proxy.port),
        prefetch=3,
    )
    await run_app(
        work_service(ledger, before=began_b, after=finished_b),
        prefetch=3,
    )
    producer = await make_link()
    first = [f"g1-{i}" for i in range(60)]
    for key in first:
        await publish_until_confirmed(
            producer, ledger, cast(namespace, key, delay_ms=20), give_up_after=10
        )
    await ledger.wait_processed(first, 30)
    assert done_on["a"], "instance a got no work"
    assert done_on["b"], "instance b got no work"
    assert not ledger.duplicates(), "a message was processed twice without a crash"

    second = [f"g1-late-{i}" for i in range(40)]
    for key in second:
        await publish_until_confirmed(
            producer, ledger, cast(namespace, key, delay_ms=150), give_up_after=10
        )
    await wait_until(lambda: len(started_on["a"] - done_on["a"]) >= 2, 20, "a busy")
    # Everything a received may come back (it may have done the work but not acked it yet).
    received_by_a = set(started_on["a"])
    assert proxy.reset_all() == 2  # instance a crashes: its connections die
    await ledger.wait_processed(second, 60)
    await app_a.wait_ready(30)
    repeated = set(ledger.duplicates())
    assert repeated <= received_by_a, f"processed twice without a crash to explain it: {repeated}"
    await ledger.drain(
        broker.url,
        [names.request_queue("work"), names.commands_queue("work")],
        [names.dead_letter_queue("work")],
    )
    ledger.assert_sound()
