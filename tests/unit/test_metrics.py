"""Unit tests of `service._observe.metrics` that need no traffic: the build-info series."""

from __future__ import annotations

import platform
from importlib import metadata

import aio_pika
from prometheus_client import REGISTRY

from service._observe import metrics


def test_build_info_names_the_running_versions() -> None:
    """`burrow_build_info` is one series, set to 1, labelled with Burrow, Python and aio-pika."""
    (family,) = [f for f in REGISTRY.collect() if f.name == "burrow_build_info"]
    assert family.type == "gauge"
    (sample,) = family.samples
    assert sample.value == 1.0
    assert sample.labels == {
        "version": metadata.version("burrow"),
        "python_version": platform.python_version(),
        "aio_pika_version": aio_pika.__version__,
    }


def test_build_info_survives_missing_metadata() -> None:
    """A distribution without installed metadata is labelled `unknown` rather than failing."""
    assert metrics._installed_version("no-such-distribution-for-burrow") == "unknown"
