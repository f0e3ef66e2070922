"""Draws bench/results/bench.png from a results document: W1/W2/W3/W6 side by side, W4 scaling.

Bars are medians with min-max whiskers; the W4 panel also shows the broker's CPU share.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

__all__ = ["plot"]

_PANELS = [
    ("W1", "calls_per_s", "W1 rpc latency: sequential calls/s"),
    ("W2", "calls_per_s", "W2 rpc throughput: calls/s, 64 in flight"),
    ("W3", "events_per_s", "W3 events: end-to-end events/s"),
    ("W6", "submits_per_s", "W6 submit: submits/s, 64 in flight"),
    ("W6", "jobs_per_s", "W6 submit: jobs/s, first submit to last result"),
]


def plot(doc: dict[str, Any], out: Path) -> Path:
    """Write the figure and return its path."""
    import matplotlib  # noqa: PLC0415 - a bench-only dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    rows = doc["results"]
    for ax, (workload, metric, title) in zip(axes.flat, _PANELS, strict=False):
        picked = [r for r in rows if r["workload"] == workload and r["metric"] == metric]
        names = [r["tool"] for r in picked]
        med = [r["median"] for r in picked]
        err = [
            [r["median"] - r["min"] for r in picked],
            [r["max"] - r["median"] for r in picked],
        ]
        colors = ["tab:green" if n.startswith("burrow") else "tab:gray" for n in names]
        ax.bar(names, med, yerr=err, color=colors, capsize=4)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        for x, value in enumerate(med):
            ax.annotate(f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax = axes.flat[len(_PANELS)]
    scale = sorted(
        (r for r in rows if r["workload"] == "W4" and r["metric"] == "calls_per_s"),
        key=lambda r: int(r["tool"].rsplit("-", 1)[1]),
    )
    workers = [int(r["tool"].rsplit("-", 1)[1]) for r in scale]
    ax.errorbar(
        workers,
        [r["median"] for r in scale],
        yerr=[[r["median"] - r["min"] for r in scale], [r["max"] - r["median"] for r in scale]],
        marker="o",
        color="tab:green",
        label="burrow calls/s",
    )
    ax.set_xticks(workers)
    ax.set_xlabel("server processes")
    ax.set_title("W4 scale-out (W2 against N Burrow servers)", fontsize=10)
    broker = {
        int(r["tool"].rsplit("-", 1)[1]): r["median"]
        for r in rows
        if r["workload"] == "W4" and r["metric"] == "broker_cpu_cores"
    }
    if broker:
        twin = ax.twinx()
        twin.plot(list(broker), list(broker.values()), "s--", color="tab:orange")
        twin.set_ylabel("broker CPU (cores)", color="tab:orange")
        twin.set_ylim(0, 2)
    fig.suptitle(f"Burrow benchmarks — RabbitMQ {doc['rabbitmq']}, Python {doc['python']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    print(plot(orjson.loads(source.read_bytes()), source.with_name("bench.png")))
