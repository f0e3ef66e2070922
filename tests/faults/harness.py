"""Fault-test harness: a private RabbitMQ node, a loopback TCP proxy, and the delivery ledger.

Every fault is injected here, on a node only this session uses — never on the shared test
broker. Private nodes come from the test broker's installation (`tests.brokers`): the host's
RabbitMQ, or the chroot of a `deploy/local/rabbitmq4.sh` node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aio_pika
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from prometheus_client import REGISTRY

from service import Client, InvalidArgument, Service
from service._amqp.link import Link
from service._protocol.codec import Model
from service._protocol.errors import ConnectionLost, PublishFailed, ServiceError, Unavailable
from service._protocol.types import Outgoing
from service._protocol.vocabulary import DIRECT_REPLY_TO, H_DEADLINE, H_KIND, Names
from tests.brokers import TEST_BROKER, Installation

__all__ = [
    "BrokerStartError",
    "PrivateBroker",
    "TlsFiles",
    "FaultProxy",
    "PublishOutcome",
    "Ledger",
    "CallRecord",
    "tracked_call",
    "assert_calls_sound",
    "WorkRequest",
    "WorkReply",
    "work_service",
    "Hook",
    "crash_link",
    "eventually",
    "cast",
    "publish_until_confirmed",
    "PublishStream",
    "wait_until",
    "watch_loss",
    "free_port",
    "sample",
    "DIRECT_REPLY_TO",
    "RawCaller",
    "raw_channel",
    "reply_json",
    "drain_dead_letters",
    "drain_service",
    "drain_work",
    "tracked_route_call",
]


class BrokerStartError(RuntimeError):
    """The private node could not be started; the message says why and where its log is."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def watch_loss(link: Link) -> asyncio.Event:
    """An event set the next time `link` loses its connection."""
    lost = asyncio.Event()
    link.on_lost(lambda _reason: lost.set())
    return lost


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a cheap predicate every 20 ms until true; fail naming `what` after `timeout`.

    Only for state no event exposes (broker-side counts, link attributes); everything else is
    awaited directly.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)


