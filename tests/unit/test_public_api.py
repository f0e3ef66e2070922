"""Unit tests of the public surface: the names users import, listed here, and nothing else.

`from service import …`, `service.testing`, `service.blocking` and `service.gateway` are the
public modules; every other module is private (under a `_package/`, or an entry point). A name
that appears in or disappears from a public `__all__` fails here until this list is changed on
purpose, with the docs.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import service

__all__: list[str] = []

PUBLIC: dict[str, set[str]] = {
    "service": {
        "App",
        "BlockingClient",
        "BlockingJob",
        "BurrowError",
        "Claim",
        "Client",
        "ClientUnusable",
        "ConfigError",
        "ConnectionLost",
        "Context",
        "DeadlineExceeded",
        "ErrorCode",
        "FailedPrecondition",
        "IdempotencyStore",
        "Inbox",
        "Internal",
        "InvalidArgument",
        "Job",
        "JobRecord",
        "JobState",
        "JobStatus",
        "JobStore",
        "Lifespan",
        "MessageTooLarge",
        "Middleware",
        "Model",
        "Next",
        "NotFound",
        "Operation",
        "Outbound",
        "Outbox",
        "OutboxRelay",
        "PermissionDenied",
        "PublishFailed",
        "PublishNext",
        "Publishing",
        "QueueFull",
        "Request",
        "ResourceExhausted",
        "Result",
        "Service",
        "ServiceError",
        "Settings",
        "State",
        "TopologyError",
        "Unavailable",
        "Unroutable",
        "contracts",
        "get_client",
        "load_settings",
        "register_store",
        "tracing",
    },
    "service.blocking": {
        "DEFAULT_MAX_IN_FLIGHT",
        "BlockingClient",
        "BlockingJob",
        "ClientUnusable",
        "get_client",
    },
    "service.gateway": {"HTTP_STATUS", "RETRY_AFTER_S", "Gateway", "http_status", "retry_after"},
    "service.testing": {
        "BACKEND_VARIABLE",
        "URL_VARIABLE",
        "InMemoryBroker",
        "MemoryChannel",
        "MemoryExchange",
        "MemoryLink",
        "MemoryQueue",
        "Message",
        "PublishedMessage",
        "Served",
        "delete_entities",
        "delete_topology",
        "serve",
        "topic_matches",
    },
    # Modules `service` exports as modules: only what a user calls on them.
    "service._protocol.contracts": {"compare", "export", "load_contract"},
    "service._protocol.tracing": {"configure_from_env", "current", "span_id", "trace_id", "use"},
}
# Public modules that are not imported for names: the example (`burrow run service.example:calc`)
# and the two entry points (`burrow`, and pytest's `pytest11`).
ENTRY_POINTS = {
    "service.example",
    "service.cli",
    "service.cli.__main__",
    "service.testing.pytest_plugin",
}

PACKAGE = Path(service.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


PATHS = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
MODULES = sorted(PATHS)


def _private(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_public_names_are_the_listed_ones(module_name: str) -> None:
    """Each public module's __all__ is exactly the list above, and each name exists."""
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{module_name} has no __all__ list"
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ repeats a name"
    assert set(exported) == PUBLIC[module_name]
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module_name}.__all__ names missing attributes: {missing}"


def test_the_package_exports_its_modules_and_is_sorted() -> None:
    """service.__all__ is sorted; `contracts` and `tracing` are the modules listed above."""
    assert service.__all__ == sorted(service.__all__)
    assert service.contracts.__name__ == "service._protocol.contracts"
    assert service.tracing.__name__ == "service._protocol.tracing"


def test_every_other_module_is_private() -> None:
    """A module is public only if listed: every other one lives under a `_package/`."""
    stray = [
        name
        for name in MODULES
        if name not in PUBLIC and name not in ENTRY_POINTS and not _private(name)
    ]
    assert stray == [], f"public modules nobody listed: {stray}"
    assert len([name for name in MODULES if _private(name)]) > 20, "the module scan saw nothing"


def _declares_all(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(target, ast.Name) and target.id == "__all__"
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
        for node in tree.body
    )


def test_private_modules_declare_no_all() -> None:
    """Private modules export nothing by `__all__`: users import from the public modules."""
    declaring = [name for name in MODULES if name not in PUBLIC and _declares_all(PATHS[name])]
    assert declaring == []
