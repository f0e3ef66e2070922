"""The PostgreSQL driver, asyncpg, as the outbox and inbox use it.

asyncpg is an extra (`pip install 'burrow[postgres]'`): it is imported when a relay, an inbox
pool or `burrow outbox init` first needs it, never by `import service`. The writer never
imports it: it is handed the caller's connection (asyncpg's own, or the one under a SQLAlchemy
`AsyncSession`: `(await session.connection()).get_raw_connection()` → `.driver_connection`).

Why asyncpg (not psycopg 3): it is the fastest asyncio driver, LISTEN/NOTIFY is a callback
on the connection (no polling loop), and it is what SQLAlchemy's async engine wraps for
PostgreSQL, so a SQLAlchemy user's session hands over an asyncpg connection as it is.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType
from typing import Any, Protocol

from service._protocol.errors import ConfigError

_asyncpg: ModuleType | None = None


def driver() -> ModuleType:
    """The asyncpg module, imported on first use.

    Raises:
        ConfigError: asyncpg is not installed.
    """
    global _asyncpg  # noqa: PLW0603 - imported once, on first use
    if _asyncpg is None:
        try:
            _asyncpg = importlib.import_module("asyncpg")
        except ImportError:
            raise ConfigError(
                "the outbox and inbox need asyncpg: pip install 'burrow[postgres]'"
            ) from None
    return _asyncpg


class Connection(Protocol):
    """What the writer and the inbox use of a connection (asyncpg's `Connection`)."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any: ...

    def is_in_transaction(self) -> bool: ...


async def connect(dsn: str, *, timeout: float) -> Any:
    """A new asyncpg connection (the relay's own: it LISTENs and holds advisory locks)."""
    return await driver().connect(dsn, timeout=timeout)


async def create_pool(dsn: str, **options: Any) -> Any:
    """A new asyncpg pool (an inbox given a DSN opens its own)."""
    return await driver().create_pool(dsn, **options)


# SQLSTATE classes and codes that say "the database is away or refused for now", never "this
# statement is wrong": 08 connection exceptions, 53 insufficient resources (too many
# connections, disk full), 57P operator intervention (shutdown, terminated, cannot connect
# now), 40001 serialization failure and 40P01 deadlock (retry the transaction).
_TRANSIENT_CLASSES = ("08", "53", "57P")
_TRANSIENT_CODES = frozenset({"40001", "40P01", "55P03"})


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable or refused for now (retry later)."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    asyncpg = sys.modules.get("asyncpg")  # an asyncpg error means asyncpg is imported
    if asyncpg is None:
        return False
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "pool is closing": the connection went away under us.
        return "clos" in str(exc).lower()
    code = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and isinstance(code, str):
        return code.startswith(_TRANSIENT_CLASSES) or code in _TRANSIENT_CODES
    return False


_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the password of any PostgreSQL URL in it masked."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD.sub(r"\1***@", text))


def describe(exc: BaseException) -> str:
    """A short, password-free description of a database failure."""
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}"[:300])