def sample(name: str, **labels: str) -> float:
    """The current value of one Prometheus sample in this process (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- TLS material --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for `localhost` only (no IP address in it) and a
    client certificate, all signed by that CA; plus a second CA that signed nothing here."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path

    @classmethod
    def generate(cls, directory: Path) -> TlsFiles:
        """Write the files into `directory` with `openssl` (EC P-256 keys: fast to make)."""
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(
            ca_file=directory / "ca.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
            other_ca_file=directory / "other-ca.pem",
        )
        ca_key = directory / "ca.key"
        _self_signed_ca(ca_key, files.ca_file, "burrow-test-ca")
        _self_signed_ca(directory / "other-ca.key", files.other_ca_file, "burrow-other-ca")
        _signed_cert(
            files.server_key, files.server_cert, ca_key, files.ca_file,
            subject="localhost", extensions="subjectAltName=DNS:localhost\n"
            "extendedKeyUsage=serverAuth\n",
        )  # fmt: skip
        _signed_cert(
            files.client_key, files.client_cert, ca_key, files.ca_file,
            subject="burrow-test-client", extensions="extendedKeyUsage=clientAuth\n",
        )  # fmt: skip
        return files


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise BrokerStartError(f"openssl {args[0]} failed: {done.stderr[-1000:]}")


def _self_signed_ca(key: Path, cert: Path, name: str) -> None:
    _openssl(
        "req", "-x509", *_EC, "-keyout", key, "-out", cert, "-days", "7", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _signed_cert(
    key: Path, cert: Path, ca_key: Path, ca_cert: Path, *, subject: str, extensions: str
) -> None:
    request = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extensions
    )
    _openssl("req", *_EC, "-keyout", key, "-out", request, "-subj", f"/CN={subject}")
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "7", "-extfile", ext,
    )  # fmt: skip


# -- the private broker ---------------------------------------------------------------------


@dataclass
class PrivateBroker:
    """A RabbitMQ node of our own (own name, ports, data and log dirs), torn down at the end.

    Methods that change the node's state record what they changed so `heal` undoes exactly that
    after each test, without paying for a full reset. `base` is the host's path to the node's
    files; the node itself sees them as `installation.inner_path(base)`.
    """

    node: str
    port: int
    dist_port: int
    base: Path
    installation: Installation
    dirty: set[str] = field(default_factory=set)
    tls_port: int = 0  # 0: no TLS listener
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        """The AMQP URL of the node for the default guest user."""
        return self.url_for("guest", "guest")

    def url_for(self, user: str, password: str, port: int | None = None) -> str:
        """An AMQP URL on this node (or on `port`, e.g. a proxy in front of it)."""
        return f"amqp://{user}:{password}@127.0.0.1:{port or self.port}/"

    @property
    def tls_url(self) -> str:
        """The amqps:// URL of the node's TLS listener for guest, by the certificate's name."""
        return self.tls_url_for("guest", "guest")

    def tls_url_for(
        self, user: str, password: str, *, host: str = "localhost", port: int | None = None
    ) -> str:
        """An amqps:// URL on the TLS listener (or on `port`); `host` other than `localhost`
        does not match the server certificate."""
        if self.tls is None:
            raise AssertionError("this node was started without a TLS listener")
        return f"amqps://{user}:{password}@{host}:{port or self.tls_port}/"

    @property
    def ca_file(self) -> str:
        """The CA that signed the node's server certificate (and the client certificate)."""
        if self.tls is None:
            raise AssertionError("this node was started without a TLS listener")
        return str(self.tls.ca_file)

    # -- process lifecycle (synchronous: session fixture) --------------------------------

    @classmethod
    def start(
        cls,
        timeout: float = 120.0,
        *,
        name: str = "burrowfault",
        tls: bool = True,
        installation: Installation | None = None,
    ) -> PrivateBroker:
        """Start a detached node and wait until it serves AMQP; raise `BrokerStartError`.

        Args:
            name: node name prefix; the pid is appended so parallel sessions never collide.
            tls: also listen for amqps:// on `tls_port` with fresh certificates (`tls`); one
                more listener costs the node's start next to nothing.
            installation: the RabbitMQ to run (default: the test broker's).
        """
        install = TEST_BROKER.installation if installation is None else installation
        if not install.installed():
            raise BrokerStartError(f"{install} is not installed ({install.server} missing)")
        uid, gid = _rabbit_user(install)
        try:
            install.prepare()
        except (OSError, subprocess.SubprocessError) as exc:
            raise BrokerStartError(f"{install} cannot run: {exc}") from None
        # Inside the installation, so its node can reach its files by the same name.
        base = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=install.scratch()))
        node = f"{name}{os.getpid()}@localhost"
        broker = cls(
            node=node, port=free_port(), dist_port=free_port(), base=base, installation=install
        )
        (base / "mnesia").mkdir()
        (base / "log").mkdir()
        (base / "enabled_plugins").write_text("[].\n")
        config = (
            f"listeners.tcp.local = 127.0.0.1:{broker.port}\n"
            # Tests set the alarms themselves; the defaults must never trip by accident.
            "disk_free_limit.absolute = 1MB\n"
        )
        if tls:
            broker.tls_port = free_port()
            try:
                broker.tls = files = TlsFiles.generate(base / "tls")
            except BrokerStartError:
                broker.remove_files()
                raise
            # Client certificates are checked when offered, not required (both cases tested).
            inner = install.inner_path
            config += (
                f"listeners.ssl.local = 127.0.0.1:{broker.tls_port}\n"
                f"ssl_options.cacertfile = {inner(files.ca_file)}\n"
                f"ssl_options.certfile = {inner(files.server_cert)}\n"
                f"ssl_options.keyfile = {inner(files.server_key)}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        (base / "rabbitmq.conf").write_text(config)
        base.chmod(0o755)
        if os.getuid() == 0:
            for path in (base, *base.rglob("*")):
                os.chown(path, uid, gid)
        try:
            broker.launch(timeout)
        except BrokerStartError:
            broker.stop_node()
            raise
        return broker

    def launch(self, timeout: float = 120.0) -> None:
        """Start the node's Erlang VM on its existing data directory (first start or after
        `kill_hard`) and wait until it serves AMQP."""
        install = self.installation
        base = install.inner_path(self.base)
        env = {
            "PATH": install.path,
            # The rabbitmq user's home: its Erlang cookie is the one the CLI uses.
            "HOME": install.home,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
            "RABBITMQ_LOG_BASE": f"{base}/log",
            "RABBITMQ_PID_FILE": f"{base}/pid",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
            "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq.conf",
        }
        prefix = ["runuser", "-u", "rabbitmq", "--"] if os.getuid() == 0 else []
        argv = [
            *prefix, "env", f"--chdir={install.home}", *(f"{k}={v}" for k, v in env.items()),
            install.server, "-detached",
        ]  # fmt: skip
        started = subprocess.run(
            install.command(*argv),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if started.returncode != 0:
            raise BrokerStartError(f"rabbitmq-server -detached failed: {started.stderr[-2000:]}")
        self._await_startup(timeout)

    def _await_startup(self, timeout: float) -> None:
        # `await_startup` returns at once (error) until the node registered with epmd: poll it.
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = self.ctl_sync("await_startup", "--timeout", "30", timeout=40)
            if result.returncode == 0:
                return
            last = (result.stderr or result.stdout)[-500:]
            time.sleep(0.5)
        raise BrokerStartError(
            f"private node {self.node} not up after {timeout:.0f}s: {last}\n"
            f"log tail:\n{self.log_tail()}"
        )

    def ctl_sync(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl -n <our node> ...` (blocking: only outside the event loop)."""
        return subprocess.run(
            self._ctl_argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _ctl_argv(self, *args: str) -> list[str]:
        return self.installation.command(self.installation.ctl, "-q", "-n", self.node, *args)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the node's log, for failure messages."""
        log = self.base / "log" / f"{self.node}.log"
        with contextlib.suppress(OSError):
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop_node(self) -> None:
        """Stop the node, wait for its process to exit, and delete its files."""
        pid = self.pid()  # read first: a clean stop deletes the pid file before the VM exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl_sync("stop", timeout=60)
        if pid is not None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):  # never leave a node of ours running behind the session
                os.kill(pid, signal.SIGKILL)
        self.remove_files()

    def pid(self) -> int | None:
        """The pid of the node's Erlang VM (None before it wrote its pid file)."""
        try:
            return int((self.base / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def remove_files(self) -> None:
        """Delete the node's data and logs."""
        shutil.rmtree(self.base, ignore_errors=True)

    # -- fault injection (async: called from tests) ---------------------------------------

    async def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run `rabbitmqctl -n <our node> ...` without blocking the loop; return stdout."""
        proc = await asyncio.create_subprocess_exec(
            *self._ctl_argv(*args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"rabbitmqctl {' '.join(args)} hung for {timeout}s") from None
        if check and proc.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): "
                f"{err.decode(errors='replace')[-1000:]}"
            )
        return out.decode(errors="replace")

    async def stop_app(self) -> None:
        """Stop RabbitMQ on the node (the Erlang VM stays up): every connection drops."""
        self.dirty.add("app")
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """Start RabbitMQ again after `stop_app`."""
        await self.ctl("start_app")
        await self.ctl("await_startup", "--timeout", "60", timeout=70)
        self.dirty.discard("app")

    async def kill_hard(self) -> None:
        """SIGKILL the node's Erlang VM: no clean shutdown, nothing flushed, sockets just die."""
        self.dirty.add("dead")
        pid = self.pid()
        assert pid is not None, f"no pid file for {self.node}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"the node's VM (pid {pid}) survived SIGKILL for 30 s")
            await asyncio.sleep(0.05)

    async def relaunch(self, timeout: float = 120.0) -> None:
        """Boot the node again on its data after `kill_hard` (recovery included)."""
        await asyncio.to_thread(self.launch, timeout)
        self.dirty.discard("dead")

    async def ready_count(self, queue: str) -> int:
        """Messages ready in `queue` now (a passive declare: exact, unlike `list_queues`)."""
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await connection.close()

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """(ready, unacknowledged) messages of `queue` from the broker's statistics, which lag
        by up to the stats interval (5 s): poll them with `eventually`."""
        out = await self.ctl(
            "list_queues", "name", "messages_ready", "messages_unacknowledged",
            "--formatter", "json",
        )  # fmt: skip
        for row in json.loads(out or "[]"):
            if row.get("name") == queue:
                return int(row["messages_ready"]), int(row["messages_unacknowledged"])
        raise AssertionError(f"no queue {queue} on the node")

    async def close_all_connections(self, reason: str = "fault test") -> None:
        """Have the broker close every client connection (connection.close 320)."""
        await self.ctl("close_all_connections", reason)

    async def close_connection(self, name: str, reason: str = "fault test") -> int:
        """Close the connections whose client-given name is `name`; return how many."""
        pids = [c["pid"] for c in await self.connections() if c["name"] == name]
        for pid in pids:
            await self.ctl("close_connection", pid, reason)
        return len(pids)

    async def connections(self) -> list[dict[str, str]]:
        """Open connections: their Erlang pid and their `connection_name` client property."""
        # Text output: `close_connection` wants the pid as printed there, not the JSON form.
        out = await self.ctl("list_connections", "--no-table-headers", "pid", "client_properties")
        found = []
        for line in out.splitlines():
            pid, _, props = line.partition("\t")
            match = re.search(r'connection_name"?,\s*(?:longstr,\s*)?"?<?<?"([^"]*)"', props)
            if pid.strip():
                found.append({"pid": pid.strip(), "name": match.group(1) if match else ""})
        return found

    async def connection_details(self) -> list[dict[str, Any]]:
        """Open connections as the broker sees them: `name` (client-given), `user`, `ssl`,
        `port` (the broker's port the client reached) and `peer_cert_subject`."""
        out = await self.ctl(
            "list_connections", "user", "ssl", "port", "peer_cert_subject", "client_properties",
            "--formatter", "json",
        )  # fmt: skip
        found = []
        for row in json.loads(out or "[]"):
            props = {item[0]: item[-1] for item in row.pop("client_properties") or []}
            found.append({**row, "name": props.get("connection_name", "")})
        return found

    async def close_user_connections(self, user: str, reason: str = "fault test") -> int:
        """Close every connection logged in as `user`; return how many."""
        out = await self.ctl("list_connections", "--no-table-headers", "pid", "user")
        pids = [
            pid.strip()
            for pid, _, who in (line.partition("\t") for line in out.splitlines())
            if who.strip() == user
        ]
        for pid in pids:
            await self.ctl("close_connection", pid, reason, check=False)  # may be gone already
        return len(pids)

    async def change_password(self, user: str, password: str) -> None:
        """Give `user` a new password (its open connections stay logged in)."""
        await self.ctl("change_password", user, password)

    async def consumer_count(self, queue: str) -> int:
        """How many consumers the broker has on `queue` (the ground truth for A1/A4/A10)."""
        out = await self.ctl("list_consumers", "queue_name", "--formatter", "json")
        return sum(1 for row in json.loads(out or "[]") if row.get("queue_name") == queue)

    async def set_vm_memory_high_watermark(self, fraction: float) -> None:
        """Set the memory watermark; 0 raises the memory alarm at once."""
        self.dirty.add("memory")
        await self.ctl("set_vm_memory_high_watermark", str(fraction))

    async def set_disk_free_limit(self, limit: str) -> None:
        """Set the disk free limit, e.g. `1000GB` to raise the disk alarm."""
        self.dirty.add("disk")
        await self.ctl("set_disk_free_limit", limit)

    async def set_consumer_timeout(self, ms: int, tick_ms: int = 500) -> None:
        """Make the broker close channels holding a delivery unacked longer than `ms` (read by
        channels opened afterwards); `tick_ms` is how often channels check."""
        self.dirty.add("consumer_timeout")
        await self.ctl("eval", f"application:set_env(rabbit, consumer_timeout, {int(ms)}).")
        await self.ctl("eval", f"application:set_env(rabbit, channel_tick_interval, {tick_ms}).")

    async def delete_queue(self, name: str) -> None:
        """Delete a queue (its consumers get basic.cancel)."""
        await self.ctl("delete_queue", name)

    async def add_user(self, user: str, password: str, *, full_access: bool = True) -> None:
        """Create a user (removed again by `heal`)."""
        self.dirty.add(f"user:{user}")
        await self.ctl("add_user", user, password)
        if full_access:
            await self.set_permissions(user, ".*", ".*", ".*")

    async def delete_user(self, user: str) -> None:
        """Delete a user (its connections are closed by the broker)."""
        await self.ctl("delete_user", user)
        self.dirty.discard(f"user:{user}")

    async def set_permissions(self, user: str, configure: str, write: str, read: str) -> None:
        """Set a user's permissions on vhost `/` (guest's are restored by `heal`)."""
        if user == "guest":
            self.dirty.add("guest")
        await self.ctl("set_permissions", "-p", "/", user, configure, write, read)

    async def heal(self) -> None:
        """Undo whatever the last test changed on the node."""
        dirty, self.dirty = self.dirty, set()
        if "dead" in dirty:
            await self.relaunch()
        if "app" in dirty:
            await self.start_app()
        if "memory" in dirty:
            await self.ctl("set_vm_memory_high_watermark", "0.4")
        if "consumer_timeout" in dirty:
            # Back to the defaults of rabbit.app (unsetting the tick would crash new channels).
            await self.ctl("eval", "application:set_env(rabbit, consumer_timeout, 1800000).")
            await self.ctl("eval", "application:set_env(rabbit, channel_tick_interval, 60000).")
        if "disk" in dirty:
            await self.ctl("set_disk_free_limit", "1MB")
        if "guest" in dirty:
            await self.ctl("set_permissions", "-p", "/", "guest", ".*", ".*", ".*")
        for item in dirty:
            if item.startswith("user:"):
                await self.ctl("delete_user", item.removeprefix("user:"), check=False)


def _rabbit_user(installation: Installation) -> tuple[int, int]:
    """The (uid, gid) the installation's nodes run as; only they, or root, may start one."""
    try:
        uid, gid = installation.rabbit_user()
    except (KeyError, OSError):
        raise BrokerStartError(f"no `rabbitmq` user in {installation} to run a node as") from None
    allowed = (0,) if installation.root is not None else (0, uid)  # chroot: root only
    if os.getuid() not in allowed:
        raise BrokerStartError(f"starting a private node of {installation} needs root")
    return uid, gid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the TCP proxy ---------------------------------------------------------------------------


class ProxyMode(StrEnum):
    """What the proxy does with traffic."""

    PASS = "pass"
    REFUSE = "refuse"  # accept, then reset at once: like a broker that is down
    BLACKHOLE = "blackhole"  # keep sockets open, forward nothing: a silent network partition


class _Pipe:
    """One proxied connection: client side and broker side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.opened = False  # the client sent its first bytes
        self.holed = False
        self.task = asyncio.current_task()

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _rst(writer)


def _rst(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER 0 then abort: the kernel sends RST instead of FIN.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A loopback TCP proxy in front of the private node that can reset or black-hole traffic."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = ProxyMode.PASS
        self.accepted = 0
        self.bytes_up = 0  # client to broker, to time a fault "mid-publish"
        self.openings: list[bytes] = []  # each connection's first bytes: TLS or plain AMQP?
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()

    async def start(self) -> None:
        """Listen on an ephemeral loopback port (see `port`)."""
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        self.reset_all()
        tasks = [pipe.task for pipe in self._pipes if pipe.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        """Connections currently proxied."""
        return len(self._pipes)

    def reset_all(self) -> int:
        """Send RST on both sides of every connection; return how many were reset."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.reset()
        return len(pipes)

    def blackhole(self) -> None:
        """Stop forwarding in both directions without closing anything (new ones too)."""
        self.mode = ProxyMode.BLACKHOLE
        for pipe in self._pipes:
            pipe.holed = True

    def abandon(self) -> int:
        """Reset the client side of every connection but keep the broker side open and silent:
        the client reconnects at once while the broker still believes in the old connection
        until its heartbeat says otherwise. Return how many were abandoned."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.holed = True
            _rst(pipe.client)
        return len(pipes)

    def refuse(self) -> None:
        """Reset every new connection at once, as a host with nothing listening would."""
        self.mode = ProxyMode.REFUSE

    def heal(self) -> None:
        """Forward again; connections that lost bytes in the hole are reset (their stream is
        corrupt), as a real partition ends with retransmission timeouts."""
        self.mode = ProxyMode.PASS
        for pipe in list(self._pipes):
            if pipe.holed:
                pipe.reset()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is ProxyMode.REFUSE:
            _rst(writer)
            return
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        try:
            if self.mode is ProxyMode.BLACKHOLE:
                pipe.holed = True
                await self._swallow(reader)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port
                )
            except OSError:
                _rst(writer)
                return
            pipe.upstream = up_writer
            await asyncio.gather(
                self._pump(pipe, reader, up_writer, upstream=True),
                self._pump(pipe, up_reader, writer, upstream=False),
            )
        finally:
            self._pipes.discard(pipe)
            # Whatever ended this pipe, release both sockets (no FIN owed after a hole).
            for side in (writer, pipe.upstream):
                if side is not None and not side.transport.is_closing():
                    side.transport.abort()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(65536):
                pass

    async def _pump(
        self,
        pipe: _Pipe,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if pipe.holed:
                    continue
                if upstream:
                    self.bytes_up += len(data)
                    if not pipe.opened:
                        pipe.opened = True
                        self.openings.append(data[:8])
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            if not pipe.holed:
                pipe.reset()
            return
        if pipe.holed:
            # Inside a black hole nothing crosses, not even the other side's FIN.
            return
        # Orderly end from one side: close the other side after flushing (FIN, not RST).
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


# -- the ledger (RELIABILITY.md, "The oracle") ------------------------------------------------


class PublishOutcome(StrEnum):
    """What the publisher knows about one message."""

    CONFIRMED = "confirmed"
    FAILED = "failed"  # never left the process (not connected, refused locally)
    UNKNOWN = "unknown"  # sent, but no confirm: it may or may not be in the queue


@dataclass
class Ledger:
    """Publishes by message id, side effects by key, and what was left in the queues.

    lost = confirmed - (processed | dead-lettered | still queued) must be empty.
    """

    published: dict[str, PublishOutcome] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)
    effects: Counter[str] = field(default_factory=Counter)
    first_effect_at: dict[str, float] = field(default_factory=dict)  # wall clock, time.time()
    dead: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record_publish(self, message_id: str, outcome: PublishOutcome) -> None:
        """Record one attempt; a confirm is final (a later failed retry cannot undo it)."""
        self.attempts[message_id] += 1
        if self.published.get(message_id) is not PublishOutcome.CONFIRMED:
            self.published[message_id] = outcome

    def begin(self, key: str) -> None:
        """A handler started working on `key`."""
        self.started[key] += 1
        self._changed.set()

    def effect(self, key: str) -> None:
        """A handler performed its side effect for `key`."""
        self.effects[key] += 1
        self.first_effect_at.setdefault(key, time.time())
        self._changed.set()

    @property
    def confirmed(self) -> set[str]:
        """Ids the broker confirmed."""
        return {k for k, v in self.published.items() if v is PublishOutcome.CONFIRMED}

    @property
    def processed(self) -> set[str]:
        """Keys with at least one side effect."""
        return set(self.effects)

    def lost(self) -> set[str]:
        """Confirmed but nowhere: the one thing that must never happen."""
        return self.confirmed - (self.processed | self.dead | self.queued)

    def phantoms(self) -> set[str]:
        """Processed or found but never published."""
        return (self.processed | self.dead | self.queued) - set(self.published)

    def duplicates(self) -> dict[str, int]:
        """Keys processed more than once (raw redeliveries: reported, not hidden)."""
        return {k: n for k, n in self.effects.items() if n > 1}

    async def wait_processed(self, keys: Iterable[str], timeout: float) -> None:
        """Wait until every key has a side effect; fail with the missing ones."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        while not wanted <= self.processed:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await self._changed.wait()
            except TimeoutError:
                missing = sorted(wanted - self.processed)
                raise AssertionError(
                    f"{len(missing)} of {len(wanted)} never processed within {timeout}s: "
                    f"{missing[:10]}"
                ) from None

    async def drain(
        self, url: str, queues: Iterable[str] = (), dead_letter_queues: Iterable[str] = ()
    ) -> None:
        """Take everything left in the queues (ack it) and record it as queued / dead. A queue
        that does not exist holds nothing (a service's request queue is deleted when its last
        instance stops)."""
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            for names, into in ((queues, self.queued), (dead_letter_queues, self.dead)):
                for name in names:
                    try:
                        queue = await channel.get_queue(name, ensure=True)
                    except aio_pika.exceptions.ChannelNotFoundEntity:
                        channel = await connection.channel()  # the miss closed it
                        continue
                    while (message := await queue.get(fail=False, no_ack=True)) is not None:
                        into.add(message.message_id or "?")
        finally:
            await connection.close()

    def assert_sound(self) -> str:
        """Assert the oracle (nothing lost, nothing invented); return a one-line summary."""
        summary = self.summary()
        assert not self.lost(), f"LOST confirmed messages {sorted(self.lost())[:10]}; {summary}"
        assert not self.phantoms(), f"phantom messages {sorted(self.phantoms())[:10]}; {summary}"
        return summary

    def summary(self) -> str:
        """Counts for the test log."""
        by_outcome = Counter(v.value for v in self.published.values())
        return (
            f"published={dict(by_outcome)}"
            f" retries={sum(self.attempts.values()) - len(self.attempts)}"
            f" processed={len(self.processed)} duplicates={len(self.duplicates())}"
            f" dead={len(self.dead)} queued={len(self.queued)} lost={len(self.lost())}"
        )


# -- RPC outcomes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CallRecord:
    """How one call ended: exactly one of result / error / timeout (or hang: a defect)."""

    index: int
    outcome: str  # result | error | timeout | hang
    elapsed: float
    deadline: float
    error: ServiceError | None = None
    correct: bool = True  # the reply answers this call, not another one


async def tracked_call(
    client: Client,
    index: int,
    *,
    deadline: float,
    delay_ms: int = 0,
    epsilon: float = 3.0,
    ledger: Ledger | None = None,
) -> CallRecord:
    """Call `work.do` once; classify the ending; a call still pending at deadline+ε is a hang.

    Args:
        ledger: also record the call's key as published (confirmed when answered, else
            unknown: the request may still run), so the oracle can account for its effect.
    """
    key = f"call-{index}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline + epsilon):
            reply = await client.call(
                "work.do", {"key": key, "delay_ms": delay_ms}, timeout=deadline
            )
    except TimeoutError:
        if ledger is not None:
            ledger.record_publish(key, PublishOutcome.UNKNOWN)
        return CallRecord(index, "hang", time.monotonic() - started, deadline)
    except ServiceError as exc:
        if ledger is not None:
            ledger.record_publish(key, PublishOutcome.UNKNOWN)
        outcome = "timeout" if exc.code.value == "DEADLINE_EXCEEDED" else "error"
        return CallRecord(index, outcome, time.monotonic() - started, deadline, error=exc)
    if ledger is not None:
        ledger.record_publish(key, PublishOutcome.CONFIRMED)
    correct = isinstance(reply, dict) and reply.get("key") == key
    return CallRecord(index, "result", time.monotonic() - started, deadline, correct=correct)


def assert_calls_sound(records: list[CallRecord], client: Client) -> Counter[str]:
    """No hang, no crossed reply, no leaked pending future; return outcome counts."""
    counts = Counter(r.outcome for r in records)
    hung = [r.index for r in records if r.outcome == "hang"]
    assert not hung, f"calls still pending after deadline+ε: {hung[:10]} ({counts})"
    crossed = [r.index for r in records if not r.correct]
    assert not crossed, f"calls answered with another call's reply: {crossed[:10]}"
    assert not client.rpc.pending, f"{len(client.rpc.pending)} pending futures leaked"
    return counts


# -- the workload ------------------------------------------------------------------------------


class WorkRequest(Model):
    """One unit of work: `key` names its side effect."""

    key: str
    delay_ms: int = 0
    blob: str = ""
    digest: str = ""


class WorkReply(Model):
    """The key the work was done for (lets the caller check it got its own reply)."""

    key: str


Hook = Callable[[str], Awaitable[None]]


def work_service(
    ledger: Ledger,
    *,
    name: str = "work",
    gate: asyncio.Event | None = None,
    before: Hook | None = None,
    after: Hook | None = None,
    idempotent: bool = False,
    retries: int | None = None,
    timeout: float | None = None,
) -> Service:
    """A service whose one operation `do` records its side effect in `ledger`.

    Args:
        gate: when given, every handler waits for it before working (holds deliveries unacked).
        before: awaited with the key before the side effect; raise from it to fail the attempt.
        after: awaited with the key right after the side effect (e.g. to crash there).
        idempotent, retries, timeout: passed to the operation's declaration.
    """
    svc = Service(name)

    async def do(req: WorkRequest) -> WorkReply:
        """Wait for the gate, pretend to work, verify the body, record the side effect."""
        ledger.begin(req.key)
        if gate is not None:
            await gate.wait()
        if before is not None:
            await before(req.key)
        if req.delay_ms:
            await asyncio.sleep(req.delay_ms / 1000)
        if req.digest and hashlib.sha256(req.blob.encode()).hexdigest() != req.digest:
            raise InvalidArgument("body corrupted in transit")
        ledger.effect(req.key)
        if after is not None:
            await after(req.key)
        return WorkReply(key=req.key)

    svc.add_operation(do, name="do", idempotent=idempotent, retries=retries, timeout=timeout)
    return svc


async def crash_link(broker: PrivateBroker, link: Link, timeout: float = 10.0) -> None:
    """Have the broker drop `link`'s connection, as a crashed process would, and wait until the
    link noticed: what it held unacked goes back to the queue."""
    lost = watch_loss(link)
    assert await broker.close_connection(f"burrow:{link.name}") >= 1, f"no {link.name} connection"
    async with asyncio.timeout(timeout):
        await lost.wait()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll an async check (a broker query) every 100 ms until true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.1)


def cast(namespace: str, key: str, *, route: str = "work.do", **fields: Any) -> Outgoing:
    """A persistent fire-and-forget request (a cast) whose message id is its side-effect key."""
    body = json.dumps({"key": key, **fields}).encode()
    return Outgoing(
        exchange=Names(namespace).commands_exchange,
        routing_key=route,
        body=body,
        message_id=key,
        type=route,
        headers={H_KIND: "cast"},
        persistent=True,
    )


async def publish_until_confirmed(
    link: Link,
    ledger: Ledger,
    message: Outgoing,
    *,
    give_up_after: float,
    timeout: float = 2.0,
    on_miss: Callable[[PublishOutcome], None] | None = None,
) -> PublishOutcome:
    """Publish; on a retryable failure retry the same message id until confirmed or give up.

    Args:
        on_miss: called with the outcome of every attempt that was not confirmed.
    """
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            await link.publish(message, kind="event", mandatory=True, timeout=timeout)
        except (ConnectionLost, PublishFailed):
            outcome = PublishOutcome.UNKNOWN
        except Unavailable:
            outcome = PublishOutcome.FAILED
        else:
            ledger.record_publish(message.message_id, PublishOutcome.CONFIRMED)
            return PublishOutcome.CONFIRMED
        ledger.record_publish(message.message_id, outcome)
        if on_miss is not None:
            on_miss(outcome)
        if time.monotonic() > deadline:
            return ledger.published[message.message_id]
        await asyncio.sleep(0.05)


class PublishStream:
    """One paced publisher (a stream, not a flood) confirming message after message into the
    ledger while a test injects its fault; stopped, bounded, when the `async with` ends.

    One stream only: concurrent publishers on one link can trip aiormq's
    ChannelInvalidStateError leak (reported upstream).

    A fault is timed on the stream's events, never on sleeps: wait for `confirmed` before it,
    and hold it (e.g. keep the broker down) until `missed` says a publish of the stream met
    it — an outage shorter than the publish timeout is otherwise waited out by a publish
    blocked on the reconnect, and nothing fails or is retried.
    """

    def __init__(
        self,
        producer: Link,
        ledger: Ledger,
        message: Callable[[int], Outgoing],
        *,
        give_up_after: float = 60.0,
    ) -> None:
        self.producer, self.ledger, self.message = producer, ledger, message
        self.give_up_after = give_up_after
        self.misses = 0  # publish attempts of the stream that were not confirmed
        self._missed = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PublishStream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        assert self._task is not None
        async with asyncio.timeout(self.give_up_after + 30):
            await self._task

    async def confirmed(self, more: int, timeout: float, what: str) -> None:
        """Wait until `more` messages beyond those confirmed so far are confirmed."""
        mark = len(self.ledger.confirmed)
        await wait_until(lambda: len(self.ledger.confirmed) >= mark + more, timeout, what)

    async def missed(self, since: int, timeout: float, what: str) -> None:
        """Wait until more than `since` (a `misses` taken before the fault) attempts of the
        stream failed or went unconfirmed; fail naming `what` after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while self.misses <= since:
                    self._missed.clear()
                    await self._missed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {what}; {self.ledger.summary()}"
            ) from None

    def _on_miss(self, _outcome: PublishOutcome) -> None:
        self.misses += 1
        self._missed.set()

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            message = self.message(i)
            await publish_until_confirmed(
                self.producer,
                self.ledger,
                message,
                give_up_after=self.give_up_after,
                on_miss=self._on_miss,
            )
            i += 1
            await asyncio.sleep(0.01)


# -- hand-made requests and the bad-input oracle ----------------------------------------------
# Raw-channel requests (moved here from tests/integration with the C and D scenarios): they can
# be exactly as broken as a buggy client or an attacker would send them.

_RAW_WAIT = 10.0  # upper bound on one wait for the broker; never reached when things work


async def raw_channel(channel: aio_pika.abc.AbstractChannel) -> RawChannel:
    """The aiormq channel under an aio-pika channel, for byte-exact publishing."""
    return await channel.get_underlay_channel()


class RawCaller:
    """Publishes hand-made requests to `<ns>.rpc` and collects replies on direct reply-to.

    Args:
        ledger: record every publish: confirmed when the broker confirmed it, except a call
            awaiting its reply here, recorded unknown (its outcome is the reply, as in
            `tracked_call`).
    """

    def __init__(self, raw: RawChannel, namespace: str, ledger: Ledger | None = None) -> None:
        self.raw = raw
        self.names = Names(namespace)
        self.ledger = ledger
        self.replies: dict[str, asyncio.Future[DeliveredMessage]] = {}
        self.stray: list[DeliveredMessage] = []  # replies to no call of ours, or a second one

    async def start(self) -> RawCaller:
        """Consume direct reply-to on this channel (must precede any publish with reply_to)."""
        await self.raw.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self.replies.get(message.header.properties.correlation_id or "")
        if future is None or future.done():
            self.stray.append(message)
        else:
            future.set_result(message)

    async def publish(
        self,
        route: str,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        reply_to: str | None = DIRECT_REPLY_TO,
        correlation_id: str | None = None,
        deadline_in: float | None = 30.0,
    ) -> str:
        """Publish one request exactly as given (message id = correlation id); return the id.

        Args:
            deadline_in: seconds from now for `x-deadline` (negative: already passed; None: none).
        """
        correlation_id = correlation_id or uuid.uuid4().hex
        all_headers: dict[str, Any] = dict(headers or {})
        if deadline_in is not None:
            all_headers.setdefault(H_DEADLINE, int((time.time() + deadline_in) * 1000))
        awaited = reply_to == DIRECT_REPLY_TO
        if awaited:
            self.replies[correlation_id] = asyncio.get_running_loop().create_future()
        confirmation = await self.raw.basic_publish(
            body,
            exchange=self.names.rpc_exchange,
            routing_key=route,
            properties=Basic.Properties(
                content_type=content_type,
                content_encoding=content_encoding,
                correlation_id=correlation_id,
                message_id=correlation_id,
                reply_to=reply_to,
                message_type=route,
                headers=all_headers or None,
            ),
        )
        if self.ledger is not None:
            confirmed = isinstance(confirmation, Basic.Ack) and not awaited
            outcome = PublishOutcome.CONFIRMED if confirmed else PublishOutcome.UNKNOWN
            self.ledger.record_publish(correlation_id, outcome)
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = _RAW_WAIT) -> DeliveredMessage:
        """The reply to a published request."""
        async with asyncio.timeout(timeout):
            return await self.replies[correlation_id]

    async def call(self, route: str, body: bytes, **kwargs: Any) -> DeliveredMessage:
        """Publish with reply_to and wait for the reply."""
        return await self.reply(await self.publish(route, body, **kwargs))

    def unanswered(self) -> set[str]:
        """Calls of ours still waiting for their reply."""
        return {cid for cid, future in self.replies.items() if not future.done()}


def reply_json(message: DeliveredMessage) -> Any:
    """The decoded body of a reply."""
    return json.loads(message.body)


async def drain_dead_letters(
    url: str, queue: str, ledger: Ledger, *, expect: int, timeout: float = _RAW_WAIT
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Wait until `expect` messages are parked in `queue`, take (ack) every one there, record
    each as dead in `ledger`, and return them all: more than `expect` is a loop."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        dlq = await channel.get_queue(queue, ensure=True)
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout
        while True:
            message = await dlq.get(fail=False, no_ack=True)
            if message is not None:
                taken.append(message)
                ledger.dead.add(message.message_id or "?")
                continue
            if len(taken) >= expect:
                return taken
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(taken)} of {expect} dead letters in {queue}")
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def drain_work(url: str, ledger: Ledger, namespace: str, service: str = "work") -> None:
    """Once the App stopped: take what is left in the service's request, commands and
    dead-letter queues into `ledger`."""
    names = Names(namespace)
    await ledger.drain(
        url,
        [names.request_queue(service), names.commands_queue(service)],
        [names.dead_letter_queue(service)],
    )


async def drain_service(url: str, ledger: Ledger, namespace: str, service: str = "work") -> str:
    """`drain_work`, then assert the oracle; returns its summary."""
    await drain_work(url, ledger, namespace, service)
    return ledger.assert_sound()


async def tracked_route_call(
    client: Client,
    route: str,
    payload: Any,
    *,
    deadline: float,
    index: int = 0,
    epsilon: float = 3.0,
    expect: Callable[[Any], bool] | None = None,
) -> tuple[CallRecord, Any]:
    """`tracked_call` for any operation and payload: classify the ending, return it and the
    reply (None unless a result).

    Args:
        expect: tells whether a reply answers this call (default: any reply does).
    """
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline + epsilon):
            reply = await client.call(route, payload, timeout=deadline)
    except TimeoutError:
        return CallRecord(index, "hang", time.monotonic() - started, deadline), None
    except ServiceError as exc:
        outcome = "timeout" if exc.code.value == "DEADLINE_EXCEEDED" else "error"
        elapsed = time.monotonic() - started
        return CallRecord(index, outcome, elapsed, deadline, error=exc), None
    correct = expect is None or expect(reply)
    elapsed = time.monotonic() - started
    return CallRecord(index, "result", elapsed, deadline, correct=correct), reply
