"""Draws bench/results/bench.png from a results document: W1/W2/W3/W6/W7 side by side, W5's CPU
per process, W4 scaling.

Bars are medians with min-max whiskers, one per tool row found (Burrow's rows green); the W5
panel stacks client, server and broker CPU per 10,000 calls; the W4 panel also shows the
broker's CPU share.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

__all__ = ["plot"]

# Bar panels, placed at these positions of the 2x4 grid; 3 is W5's CPU, 6 is W4.
_PANELS = [
    ("W1", "calls_per_s", "W1 rpc latency: sequential calls/s"),
    ("W2", "calls_per_s", "W2 rpc throughput: calls/s, 64 in flight"),
    ("W3", "events_per_s", "W3 events: end-to-end events/s"),
    ("W6", "submits_per_s", "W6 submit: submits/s, 64 in flight"),
    ("W6", "jobs_per_s", "W6 submit: jobs/s, first submit to last result"),
    ("W7", "calls_per_s", "W7 gateway: HTTP calls/s, 64 concurrent"),
]
_AT = (0, 1, 2, 4, 5, 7)
_CPU_AT, _W4_AT = 3, 6
_CPU = [  # W5's stacked parts: (metric, label, colour)
    ("client_cpu_s_per_10k", "client", "tab:blue"),
    ("server_cpu_s_per_10k", "server", "tab:green"),
    ("broker_cpu_s_per_10k", "broker", "tab:orange"),
]


def plot(doc: dict[str, Any], out: Path) -> Path:
    """Write the figure and return its path."""
    import matplotlib  # noqa: PLC0415 - a bench-only dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 4, figsize=(22, 8.5))
    rows = doc["results"]
    for at, (workload, metric, title) in zip(_AT, _PANELS, strict=True):
        ax = axes.flat[at]
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
    _cpu_panel(axes.flat[_CPU_AT], rows)
    ax = axes.flat[_W4_AT]
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


def _cpu_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """W5: client, server and broker CPU seconds per 10,000 W2 calls, stacked per tool."""
    cpu = {
        (r["tool"], r["metric"]): r["median"]
        for r in rows
        if r["workload"] == "W5" and r["metric"] in {m for m, _, _ in _CPU}
    }
    tools = list(dict.fromkeys(tool for tool, _ in cpu))
    bottom = [0.0] * len(tools)
    for metric, label, color in _CPU:
        part = [cpu.get((tool, metric), 0.0) for tool in tools]
        ax.bar(tools, part, bottom=bottom, color=color, label=label)
        bottom = [b + p for b, p in zip(bottom, part, strict=True)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:.2f}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_title("W5 CPU s per 10,000 W2 calls (lower is better)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    if tools:
        ax.legend(fontsize=8)


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    print(plot(orjson.loads(source.read_bytes()), source.with_name("bench.png")))
