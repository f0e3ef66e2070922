"""A real Prometheus scrapes a running App and a gateway in front of it under traffic: every
dashboard query and alert works.

Prometheus is Debian's `prometheus` binary (installed by .ci/run), on a free loopback port with
a temporary config derived from deploy/prometheus/prometheus.yml. The dashboard's main panels
are rendered from the real results into docs/img/dashboard.png (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import pytest
import yaml

from service import App, Client
from service._protocol.errors import InvalidArgument, NotFound, ServiceError
from service.example import calc
from service.gateway._server import Gateway
from service.testing import delete_entities
from tests.brokers import TEST_BROKER
from tests.conftest import AMQP_URL, AppFactory
from tests.contract.test_deploy import (
    DEPLOY,
    ROOT,
    alert_rules,
    dashboard_queries,
    resolve_variables,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

RABBITMQ_PROMETHEUS = TEST_BROKER.metrics_url
IMAGE = ROOT / "docs/img/dashboard.png"
_COMPARISON = re.compile(r"\s*(?:>|<|==|!=|>=|<=)\s*[0-9.e+-]+\s*$")

# The panels drawn into docs/img/dashboard.png: (dashboard title, unit).
MAIN_PANELS = (
    ("Messages handled / s", "msg/s"),
    ("Error ratio", "ratio"),
    ("Handler latency", "s"),
    ("Calls made / s by outcome", "calls/s"),
    ("In flight", "messages"),
    ("Dead letters / s", "msg/s"),
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _rabbitmq_plugin_answers() -> bool:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session,
            session.get(RABBITMQ_PROMETHEUS) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class Prometheus:
    """A Prometheus process and a client for its HTTP API."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; return `data`, failing the test on an API error."""
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now."""
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scrapes(self) -> int:
        """How many times Burrow was scraped so far."""
        result = await self.query('count_over_time(up{job="burrow"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    async def next_scrape(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until Prometheus has scraped Burrow once more."""
        seen = await self.scrapes()
        async with asyncio.timeout(timeout):
            while True:
                if await self.scrapes() > seen:
                    return
                await asyncio.sleep(0.1)


def _config(app_port: int, gateway_port: int, rabbitmq: bool, rules: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at this test's App, gateway (and local
    RabbitMQ)."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "burrow":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{app_port}"]}]
        elif job["job_name"] == "gateway":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{gateway_port}"]}]
        elif rabbitmq:
            job["static_configs"] = [{"targets": [urlsplit(RABBITMQ_PROMETHEUS).netloc]}]
        else:
            continue
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@contextlib.asynccontextmanager
async def run_prometheus(
    tmp_path: Path, app: App, gateway: Gateway, rabbitmq: bool
) -> AsyncIterator[Prometheus]:
    """Start Prometheus scraping `app` and `gateway` every second; stop it on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; .ci/run installs it)")
    assert app.http is not None
    assert gateway.app.http is not None
    rules = tmp_path / "alerts.yml"
    shutil.copy(DEPLOY / "prometheus/alerts.yml", rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(_config(app.http.port, gateway.app.http.port, rabbitmq, rules))
    )
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with asyncio.timeout(20):
                while True:
                    assert process.returncode is None, (tmp_path / "prometheus.log").read_text()
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{url}/-/ready") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.1)
            yield Prometheus(url, session)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def _traffic(
    client: Client, channel: aio_pika.abc.AbstractChannel, namespace: str, round_: int
) -> None:
    """One round: adds, a slow call, an error, an unknown operation, a dead letter."""
    await asyncio.gather(
        *(client.call("calc.add", {"a": i, "b": round_}) for i in range(5 + round_))
    )
    await client.call("calc.slow_square", {"x": 3, "delay_ms": 20 * round_})
    with pytest.raises(InvalidArgument):
        await client.call("calc.divide", {"a": 1, "b": 0})
    with pytest.raises(NotFound):
        await client.call("calc.nope", {})
    with pytest.raises(ServiceError):
        await client.call("nosuch.op", {})
    exchange = await channel.get_exchange(f"{namespace}.rpc", ensure=False)
    # A call without reply_to: nobody can be answered, so it is dead-lettered.
    await exchange.publish(
        aio_pika.Message(b'{"a": 1, "b": 1}', type="calc.add", headers={"x-burrow-kind": "call"}),
        routing_key="calc.add",
    )


async def _http_traffic(http: aiohttp.ClientSession, base: str, round_: int) -> None:
    """One round through the gateway: adds, a refused body, a deadline (504) and a job."""
    for i in range(3 + round_):
        async with http.post(f"{base}/v1/calc/add", json={"a": i, "b": round_}) as ok:
            assert ok.status == 200
    async with http.post(f"{base}/v1/calc/add", json={"a": "x"}) as invalid:
        assert invalid.status == 422
    slow = {"Prefer": "wait=0.05"}
    body = {"x": 2, "delay_ms": 300}
    async with http.post(f"{base}/v1/calc/slow_square", json=body, headers=slow) as late:
        assert late.status == 504
    accept = {"Prefer": "respond-async"}
    async with http.post(f"{base}/v1/calc/slow_square", json=body, headers=accept) as job:
        assert job.status == 202


def _is_rabbitmq(expr: str) -> bool:
    return "rabbitmq_" in expr


def _instant(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m")


async def test_dashboard_and_alerts_evaluate_on_real_prometheus(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Every dashboard query and alert expression returns series from a real Prometheus."""
    app = await start_app(calc)
    rabbitmq = await _rabbitmq_plugin_answers()
    gateway = Gateway(
        calc,
        settings=app.settings.model_copy(
            update={"gateway_port": 0, "gateway_host": "127.0.0.1", "gateway_auth": "none"}
        ),
    )
    await gateway.start()
    try:
        await gateway.wait_ready(10)
        async with aiohttp.ClientSession() as http:
            await _evaluate(
                app,
                gateway,
                http,
                client=client,
                amqp_channel=amqp_channel,
                namespace=namespace,
                tmp_path=tmp_path,
                rabbitmq=rabbitmq,
            )
    finally:
        await gateway.stop()
        gateway_only = [q.name for q in gateway.app.topology.queues if ".gateway." in q.name]
        await delete_entities(gateway_only, [], AMQP_URL)


