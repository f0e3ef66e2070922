"""The orchestrator: starts each tool's processes, alternates tools, gathers and reports.

Each server or consumer runs in its own process and each client or producer in another; tools
take turns within every repetition (the order rotates), so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    AMQP_URL,
    FULL,
    QUICK,
    REDIS_URL,
    Sizes,
    broker_pid,
    median,
    proc_cpu_seconds,
)
from tests.brokers import Broker

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RPC_TOOLS = [
    "burrow",
    "aio-pika-raw",
    "aio-pika-raw-confirmed",
    "aio-pika-patterns",
    "faststream",
    "burrow-quorum",
]
EVENT_TOOLS = [
    "burrow",
    "aio-pika-raw",
    "aio-pika-raw-confirmed",
    "faststream",
    "burrow-link",
    "burrow-quorum",
]
SUBMIT_TOOLS = ["burrow", "celery-rpc", "celery-redis"]
# W7: HTTP -> AMQP -> reply. Burrow's row is `burrow gateway`; the peer is FastAPI on uvicorn
# calling Burrow's Client by hand (bench/http_peer.py). Both call the same `calc` App.
HTTP_TOOLS = ["burrow-gateway", "fastapi-client"]
# W8: events through the transactional outbox (bench/tools/outbox_tool.py) against direct
# `Client.emit`, same payload and subscriber; read as outbox over emit. burrow-dual-write
# (full runs only) is a diagnostic: the same transaction without the outbox row, then emit.
OUTBOX_TOOLS = ["burrow-outbox", "burrow-emit", "burrow-dual-write"]
# The row Burrow is read from, per workload (default "burrow").
BURROW_ROW = {"W7": "burrow-gateway", "W8": "burrow-outbox"}
# Every row Burrow is divided by, in table order; burrow-quorum and burrow-link are Burrow
# itself (quorum queues; the transport alone) and show what HA costs and what the API adds.
PEERS = [
    "aio-pika-raw",
    "aio-pika-raw-confirmed",
    "aio-pika-patterns",
    "faststream",
    "burrow-quorum",
    "burrow-link",
    "celery-rpc",
    "celery-redis",
    "fastapi-client",
]
SHORT = {
    "burrow": "bw",
    "burrow-quorum": "bq",
    "burrow-link": "bl",
    "aio-pika-raw": "raw",
    "aio-pika-raw-confirmed": "rawc",
    "aio-pika-patterns": "pat",
    "faststream": "fs",
    "aiormq-loop": "mq",
    "celery-rpc": "crpc",
    "celery-redis": "credis",
    "burrow-gateway": "gw",
    "fastapi-client": "fapi",
    "burrow-outbox": "bo",
    "burrow-emit": "be",
    "burrow-dual-write": "bd",
}
# W5: CPU seconds per 10,000 W2 calls, per process (client, server, broker) and their sum.
CPU_METRICS = (
    "client_cpu_s_per_10k",
    "server_cpu_s_per_10k",
    "broker_cpu_s_per_10k",
    "total_cpu_s_per_10k",
)
# W7: CPU seconds per 10,000 HTTP requests: the HTTP process (gateway or uvicorn), the `calc`
# App behind it, the load generator and the broker.
W7_CPU_METRICS = (
    "server_cpu_s_per_10k",
    "service_cpu_s_per_10k",
    "client_cpu_s_per_10k",
    "broker_cpu_s_per_10k",
)
LOWER_IS_BETTER = {"p50_us", "p99_us", *CPU_METRICS, *W7_CPU_METRICS}
W4_WORKERS = (1, 2, 4)
JAVA_CP = ["/usr/share/java/amqp-client.jar", "/usr/share/java/slf4j-api.jar"]
JAVA_NOP = "/usr/share/java/slf4j-nop.jar"


class BenchError(RuntimeError):
    """A benchmark process failed or timed out."""


class Proc:
    """A worker process speaking the READY/RESULT line protocol."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._stderr = open(log, "ab")  # noqa: SIM115 - closed in `close`
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self._selector = selectors.DefaultSelector()
        assert self.popen.stdout is not None
        self._selector.register(self.popen.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def expect(self, prefix: str, timeout: float) -> str:
        """Wait for a stdout line starting with `prefix`; return the rest of it."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no {prefix} within {timeout:.0f}s (see {self.log})")
            if not self._selector.select(remaining):
                continue
            line = self.popen.stdout.readline().decode()
            if not line:
                self.popen.wait(5)
                raise BenchError(
                    f"process exited {self.popen.returncode} before {prefix} (see {self.log})"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def result(self, timeout: float) -> dict[str, Any]:
        """The RESULT payload."""
        data: dict[str, Any] = orjson.loads(self.expect("RESULT", timeout))
        return data

    def close(self, timeout: float = 15) -> None:
        """Ask the process to stop (SIGTERM), then kill it if it lingers."""
        _stop(self.popen, timeout)
        self._selector.close()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._stderr.close()


class HttpServer:
    """An HTTP server process (W7) with stdout and stderr in its log, ready once it answers."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in `close`
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def wait_ready(self, url: str, timeout: float) -> None:
        """Poll `POST url` with `{"a": 1, "b": 2}` until it answers 200."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise BenchError(f"exited {self.popen.returncode} before ready (see {self.log})")
            request = urllib.request.Request(
                url, data=b'{"a": 1, "b": 2}', headers={"content-type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    if answer.status == 200:
                        return
                    last = f"HTTP {answer.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise BenchError(f"{url} not ready within {timeout:.0f}s: {last} (see {self.log})")

    def close(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        _stop(self.popen, timeout)
        self._out.close()


@dataclass
class Bench:
    """One run of the suite: its sizes, namespace prefix and the samples gathered."""

    sizes: Sizes
    loop: str
    timeout: float
    prefix: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:6]}")
    samples: dict[tuple[str, str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    errors: list[str] = field(default_factory=list)
    logs: Path = RESULTS / "logs"

    def ns(self, tool: str) -> str:
        """The namespace a tool's entities live in for this run."""
        return f"{self.prefix}-{SHORT[tool]}"

    def spawn(self, tool: str, role: str, log_as: str | None = None, **args: Any) -> Proc:
        """Start a worker process (its stderr in `<log_as or tool>-<role>.log`)."""
        queue_type = "quorum" if tool == "burrow-quorum" else "classic"
        payload = {
            "ns": self.ns(tool),
            "tool": tool,
            "queue_type": queue_type,
            "loop": self.loop,
            **args,
        }
        argv = [
            sys.executable,
            "-m",
            "bench.worker",
            tool,
            role,
            orjson.dumps(payload).decode(),
        ]
        return Proc(argv, self.logs / f"{log_as or tool}-{role}.log")

    def add(self, workload: str, tool: str, metric: str, value: float) -> None:
        """Record one repetition's value."""
        self.samples[workload, tool, metric].append(value)

    # -- workloads ---------------------------------------------------------------------------

    def rpc_round(self, tool: str) -> None:
        """W1 then W2 (with W5's CPU readings) against one fresh server process.

        W5: the client measures its own CPU over the measured calls (`time.process_time`);
        the server's and the broker's (`beam.smp`) are read from /proc/<pid>/stat from the
        client's READY to its RESULT. The broker is shared with whatever else runs on it.
        """
        s = self.sizes
        server = self.spawn(tool, "serve", prefetch=s.w2_inflight)
        try:
            server.expect("READY", self.timeout)
            w1 = self.spawn(tool, "w1", warmup=s.w1_warmup, calls=s.w1_calls)
            try:
                r1 = w1.result(self.timeout)
            finally:
                w1.close()
            for metric in ("calls_per_s", "p50_us", "p99_us"):
                self.add("W1", tool, metric, r1[metric])
            w2 = self.spawn(tool, "w2", warmup=s.w2_inflight, calls=s.w2_calls,
                            inflight=s.w2_inflight)  # fmt: skip
            beam = broker_pid()
            try:
                w2.expect("READY", self.timeout)
                cpu0 = proc_cpu_seconds(server.pid)
                b0 = proc_cpu_seconds(beam) if beam else 0.0
                r2 = w2.result(self.timeout)
                cpu1 = proc_cpu_seconds(server.pid)
                b1 = proc_cpu_seconds(beam) if beam else 0.0
            finally:
                w2.close()
            for metric in ("calls_per_s", "p50_us", "p99_us"):
                self.add("W2", tool, metric, r2[metric])
            per_10k = 10_000 / r2["calls"]
            cpu = {"client": r2["cpu_s"] * per_10k, "server": (cpu1 - cpu0) * per_10k}
            if beam:
                cpu["broker"] = (b1 - b0) * per_10k
            for who, seconds in cpu.items():
                self.add("W5", tool, f"{who}_cpu_s_per_10k", seconds)
            if beam:
                self.add("W5", tool, "total_cpu_s_per_10k", sum(cpu.values()))
        finally:
            server.close()

    def event_round(self, tool: str) -> None:
        """W3: a consumer process, then a producer process; first publish to last consumed.

        The producer keeps `w3_window` confirms in flight (the LIMIT loop `limit_window`).
        """
        s = self.sizes
        window = s.limit_window if tool == "aiormq-loop" else s.w3_window
        consumer = self.spawn(tool, "consume", prefetch=s.w3_prefetch, events=s.w3_events)
        try:
            consumer.expect("READY", self.timeout)
            producer = self.spawn(tool, "produce", events=s.w3_events, window=window)
            try:
                produced = producer.result(self.timeout)
            finally:
                producer.close()
            consumed = consumer.result(self.timeout)
        finally:
            consumer.close()
        workload = "LIMIT" if tool == "aiormq-loop" else "W3"
        elapsed = consumed["last"] - produced["first"]
        self.add(workload, tool, "events_per_s", s.w3_events / elapsed)
        self.add(workload, tool, "publish_per_s", produced["publish_per_s"])

    def submit_round(self, tool: str) -> None:
        """W6: a server/worker process, then a client submitting jobs and awaiting results.

        What the tool declared (Burrow's job result queues, Celery's queues and Redis keys) is
        deleted right after the round, so the broker does not carry it into later workloads.
        """
        s = self.sizes
        server = self.spawn(tool, "serve", prefetch=s.w2_inflight)
        try:
            server.expect("READY", self.timeout)
            # Celery's blocking client: 64 threads (the faster way, the default) or one thread.
            mode = os.environ.get("BENCH_CELERY_CLIENT", "threads")
            client = self.spawn(tool, "w6", jobs=s.w6_jobs, window=s.w6_window,
                                warmup=s.w6_window, mode=mode)  # fmt: skip
            try:
                result = client.result(self.timeout)
            finally:
                client.close()
        finally:
            server.close()
            self.cleanup(self.ns(tool))
        self.add("W6", tool, "submits_per_s", result["submits_per_s"])
        self.add("W6", tool, "jobs_per_s", result["jobs_per_s"])

    def http_round(self, tool: str) -> None:
        """W7: the `calc` App, an HTTP process in front of it, then the HTTP load generator.

        CPU per 10,000 requests is read from /proc/<pid>/stat (the HTTP process with any child
        it starts, the App, the broker) from the load generator's READY to its RESULT; the load
        generator measures its own. Everything the round declared is deleted after it.
        """
        s = self.sizes
        ns = self.ns(tool)
        service = self.spawn("burrow", "serve", log_as=tool, prefetch=s.w2_inflight, ns=ns)
        http: HttpServer | None = None
        try:
            service.expect("READY", self.timeout)
            port = _free_port()
            http = self.http_server(tool, ns, port)
            url = f"http://127.0.0.1:{port}/v1/calc/add"
            http.wait_ready(url, self.timeout)
            load_args = {
                "url": url,
                "requests": s.w7_requests,
                "warmup": s.w7_warmup,
                "concurrency": s.w7_concurrency,
                "loop": self.loop,
            }
            load = Proc(
                [sys.executable, "-m", "bench.http_load", orjson.dumps(load_args).decode()],
                self.logs / f"{tool}-load.log",
            )
            beam = broker_pid()
            try:
                load.expect("READY", self.timeout)
                h0, s0 = _tree_cpu_seconds(http.pid), proc_cpu_seconds(service.pid)
                b0 = proc_cpu_seconds(beam) if beam else 0.0
                result = load.result(self.timeout)
                h1, s1 = _tree_cpu_seconds(http.pid), proc_cpu_seconds(service.pid)
                b1 = proc_cpu_seconds(beam) if beam else 0.0
            finally:
                load.close()
        finally:
            if http is not None:
                http.close()
            service.close()
            self.cleanup(ns)
        if set(result["statuses"]) != {"200"} or set(result["warmup_statuses"]) != {"200"}:
            raise BenchError(
                f"non-200 answers: measured {result['statuses']}, warm-up "
                f"{result['warmup_statuses']}; e.g. {result['bad_samples']}"
            )
        for metric in ("calls_per_s", "p50_us", "p99_us"):
            self.add("W7", tool, metric, result[metric])
        per_10k = 10_000 / result["requests"]
        self.add("W7", tool, "server_cpu_s_per_10k", (h1 - h0) * per_10k)
        self.add("W7", tool, "service_cpu_s_per_10k", (s1 - s0) * per_10k)
        self.add("W7", tool, "client_cpu_s_per_10k", result["cpu_s"] * per_10k)
        if beam:
            self.add("W7", tool, "broker_cpu_s_per_10k", (b1 - b0) * per_10k)

    def http_server(self, tool: str, ns: str, port: int) -> HttpServer:
        """Start W7's HTTP process: `burrow gateway` or the FastAPI peer, on 127.0.0.1:port."""
        log = self.logs / f"{tool}-http.log"
        if tool == "fastapi-client":
            argv = [sys.executable, "-m", "bench.http_peer", str(port), ns, self.loop]
            return HttpServer(argv, log, {})
        env = {
            "BURROW_AMQP_URL": AMQP_URL,
            "BURROW_NAMESPACE": ns,
            "BURROW_QUEUE_TYPE": "classic",
            "BURROW_LOG_LEVEL": "warning",
            "BURROW_HTTP_HOST": "127.0.0.1",
            "BURROW_HTTP_PORT": str(_free_port()),
            "BURROW_GATEWAY_HOST": "127.0.0.1",
            "BURROW_GATEWAY_PORT": str(port),
            "BURROW_GATEWAY_AUTH": "none",
        }
        argv = [sys.executable, "-m", "service.cli", "gateway", "service.example:calc"]
        return HttpServer(argv, log, env)

    def outbox_round(self, tool: str) -> None:
        """W8: the subscriber, then the producer, twice: saturated (`w8_events` as fast as the
        row goes: events/s from the first commit or publish to the last consumed, and the p50
        and p99 of each event's producer stamp to its handler), then paced (`w8_paced_events`
        at `w8_rate`/s: `paced_p50_us`, the latency of a pipeline that keeps up).

        Rows: `burrow-outbox` (transactions through the outbox, the relay in the producer's
        process), `burrow-emit` (`Client.emit`), `burrow-dual-write` (the transaction without
        the outbox row, then `Client.emit`). The PostgreSQL schema is made afresh before each
        run and dropped after the round; what the round declared on the broker is deleted.
        """
        from bench.tools import outbox_tool  # noqa: PLC0415 - needs asyncpg: W8 only

        s = self.sizes
        ns = self.ns(tool)
        database = tool != "burrow-emit"
        role = {"burrow-outbox": "outbox", "burrow-emit": "emit"}.get(tool, "dual")
        window = s.w3_window if tool == "burrow-emit" else s.w8_window
        rate_metric = "publish_per_s" if tool == "burrow-emit" else "commit_per_s"
        try:
            phases = []
            for events, rate in ((s.w8_events, 0.0), (s.w8_paced_events, s.w8_rate)):
                if database:  # afresh: the same order ids again
                    asyncio.run(outbox_tool.prepare(ns))
                phases.append(self._outbox_phase(tool, role, events, window, rate=rate))
        finally:
            if database:
                asyncio.run(outbox_tool.drop(ns))
            self.cleanup(ns)
        (produced, consumed), (_, paced) = phases
        elapsed = consumed["last"] - produced["first"]
        self.add("W8", tool, "events_per_s", s.w8_events / elapsed)
        self.add("W8", tool, "p50_us", consumed["p50_us"])
        self.add("W8", tool, "p99_us", consumed["p99_us"])
        self.add("W8", tool, rate_metric, produced[rate_metric])
        self.add("W8", tool, "paced_p50_us", paced["p50_us"])

    def _outbox_phase(
        self, tool: str, role: str, events: int, window: int, *, rate: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One W8 run: (the producer's RESULT, the subscriber's RESULT)."""
        consumer = self._outbox_proc(
            tool, "consume", events=events, prefetch=self.sizes.w3_prefetch
        )
        try:
            consumer.expect("READY", self.timeout)
            producer = self._outbox_proc(tool, role, events=events, window=window, rate=rate)
            try:
                produced = producer.result(self.timeout)
                consumed = consumer.result(self.timeout)
            finally:
                producer.close()
        finally:
            consumer.close()
        return produced, consumed

    def _outbox_proc(self, tool: str, role: str, **args: Any) -> Proc:
        """A W8 process (`bench.tools.outbox_tool`), its stderr in `<tool>-<role>.log`."""
        payload = orjson.dumps({"ns": self.ns(tool), "loop": self.loop, **args}).decode()
        argv = [sys.executable, "-m", "bench.tools.outbox_tool", role, payload]
        return Proc(argv, self.logs / f"{tool}-{role}.log")

    def scale_round(self, workers: int) -> None:
        """W4: W2 against `workers` Burrow server processes; broker CPU alongside."""
        s = self.sizes
        tool = "burrow"
        servers = [self.spawn(tool, "serve", prefetch=s.w2_inflight) for _ in range(workers)]
        try:
            for server in servers:
                server.expect("READY", self.timeout)
            client = self.spawn(tool, "w2", warmup=s.w2_inflight, calls=s.w2_calls,
                                inflight=s.w2_inflight)  # fmt: skip
            beam = broker_pid()
            try:
                client.expect("READY", self.timeout)
                t0 = time.perf_counter()
                b0 = proc_cpu_seconds(beam) if beam else 0.0
                c0 = sum(proc_cpu_seconds(p.pid) for p in servers)
                result = client.result(self.timeout)
                wall = time.perf_counter() - t0
                b1 = proc_cpu_seconds(beam) if beam else 0.0
                c1 = sum(proc_cpu_seconds(p.pid) for p in servers)
            finally:
                client.close()
        finally:
            for server in servers:
                server.close()
        name = f"burrow-workers-{workers}"
        self.add("W4", name, "calls_per_s", result["calls_per_s"])
        self.add("W4", name, "p99_us", result["p99_us"])
        if beam:
            self.add("W4", name, "broker_cpu_cores", (b1 - b0) / wall)
        self.add("W4", name, "server_cpu_cores", (c1 - c0) / wall)

    def java_limit(self) -> None:
        """The broker's own limit with the official Java client (Debian's package)."""
        if not shutil.which("javac") or not Path(JAVA_CP[0]).exists():
            raise BenchError("javac or librabbitmq-client-java missing: `make bench` installs them")
        with tempfile.TemporaryDirectory() as build:
            subprocess.run(
                ["javac", "-d", build, "-cp", JAVA_CP[0], str(ROOT / "bench/limit/PerfLoop.java")],
                check=True,
                timeout=120,
            )
            classpath = ":".join([build, *JAVA_CP, JAVA_NOP])
            uri = AMQP_URL.rstrip("/") + "/%2F"
            out = subprocess.run(
                [
                    *("java", "-cp", classpath, "PerfLoop", uri),
                    *(f"{self.prefix}-java", str(self.sizes.limit_messages)),
                ],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=True,
            ).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
        data = orjson.loads(line[len("RESULT") :])
        self.add("LIMIT", "java-amqp-client", "events_per_s", data["events_per_s"])
        self.add("LIMIT", "java-amqp-client", "publish_per_s", data["publish_per_s"])

    # -- driving -----------------------------------------------------------------------------

    def attempt(self, what: str, fn: Any, *args: Any) -> None:
        """Run one step; an error is recorded and the run goes on."""
        started = time.perf_counter()
        try:
            fn(*args)
        except Exception as exc:
            self.errors.append(f"{what}: {exc}")
            traceback.print_exc(file=sys.stderr)
            print(f"  {what}: FAILED ({exc})", flush=True)
            return
        print(f"  {what}: {time.perf_counter() - started:.1f}s", flush=True)

    def run(self, only: set[str] | None, extras: bool) -> None:
        """Every workload, tools alternating within each repetition.

        Args:
            extras: also run the `burrow-quorum` and `burrow-dual-write` rows (left out of the
                quick smoke run).
        """
        want = only or {"W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "LIMIT"}
        rpc_tools = RPC_TOOLS if extras else [t for t in RPC_TOOLS if t != "burrow-quorum"]
        event_tools = EVENT_TOOLS if extras else [t for t in EVENT_TOOLS if t != "burrow-quorum"]
        outbox_tools = OUTBOX_TOOLS if extras else [t for t in OUTBOX_TOOLS if "dual" not in t]
        # (label, tools alternating, round) per workload group, in run order.
        groups: list[tuple[str, list[Any], Any]] = []
        if want & {"W1", "W2", "W5"}:
            groups.append(("W1+W2+W5", rpc_tools, self.rpc_round))
        if "W3" in want:
            groups.append(("W3", event_tools, self.event_round))
        if "W6" in want:
            groups.append(("W6", SUBMIT_TOOLS, self.submit_round))
        if "W7" in want:
            groups.append(("W7", HTTP_TOOLS, self.http_round))
        if "W8" in want:
            groups.append(("W8", outbox_tools, self.outbox_round))
        for rep in range(self.sizes.reps):
            print(f"repetition {rep + 1}/{self.sizes.reps}", flush=True)
            for label, tools, round_ in groups:
                for tool in _rotate(tools, rep):
                    self.attempt(f"{label} {tool}", round_, tool)
            if "W4" in want:
                for workers in _rotate(list(W4_WORKERS), rep):
                    self.attempt(f"W4 {workers} worker(s)", self.scale_round, workers)
            if "LIMIT" in want:
                self.attempt("LIMIT java", self.java_limit)
                self.attempt("LIMIT aiormq", self.event_round, "aiormq-loop")

    # -- reporting ---------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The documented results document."""
        results: list[dict[str, Any]] = [
            {
                "workload": workload,
                "tool": tool,
                "metric": metric,
                "median": round(median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
                "reps": len(values),
            }
            for (workload, tool, metric), values in self.samples.items()
        ]
        results += _added_latency(self.samples)
        results.sort(key=lambda r: (r["workload"], r["metric"], _tool_rank(r["tool"])))
        by_key: dict[tuple[str, str, str], float] = {
            (r["workload"], r["tool"], r["metric"]): r["median"] for r in results
        }
        ratios: list[dict[str, Any]] = []
        for (workload, tool, metric), value in by_key.items():
            if workload not in {"W1", "W2", "W3", "W5", "W6", "W7"}:  # W8: _outbox_ratios
                continue
            if tool != BURROW_ROW.get(workload, "burrow"):
                continue
            for peer in PEERS:
                other = by_key.get((workload, peer, metric))
                if other is None or other == 0 or value == 0:
                    continue
                ratio = other / value if metric in LOWER_IS_BETTER else value / other
                ratios.append(
                    {
                        "workload": workload,
                        "metric": metric,
                        "peer": peer,
                        "burrow_over_peer": round(ratio, 3),
                    }
                )
        ratios += _outbox_ratios(by_key)
        one = by_key.get(("W4", "burrow-workers-1", "calls_per_s"))
        for workers in (2, 4):
            many = by_key.get(("W4", f"burrow-workers-{workers}", "calls_per_s"))
            if one and many:
                ratios.append(
                    {
                        "workload": f"W4-{workers}w",
                        "metric": "calls_per_s",
                        "peer": "burrow-workers-1",
                        "burrow_over_peer": round(many / one, 3),
                    }
                )
        return {
            "machine": _machine(),
            "rabbitmq": _rabbitmq_version(),
            "python": platform.python_version(),
            "results": results,
            "ratios": ratios,
        }

    def cleanup(self, prefix: str | None = None) -> None:
        """Delete every queue, exchange and Redis key this run (or one tool) declared, and at
        the end of the run W8's PostgreSQL schemas.

        Every name holds the run's random prefix (Celery's control reply exchange puts
        `reply.` before it).
        """
        asyncio.run(_delete_prefixed(prefix or self.prefix))
        _delete_redis_keys(prefix or self.prefix)
        if prefix is None:
            _drop_outbox_schemas(self.prefix)


def _outbox_ratios(by_key: dict[tuple[str, str, str], float]) -> list[dict[str, Any]]:
    """W8: the outbox row over direct emit (events/s: outbox's over emit's, the target's
    definition, >= 0.5; latency: emit's over outbox's, so above 1 still means the outbox is
    better) and over the dual write (events/s only: what the outbox itself costs)."""
    found: list[dict[str, Any]] = []
    for peer, metrics in (
        ("burrow-emit", ("events_per_s", "p50_us", "p99_us", "paced_p50_us")),
        ("burrow-dual-write", ("events_per_s",)),
    ):
        for metric in metrics:
            mine = by_key.get(("W8", "burrow-outbox", metric))
            theirs = by_key.get(("W8", peer, metric))
            if not mine or not theirs:
                continue
            lower = metric in LOWER_IS_BETTER or metric == "paced_p50_us"
            ratio = theirs / mine if lower else mine / theirs
            found.append(
                {"workload": "W8", "metric": metric, "peer": peer,
                 "burrow_over_peer": round(ratio, 3)}
            )  # fmt: skip
    return found


def _added_latency(samples: dict[tuple[str, str, str], list[float]]) -> list[dict[str, Any]]:
    """W8 result rows `added_p50_us` and `added_paced_p50_us`: the outbox row's p50 minus
    direct emit's, per repetition (the rows alternate within each one)."""
    rows: list[dict[str, Any]] = []
    for metric in ("p50_us", "paced_p50_us"):
        mine = samples.get(("W8", "burrow-outbox", metric), [])
        theirs = samples.get(("W8", "burrow-emit", metric), [])
        if not mine or len(mine) != len(theirs):
            continue
        added = [a - b for a, b in zip(mine, theirs, strict=True)]
        rows.append(
            {"workload": "W8", "tool": "burrow-outbox", "metric": f"added_{metric}",
             "median": round(median(added), 3), "min": round(min(added), 3),
             "max": round(max(added), 3), "reps": len(added)}
        )  # fmt: skip
    return rows


def _stop(popen: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL when the process has not exited within `timeout` seconds."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


def _rotate(items: list[Any], rep: int) -> list[Any]:
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a live process and of every live descendant it started."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
                children[parent].append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(current)
        todo.extend(children.get(current, []))
    return total


def _tool_rank(tool: str) -> tuple[int, str]:
    order = ["burrow", "burrow-gateway", *PEERS]
    return (order.index(tool), tool) if tool in order else (len(order), tool)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1_048_576:.1f} GiB RAM"
    return f"{cpu}, {os.cpu_count()} cores{mem}, Linux {platform.release()}"


def _rabbitmq_version() -> str:
    try:
        return _broker().version
    except OSError:
        return "unknown"


def _list(what: str, prefix: str) -> list[str]:
    try:
        return [name for name in _broker().names(what) if prefix in name]
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return []


def _broker() -> Broker:
    """The broker of BENCH_AMQP_URL and its CLI (the host's, or a rabbitmq4.sh node's)."""
    return Broker.from_url(AMQP_URL)


async def _delete_prefixed(prefix: str) -> None:
    import aiormq  # noqa: PLC0415

    queues, exchanges = _list("list_queues", prefix), _list("list_exchanges", prefix)
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def _drop_outbox_schemas(prefix: str) -> None:
    """Drop W8's PostgreSQL schemas of this run (each round drops its own; this catches a
    round that died half-way). Best effort: no asyncpg or no database, nothing to drop."""
    try:
        from bench.tools import outbox_tool  # noqa: PLC0415 - needs asyncpg: W8 only

        asyncio.run(outbox_tool.drop(prefix))
    except Exception as exc:
        print(f"  (W8 schemas not dropped: {exc})", flush=True)


def _delete_redis_keys(prefix: str) -> None:
    """Delete the Redis keys (celery-redis results) under `prefix` in the bench's db."""
    import redis  # noqa: PLC0415 - a bench-only dependency (celery[redis])

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    except redis.ConnectionError:
        print(f"  (no Redis at {REDIS_URL}: no keys to delete)", flush=True)
    finally:
        client.close()


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(doc: dict[str, Any]) -> str:
    """The human-readable table: results, then ratios (above 1 means Burrow is better)."""
    lines = [
        f"machine: {doc['machine']}",
        f"rabbitmq {doc['rabbitmq']}, python {doc['python']}",
        "",
        f"{'workload':<8} {'tool':<22} {'metric':<22} {'median':>10} {'min..max':>21} reps",
    ]
    for r in doc["results"]:
        spread = f"{_fmt(r['min'])}..{_fmt(r['max'])}"
        lines.append(
            f"{r['workload']:<8} {r['tool']:<22} {r['metric']:<22} {_fmt(r['median']):>10} "
            f"{spread:>21} {r['reps']}"
        )
    lines += [
        "",
        "ratios: burrow_over_peer, above 1 = Burrow better (latency/CPU: peer's over Burrow's;",
        "        W4-Nw: N workers over 1; peer burrow-quorum: classic Burrow over quorum Burrow;",
        "        peer burrow-link: the public API over the transport alone;",
        "        W7: burrow-gateway over fastapi-client;",
        "        W8: burrow-outbox over burrow-emit (target events_per_s >= 0.5) and over",
        "        burrow-dual-write (the same transaction, then emit: what the outbox costs))",
        f"{'workload':<8} {'metric':<22} {'peer':<22} {'burrow_over_peer':>16}",
    ]
    for r in doc["ratios"]:
        lines.append(
            f"{r['workload']:<8} {r['metric']:<22} {r['peer']:<22} {r['burrow_over_peer']:>16.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    """Run the suite; exit 1 only if a step failed (never because of a ratio)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every workload once at 1/10 size")
    parser.add_argument(
        "--only", nargs="*", help="workloads to run (W1 W2 W3 W4 W5 W6 W7 W8 LIMIT)"
    )
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--out",
        default=None,
        help="results file (default bench/results/...); the plot goes beside it as .png",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    bench = Bench(sizes=sizes, loop=args.loop, timeout=60 if args.quick else 600)
    bench.logs.mkdir(parents=True, exist_ok=True)
    for old in bench.logs.glob("*.log"):
        old.unlink()
    started = time.perf_counter()
    print(f"namespace prefix {bench.prefix}; worker logs in {bench.logs}", flush=True)
    try:
        bench.run(set(args.only) if args.only else None, extras=not args.quick)
    finally:
        try:
            bench.cleanup()
        except Exception as exc:
            bench.errors.append(f"cleanup: {exc}")
    doc = bench.report()
    default = "quick.json" if args.quick else "latest.json"
    out = Path(args.out) if args.out else RESULTS / default
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    print()
    print(table(doc))
    print(f"\nwrote {out} in {time.perf_counter() - started:.0f}s")
    if not args.quick:
        try:
            from bench.plot import plot  # noqa: PLC0415

            figure = out.with_suffix(".png") if args.out else RESULTS / "bench.png"
            print(f"wrote {plot(doc, figure)}")
        except Exception as exc:
            bench.errors.append(f"plot: {exc}")
    if bench.errors:
        print("\nERRORS:\n  " + "\n  ".join(bench.errors), file=sys.stderr)
        return 1
    return 0
