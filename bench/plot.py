"""PNG of throughput against batch size, one panel per workload, one line per system."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]

MARKERS = {"agalite": "o", "recurrence": "o", "gtrxl": "s", "lstm": "^"}


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import TITLES

    workloads = list(dict.fromkeys(r["workload"] for r in doc["results"]))
    if not workloads:
        raise ValueError("doc: no results to plot")
    cols = min(2, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    for ax in axes.flat[len(workloads) :]:
        ax.set_visible(False)
    for ax, workload in zip(axes.flat, workloads):
        rows = [r for r in doc["results"] if r["workload"] == workload and r["status"] == "ok"]
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            style = "-" if dtype == "float32" else "--"
            for label in dict.fromkeys(r["label"] for r in rows):
                pts = sorted((r["batch"], r["throughput"]) for r in rows if r["label"] == label and r["dtype"] == dtype)
                if not pts:
                    continue
                name = label if len(doc["config"]["dtypes"]) == 1 else f"{label} {dtype}"
                family = next(r["family"] for r in rows if r["label"] == label)
                ax.plot(*zip(*pts), style, marker=MARKERS.get(family, "o"), label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(rows[0]["unit"] if rows else "")
        ax.set_title(TITLES.get(workload, workload), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    dev = doc["device"]
    threads = f"{dev['threads']} thread" + ("s" if dev["threads"] != 1 else "")
    fig.suptitle(f"{dev['name']} ({dev['type']}, {threads}), {doc['created'][:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