async def _evaluate(
    app: App,
    gateway: Gateway,
    http: aiohttp.ClientSession,
    *,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    tmp_path: Path,
    rabbitmq: bool,
) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    async with run_prometheus(tmp_path, app, gateway, rabbitmq) as prometheus:
        await prometheus.next_scrape(15)
        started = time.time()
        slow: list[asyncio.Future[Any]] = []
        for round_ in range(6):
            if round_ in (2, 3):  # work in flight across a scrape, for the in-flight panel
                slow.append(
                    asyncio.ensure_future(
                        client.call("calc.slow_square", {"x": round_, "delay_ms": 1500})
                    )
                )
            await _traffic(client, amqp_channel, namespace, round_)
            await _http_traffic(http, base, round_)
            await prometheus.next_scrape()
        assert [reply["square"] for reply in await asyncio.gather(*slow)] == [4, 9]
        await prometheus.next_scrape()
        ended = time.time()

        targets = await prometheus.api("targets")
        health = {t["labels"]["job"]: t["health"] for t in targets["activeTargets"]}
        assert health["burrow"] == health["gateway"] == "up"

        skipped: list[str] = []
        for expr in dashboard_queries():
            if _is_rabbitmq(expr) and not rabbitmq:
                skipped.append(expr)  # needs the broker's rabbitmq_prometheus plugin
                continue
            assert await prometheus.query(_instant(expr)), f"no series for {expr}"

        for rule in alert_rules():
            expr = rule["expr"]
            if _is_rabbitmq(expr) and not rabbitmq:
                skipped.append(expr)
                continue
            await prometheus.query(expr)  # the full rule evaluates
            signal = _COMPARISON.sub("", expr)
            assert signal != expr, f"{rule['alert']}: expected `<signal> <op> <threshold>`"
            assert await prometheus.query(signal), f"{rule['alert']}: no series for {signal}"
        # The traffic had errors above 5% and dead letters: those alerts' conditions hold.
        firing = {rule["alert"]: rule["expr"] for rule in alert_rules()}
        for name in ("BurrowHighErrorRatio", "BurrowDeadLettersGrowing"):
            assert await prometheus.query(firing[name]), f"{name} should hold after the traffic"

        rules = await prometheus.api("rules")
        evaluated = [rule for group in rules["groups"] for rule in group["rules"]]
        assert len(evaluated) == len(alert_rules())
        assert all(rule["health"] != "err" for rule in evaluated), evaluated
        if not rabbitmq:
            assert skipped, "queries over rabbitmq_* metrics are listed as needing the plugin"

        await _render(prometheus, started - 2, ended)
    assert IMAGE.stat().st_size > 10_000


def _legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend format, filled in."""
    return re.sub(r"\{\{(\w+)\}\}", lambda match: labels.get(match.group(1), ""), template)


async def _render(prometheus: Prometheus, start: float, end: float) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dashboard = json.loads((DEPLOY / "grafana/dashboards/burrow.json").read_text())
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    figure, axes = plt.subplots(3, 2, figsize=(12, 10), constrained_layout=True)
    for ax, (title, unit) in zip(axes.flat, MAIN_PANELS, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            data = await prometheus.api(
                "query_range",
                query=resolve_variables(target["expr"]).replace("$__rate_interval", "3s"),
                start=f"{start:.3f}",
                end=f"{end:.3f}",
                step="1",
            )
            assert data["result"], f"{title}: no series for {target['expr']}"
            for series in data["result"]:
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                if not any(v and not math.isnan(v) for v in values) and len(data["result"]) > 1:
                    continue  # flat zeros or NaN (other label sets) only clutter the legend
                label = _legend(target["legendFormat"], series["metric"])
                ax.plot(times, values, label=label or title)
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    figure.suptitle("Burrow dashboard — main panels, from a real Prometheus under test traffic")
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(IMAGE, dpi=80)
    plt.close(figure)
