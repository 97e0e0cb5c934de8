"""Draw the one-change-at-a-time PPO runs of ``diagnose_count.py --ppo`` and print their table.

    python examples/plot_hypotheses.py --out examples/results/hypotheses \\
        examples/results/countrecall_ppo.json examples/results/repeatprevious_ppo.json

One panel per environment: each hypothesis's mean return over its seeds per rollout (a thick line) with
the spread of its seeds (a band from the lowest to the highest), and, for reference, the README table's
LSTM, GaLiTe and memoryless MLP at the same budget (dotted, from ``popgym_curves.csv`` and
``popgym_galite_curves.csv``). Writes ``<out>.png`` and
``<out>_summary.csv`` (per hypothesis: the last-5-rollout return of each seed, their mean and sd, and
the wall time per run) and prints the table in the README's form.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCES = {"lstm": "black", "galite": "saddlebrown", "none": "grey"}


def load(paths: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """env -> hypothesis -> runs (sorted by seed), with one budget per environment."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for row in json.loads(path.read_text())["ppo"]:
            groups[row["env"]][row["hypothesis"]].append(row)
    for env, by_name in groups.items():
        budgets = {tuple(run["steps"]) for runs in by_name.values() for run in runs}
        if len(budgets) != 1:
            raise ValueError(f"runs: expected one budget for {env}, got {len(budgets)} different step lists")
        for runs in by_name.values():
            runs.sort(key=lambda run: run["seed"])
    return groups


def references(curves: list[Path], env: str) -> dict[str, tuple[list[int], list[float]]]:
    """The README table's LSTM, GaLiTe and MLP curves for ``env``, as the mean over their seeds."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in curves:
        with open(path) as f:
            for row in csv.DictReader(f):
                if f"popgym:{row['env']}" == env and row["core"] in REFERENCES:
                    points[row["core"]][int(row["global_step"])].append(float(row["mean_return"]))
    return {core: (sorted(p), [statistics.fmean(p[s]) for s in sorted(p)]) for core, p in points.items()}


def summarise(runs: list[dict]) -> dict:
    last5 = [run["last5"] for run in runs]
    return {
        "seeds": [run["seed"] for run in runs],
        "last5": [round(v, 3) for v in last5],
        "mean": statistics.fmean(last5),
        "sd": statistics.stdev(last5) if len(last5) > 1 else float("nan"),
        "wall_s": (min(run["wall_s"] for run in runs), max(run["wall_s"] for run in runs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="diagnose_count.py --ppo output files")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "hypotheses")
    tables = [HERE / "results" / "popgym_curves.csv", HERE / "results" / "popgym_galite_curves.csv"]
    parser.add_argument("--curves", type=Path, nargs="*", default=tables)
    args = parser.parse_args()
    groups = load(args.results)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(groups), figsize=(7.5 * len(groups), 5.2), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    rows = []
    for ax, (env, by_name) in zip(axes.flat, sorted(groups.items())):
        for i, (name, runs) in enumerate(sorted(by_name.items())):
            steps = runs[0]["steps"]
            per_step = list(zip(*(run["returns"] for run in runs)))
            mean = [statistics.fmean(v) for v in per_step]
            colour = colours[i % len(colours)]
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=colour, alpha=0.12)
            ax.plot(steps, mean, color=colour, linewidth=1.6, label=f"{name} ({len(runs)} seeds)")
            rows.append({"env": env, "hypothesis": name, **summarise(runs)})
        for core, (steps, mean) in references(args.curves, env).items():
            ax.plot(steps, mean, color=REFERENCES[core], linestyle=":", linewidth=1.6, label=f"table's {core}")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        ax.set_title(f"{env}: one change at a time (band: seeds' range)")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("mean episode return per rollout")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=80)
    plt.close(fig)

    with open(args.out.parent / f"{args.out.name}_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env", "hypothesis", "seeds", "last5_per_seed", "last5_mean", "last5_sd", "wall_s_min",
                         "wall_s_max"])  # fmt: skip
        for row in rows:
            writer.writerow([row["env"], row["hypothesis"], " ".join(map(str, row["seeds"])),
                             " ".join(f"{v:.3f}" for v in row["last5"]), f"{row['mean']:.3f}", f"{row['sd']:.3f}",
                             f"{row['wall_s'][0]:.0f}", f"{row['wall_s'][1]:.0f}"])  # fmt: skip
    print("| env | hypothesis | last-5 return, mean ± sd (per seed) | wall s per run |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        seeds = " / ".join(f"{v:.2f}" for v in row["last5"])
        wall = f"{row['wall_s'][0]:.0f}–{row['wall_s'][1]:.0f}"
        print(f"| {row['env']} | {row['hypothesis']} | {row['mean']:.2f} ± {row['sd']:.2f} ({seeds}) | {wall} |")


if __name__ == "__main__":
    main()
