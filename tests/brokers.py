"""The test broker: the one place that knows which RabbitMQ the suite runs against.

`BURROW_TEST_AMQP_URL` (default: the machine's node on 127.0.0.1:5672) names it; from it come
its address, its Prometheus endpoint, its CLI, its version, and the RabbitMQ installation
that the fault tests' private nodes are started from (the host's, or the chroot of a
`deploy/local/rabbitmq4.sh` node).
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import socket
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame

__all__ = [
    "URL_VARIABLE",
    "DEFAULT_URL",
    "RABBITMQ4_SCRIPT",
    "Installation",
    "HOST",
    "RABBITMQ4",
    "Broker",
    "TEST_BROKER",
    "AMQP_URL",
]

URL_VARIABLE = "BURROW_TEST_AMQP_URL"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBITMQ4_SCRIPT = Path(__file__).resolve().parents[1] / "deploy/local/rabbitmq4.sh"
# Where rabbitmq4.sh keeps its chroot (the script's own default and override).
_RABBITMQ4_ROOT = Path(os.environ.get("BURROW_RABBITMQ4_ROOT", "/var/lib/burrow/rabbitmq4-trixie"))
_HOST_PROMETHEUS_PORT = 15692  # rabbitmq_prometheus's default
_RABBITMQ4_PROMETHEUS_OFFSET = 10020  # rabbitmq4.sh: PORT+10020 (5673 -> 15693)
_LOCAL = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Installation:
    """A RabbitMQ installation nodes are started from: the host's own (`root` None) or a
    chroot's. Paths given to its programs are paths as the installation sees them."""

    root: Path | None = None

    server = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    ctl = "/usr/sbin/rabbitmqctl"  # the packaged wrapper switches to the rabbitmq user itself
    home = "/var/lib/rabbitmq"  # the rabbitmq user's: its Erlang cookie is shared by the CLI
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def __str__(self) -> str:
        return "the host's RabbitMQ" if self.root is None else f"the RabbitMQ in {self.root}"

    def host_path(self, inner: str) -> Path:
        """The host's path to a path of the installation."""
        return Path(inner) if self.root is None else self.root / inner.lstrip("/")

    def inner_path(self, path: Path) -> str:
        """The installation's path to a host path under it."""
        if self.root is None:
            return str(path)
        return "/" + str(path.resolve().relative_to(self.root.resolve()))

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside the installation."""
        return list(argv) if self.root is None else ["chroot", str(self.root), *argv]

    def scratch(self) -> Path:
        """A host directory for node data the installation's programs can reach."""
        return Path(tempfile.gettempdir()) if self.root is None else self.root / "tmp"

    def installed(self) -> bool:
        """Whether the server and the CLI are there."""
        return self.host_path(self.server).exists() and self.host_path(self.ctl).exists()

    def rabbit_user(self) -> tuple[int, int]:
        """The (uid, gid) of the installation's `rabbitmq` user; KeyError when it has none."""
        if self.root is None:
            entry = pwd.getpwnam("rabbitmq")
            return entry.pw_uid, entry.pw_gid
        for line in (self.root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == "rabbitmq":
                return int(fields[2]), int(fields[3])
        raise KeyError("rabbitmq")

    def prepare(self) -> None:
        """Make the installation runnable: a chroot needs its /proc and /dev mounted, which
        rabbitmq4.sh does (e.g. after a reboot)."""
        if self.root is None:
            return
        mounts = Path("/proc/mounts").read_text()
        if f" {self.root}/proc " not in mounts or f" {self.root}/dev " not in mounts:
            subprocess.run(
                [str(RABBITMQ4_SCRIPT), "root"], capture_output=True, timeout=600, check=True
            )


HOST = Installation()
RABBITMQ4 = Installation(_RABBITMQ4_ROOT)  # deploy/local/rabbitmq4.sh's chroot


@dataclass(frozen=True)
class Broker:
    """A RabbitMQ node reachable at `url`, and how to inspect it."""

    url: str
    host: str
    port: int
    user: str
    password: str
    vhost: str
    metrics_url: str  # the node's rabbitmq_prometheus endpoint
    ctl: tuple[str, ...]  # argv prefix of the node's rabbitmqctl
    diagnostics: tuple[str, ...]  # argv prefix of the node's rabbitmq-diagnostics
    installation: Installation  # where private nodes like it come from

    @classmethod
    def from_url(cls, url: str) -> Broker:
        """The broker at `url`: a port served by a rabbitmq4.sh node is inspected through
        that script, any other through the host's own CLI (its default node)."""
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        ctl: tuple[str, ...]
        diagnostics: tuple[str, ...]
        if _rabbitmq4_node(host, port):
            script = (str(RABBITMQ4_SCRIPT), "ctl", str(port))
            metrics_port, installation = port + _RABBITMQ4_PROMETHEUS_OFFSET, RABBITMQ4
            ctl, diagnostics = script, ("env", "CTL=rabbitmq-diagnostics", *script)
        else:
            metrics_port, installation = _HOST_PROMETHEUS_PORT, HOST
            ctl, diagnostics = ("rabbitmqctl",), ("rabbitmq-diagnostics",)
        return cls(
            url=url,
            host=host,
            port=port,
            user=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            metrics_url=f"http://{host}:{metrics_port}/metrics",
            ctl=ctl,
            diagnostics=diagnostics,
            installation=installation,
        )

    @property
    def version(self) -> str:
        """The broker's version, e.g. `4.0.5` (from its connection.start properties)."""
        return _server_version(self.host, self.port)

    @property
    def major(self) -> int:
        """The broker's major version: 3 or 4."""
        return int(self.version.split(".")[0])

    @functools.cached_property
    def max_message_size(self) -> int:
        """The largest body the node accepts, in bytes (128 MiB by default on 3.x, 16 MiB on
        4.x), as its configuration says."""
        done = self.run_ctl("-q", "eval", "application:get_env(rabbit, max_message_size).")
        match = re.fullmatch(r"\{ok,(\d+)\}", done.stdout.strip())
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"cannot read max_message_size: {done.stdout}{done.stderr}")
        return int(match.group(1))

    def run_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the node's `rabbitmqctl ARGS` (blocking; `asyncio.to_thread` it in a test)."""
        return subprocess.run(
            [*self.ctl, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def rows(self, what: str, *columns: str, timeout: float = 60) -> list[list[str]]:
        """`rabbitmqctl list_<what>`'s rows of `columns` (tab-separated text, no header);
        raise when the CLI fails."""
        done = self.run_ctl("-q", "--no-table-headers", what, *columns, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {what} failed: {done.stderr[-500:]}")
        return [line.split("\t") for line in done.stdout.splitlines() if line.strip()]

    def names(self, what: str, prefix: str = "") -> list[str]:
        """Names of the queues / exchanges (`list_queues`, `list_exchanges`) starting with
        `prefix`."""
        return [row[0] for row in self.rows(what, "name") if row[0].startswith(prefix)]


def _rabbitmq4_node(host: str, port: int) -> bool:
    """Whether rabbitmq4.sh serves `port` here: its chroot is built and holds that node."""
    root = _RABBITMQ4_ROOT
    return (
        host in _LOCAL
        and (root / ".burrow-ready").exists()
        and (root / f"var/lib/rabbitmq/burrow4-{port}").is_dir()
    )


@functools.cache
def _server_version(host: str, port: int) -> str:
    """The `version` server property of the broker's connection.start (no login needed)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        data = b""
        while len(data) < 7 or len(data) < struct.unpack(">I", data[3:7])[0] + 8:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed before connection.start")
            data += chunk
    _consumed, _channel, start = frame.unmarshal(data)
    if not isinstance(start, commands.Connection.Start):
        raise ConnectionError(f"{host}:{port} sent {start!r}, not connection.start")
    version = (start.server_properties or {}).get("version", "")
    return version.decode() if isinstance(version, bytes) else str(version)


TEST_BROKER = Broker.from_url(os.environ.get(URL_VARIABLE, DEFAULT_URL))
AMQP_URL = TEST_BROKER.url
