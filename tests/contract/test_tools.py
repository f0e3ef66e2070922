"""The contract tests' tool lookup: a missing checker skips locally and fails in CI."""

from __future__ import annotations

import pytest

from tests.contract.tools import find_tool

_MISSING = "burrow-no-such-checker"


def test_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `CI`, a missing tool skips the check and says how to install it."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install it"):
        find_tool(_MISSING, "apt-get install it")


def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `CI` set, a missing required tool fails; one the image brings still skips."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this check"):
        find_tool(_MISSING, "apt-get install it")
    with pytest.raises(pytest.skip.Exception):
        find_tool(_MISSING, "from the image", required_in_ci=False)


def test_tool_in_the_venv_is_found() -> None:
    """A program installed beside the interpreter (the venv's bin) is found without PATH."""
    assert find_tool("python", "the interpreter itself").endswith("python")
