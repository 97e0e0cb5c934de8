"""The session's two PNGs, from ``gpu.jsonl``: ``figures.png`` (recurrence time against the reference,
rollout steps/s, training samples/s) and ``sweep.png`` (each kernel's candidates, by median time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_all"]


def _bars(ax: Any, labels: list[str], values: list[float], title: str, unit: str, log: bool = True) -> None:
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    if log and values and min(values) > 0:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)


def _figures(records: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rec = [r for r in records if r.get("stage") == "figures" and r.get("status") in ("ok", "skipped")
           and isinstance(r.get("median_s"), (int, float))]  # fmt: skip
    if not rec:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 7))
    rr = [r for r in rec if r.get("figure") == "recurrence"]
    _bars(axes[0], [f"{r['system']} {r['mode'].replace('forward_backward', 'fwd+bwd')} {r['dtype']} {r['variant']}"
                    for r in rr], [r["median_s"] * 1e3 for r in rr], "agalite_recurrence, B x T = "
          f"{rr[0]['batch']} x {rr[0]['seq_len']}" if rr else "recurrence", "ms per call")  # fmt: skip
    ro = [r for r in rec if r.get("figure") == "rollout"]
    _bars(axes[1], [r["label"] for r in ro], [r["throughput"] for r in ro],
          f"rollout, B = {ro[0]['batch']}" if ro else "rollout", "env-steps/s")  # fmt: skip
    tr = [r for r in rec if r.get("figure") == "training"]
    _bars(axes[2], [f"{r['label']} {r['dtype']}" for r in tr], [r["throughput"] for r in tr],
          f"training, B x T = {tr[0]['batch']} x {tr[0]['seq_len']}" if tr else "training", "samples/s")  # fmt: skip
    first = records[0]
    versions = first.get("versions", {})
    dry = " (DRY RUN)" if first.get("dry_run") else ""
    fig.suptitle(f"{first.get('device', {}).get('name')} - torch {versions.get('torch')}, "
                 f"triton {versions.get('triton')}{dry}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep(records: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rec = [r for r in records if r.get("stage") == "sweep" and r.get("status") == "ok"
           and isinstance(r.get("median_s"), (int, float))]  # fmt: skip
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rec:
        groups.setdefault((r["sweep_kernel"], r["shape_id"]), []).append(r)
    if not groups:
        return None
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rs = sorted(groups[key], key=lambda r: r["median_s"])[:40]
        c = lambda r: "w{num_warps} s{num_stages} c{chunk} x{split}".format(**r["candidate"]) + (
            " *" if r.get("is_default") else "")  # fmt: skip
        _bars(ax, [c(r) for r in rs], [r["median_s"] * 1e3 for r in rs], f"{key[0]} {key[1]}", "ms", log=False)
    fig.suptitle("launch-configuration sweep (fastest 40 per panel; * = default)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(records: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # headless
    written = []
    for fn, name in ((_figures, "figures.png"), (_sweep, "sweep.png")):
        p = fn(records, out_dir / name)
        if p is not None:
            written.append(p.name)
    return written
