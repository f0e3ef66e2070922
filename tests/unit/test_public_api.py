"""Unit tests of the public surface: `service.__all__` is sorted and complete, modules export.

A name missing from `__all__`, or a module without one, fails here before it reaches users.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import service

__all__: list[str] = []

PUBLIC_MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(service.__path__, prefix="service.")
    if not info.name.rsplit(".", 1)[-1].startswith("_")
)


def test_package_all_is_sorted_and_unique() -> None:
    """service.__all__ is one sorted list without duplicates."""
    assert service.__all__ == sorted(service.__all__)
    assert len(service.__all__) == len(set(service.__all__))


@pytest.mark.parametrize("name", service.__all__)
def test_every_exported_name_is_importable(name: str) -> None:
    """Every name in service.__all__ exists on the package."""
    namespace: dict[str, object] = {}
    exec(f"from service import {name}", namespace)
    assert namespace[name] is getattr(service, name)


def test_core_names_exported() -> None:
    """The names every user needs are in service.__all__."""
    expected = {"App", "Client", "Context", "Model", "Service", "ServiceError", "load_settings"}
    assert expected <= set(service.__all__)


def test_public_modules_found() -> None:
    """The module scan sees the package's modules (guards the scan itself)."""
    assert {"service.codec", "service.errors", "service.rpc_client"} <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_module_has_all(module_name: str) -> None:
    """Every public module declares __all__, and each listed name exists in it."""
    module: ModuleType = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{module_name} has no __all__ list"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module_name}.__all__ names missing attributes: {missing}"
    assert len(exported) == len(set(exported))
