"""Collect ``ppo_memory.py --env popgym:<Name>`` runs into one figure, one curves CSV and one summary JSON.

    python examples/plot_popgym.py --out examples/results/popgym                          # --update-epochs 16
    python examples/plot_popgym.py --update-epochs 4 --out examples/results/popgym_epochs4

reads every ``examples/runs/popgym-*/metrics.json`` trained with ``--update-epochs`` PPO epochs per
rollout (default 16, the README's main table; 4 is the example's default), labels each run by its
core and by whatever it sets differently from the defaults below (``agalite r=8``, ``agalite r=8
adam_eps=1e-08``...), keeps the labels asked for (``--labels``, default: the five cores of the
README's table), and writes ``<out>.png`` (one panel per environment: every seed thin, the mean over
seeds thick), ``<out>_curves.csv`` and ``<out>_summary.json``, and prints the README's table.
"final" is the mean return of the episodes that ended in the last rollout, "last 5" the mean of the
last five rollouts' means.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What a run may change without it showing in its label (the budget is checked to be one for all).
DEFAULTS = {"eta": 4, "adam_eps": 1e-5, "learning_rate": 1e-3, "hidden": 64, "n_layers": 1, "n_heads": 4,
            "d_head": 16, "d_ffc": 64, "popgym_prev_action": False}  # fmt: skip
MAIN = ["agalite r=2", "agalite r=4", "agalite r=8", "lstm", "none"]
COLORS = {"agalite r=2": "tab:cyan", "agalite r=3": "tab:olive", "agalite r=4": "tab:blue",
          "agalite r=5": "tab:purple", "agalite r=8": "tab:red", "lstm": "tab:orange", "none": "tab:grey"}  # fmt: skip


def label(cfg: dict) -> str:
    parts = [cfg["core"] + (f" r={cfg['r']}" if cfg["core"] == "agalite" else "")]
    for key, default in DEFAULTS.items():
        if key in ("eta",) and cfg["core"] != "agalite":
            continue
        if cfg.get(key, default) != default:
            parts.append(f"{key}={cfg[key]:g}" if isinstance(cfg[key], float) else f"{key}={cfg[key]}")
    return " ".join(parts)


def load(runs: Path) -> list[dict]:
    found = []
    for path in sorted(runs.glob("popgym-*/metrics.json")):
        res = json.loads(path.read_text())
        res["label"] = label(res["config"])
        res["env_name"] = res["config"]["env"].split(":", 1)[1]
        found.append(res)
    if not found:
        raise FileNotFoundError(f"runs: no popgym-*/metrics.json under {runs}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=HERE / "runs")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "popgym")
    parser.add_argument("--labels", nargs="+", default=MAIN)
    parser.add_argument("--envs", nargs="+", default=None, help="default: every environment found")
    parser.add_argument("--update-epochs", type=int, default=16, help="keep the runs with this many PPO epochs")
    args = parser.parse_args()
    results = [r for r in load(args.runs) if r["label"] in args.labels]
    results = [r for r in results if r["config"]["update_epochs"] == args.update_epochs]
    if not results:
        raise FileNotFoundError(f"runs: none under {args.runs} with update_epochs={args.update_epochs} and a label in "
                                f"{args.labels}")  # fmt: skip
    envs = args.envs or sorted({r["env_name"] for r in results})
    results = [r for r in results if r["env_name"] in envs]
    budgets = {(r["config"]["total_timesteps"], r["config"]["num_envs"], r["config"]["num_steps"]) for r in results}
    if len(budgets) != 1:
        raise ValueError(f"runs: expected one budget (total_timesteps, num_envs, num_steps), got {sorted(budgets)}")
    minibatches = {r["config"]["num_minibatches"] for r in results}
    if len(minibatches) != 1:
        raise ValueError(f"runs: expected one num_minibatches for all runs, got {sorted(minibatches)}")

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for res in sorted(results, key=lambda r: r["config"]["seed"]):
        groups[(res["env_name"], res["label"])].append(res)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ncols = min(len(envs), 2)
    nrows = -(-len(envs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(envs) :]:
        ax.set_visible(False)
    for ax, env in zip(axes.flat, envs):
        for lab in args.labels:
            runs = groups.get((env, lab), [])
            if not runs:
                continue
            # A variant (a label with settings after the core) is drawn dashed in its core's colour.
            base = " ".join(lab.split()[:2]) if lab.startswith("agalite") else lab.split()[0]
            color, style = COLORS.get(base), "-" if base == lab else "--"
            steps = [p["global_step"] for p in runs[0]["curve"]]
            for res in runs:
                ax.plot(steps, [p["mean_return"] for p in res["curve"]], color=color, alpha=0.25, linewidth=0.8,
                        linestyle=style)  # fmt: skip
            mean = [statistics.fmean(res["curve"][i]["mean_return"] for res in runs) for i in range(len(steps))]
            ax.plot(steps, mean, color=color, linewidth=2, linestyle=style, label=f"{lab} ({len(runs)} seeds)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
        ax.set_ylabel("mean episode return per rollout")
        ax.legend(loc="best", fontsize=7)
    cfg0 = results[0]["config"]
    fig.suptitle(f"PPO on POPGym, {cfg0['num_envs']} envs x {cfg0['num_steps']} steps per rollout, "
                 f"{cfg0['update_epochs']} epochs x {cfg0['num_minibatches']} minibatches "
                 "(thin: seeds, thick: mean)")  # fmt: skip
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=80)
    plt.close(fig)

    with open(args.out.parent / f"{args.out.name}_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env", "core", "seed", "global_step", "mean_return", "episodes", "wall_s", "sps"])
        for (env, lab), runs in sorted(groups.items()):
            for res in runs:
                for p in res["curve"]:
                    writer.writerow([env, lab, res["config"]["seed"], p["global_step"], f"{p['mean_return']:.4f}",
                                     p["episodes"], f"{p['wall_s']:.2f}", f"{p['sps']:.0f}"])  # fmt: skip

    summary = []
    for (env, lab), runs in sorted(groups.items()):
        finals = [res["curve"][-1]["mean_return"] for res in runs]
        last5 = [statistics.fmean(p["mean_return"] for p in res["curve"][-5:]) for res in runs]
        summary.append({
            "env": env, "core": lab, "seeds": [res["config"]["seed"] for res in runs],
            "final": [round(v, 3) for v in finals], "last5": [round(v, 3) for v in last5],
            "last5_mean": round(statistics.fmean(last5), 3),
            "last5_sd": round(statistics.stdev(last5), 3) if len(last5) > 1 else None,
            "wall_s": [round(res["wall_s"], 1) for res in runs], "sps": [round(res["sps"]) for res in runs],
            "max_replay_err": max(p["replay_err"] for res in runs for p in res["curve"]),
        })  # fmt: skip
    total, num_envs, num_steps = budgets.pop()
    steps = results[0]["curve"][-1]["global_step"]
    shared = {k: v for k, v in results[0]["config"].items() if k not in ("core", "r", "seed", "env")}
    meta = {"budget": {"total_timesteps": total, "steps_run": steps, "num_envs": num_envs, "num_steps": num_steps},
            "config": shared}  # fmt: skip
    (args.out.parent / f"{args.out.name}_summary.json").write_text(json.dumps({**meta, "runs": summary}, indent=1))

    print("| env | core | final return per seed | mean of last 5 rollouts (mean ± sd over seeds) | wall s per run |")
    print("| --- | --- | --- | --- | --- |")
    for row in summary:
        sd = f" ± {row['last5_sd']:.2f}" if row["last5_sd"] is not None else ""
        finals = " / ".join(f"{v:.2f}" for v in row["final"])
        wall = f"{min(row['wall_s']):.0f}–{max(row['wall_s']):.0f}"
        print(f"| {row['env']} | {row['core']} | {finals} | {row['last5_mean']:.2f}{sd} | {wall} |")


if __name__ == "__main__":
    main()
