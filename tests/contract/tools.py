"""External checkers the contract tests run (promtool, hadolint, kubernetes-validate, kubectl).

Missing on a developer's machine, a check is skipped and says how to get the tool; in CI
(`CI` set, as .ci/run runs) it fails instead, so a lost install step cannot pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["find_tool", "run_tool"]


def find_tool(name: str, how: str, *, required_in_ci: bool = True) -> str:
    """The path of the program `name`, from the venv or PATH; else skip (fail in CI) with `how`.

    Args:
        required_in_ci: False for a tool the machine image brings but no project file installs.
    """
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        message = f"{name} not installed ({how})"
        if required_in_ci and os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run this check", pytrace=False)
        pytest.skip(message)
    return found


def run_tool(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a checker to completion (bounded) and capture its output."""
    return subprocess.run(
        [program, *args], capture_output=True, text=True, timeout=120, check=False
    )
