"""Burrow's benchmark suite: Burrow and its peers on the same workloads, side by side.

Run `make bench` (full) or `make bench-quick` (smoke); see bench/README.md.
"""

from __future__ import annotations

__all__: list[str] = []
