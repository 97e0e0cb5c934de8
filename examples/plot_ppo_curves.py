"""Collect ppo_memory.py runs into one figure, one curves CSV and one summary JSON.

    python examples/plot_ppo_curves.py --runs examples/runs --corridor 20 --out examples/results/tmaze_corridor20
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

COLORS = {"agalite": "tab:blue", "galite": "tab:brown", "lstm": "tab:orange", "none": "tab:grey"}


def load_runs(runs: Path, corridor: int) -> list[dict]:
    found = []
    for path in sorted(runs.glob("*/metrics.json")):
        result = json.loads(path.read_text())
        # POPGym runs (examples/plot_popgym.py) carry a corridor setting too, which they ignore.
        if result["config"].get("env", "tmaze") == "tmaze" and result["config"]["corridor"] == corridor:
            found.append(result)
    if not found:
        raise FileNotFoundError(f"runs: no metrics.json with corridor={corridor} under {runs}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "runs")
    parser.add_argument("--corridor", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="output prefix; writes .png, .csv, .json")
    args = parser.parse_args()
    results = load_runs(args.runs, args.corridor)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labelled = set()
    for res in sorted(results, key=lambda r: (r["config"]["core"], r["config"]["seed"])):
        core = res["config"]["core"]
        steps = [p["global_step"] for p in res["curve"]]
        label = None if core in labelled else f"{core} ({sum(r['config']['core'] == core for r in results)} seeds)"
        labelled.add(core)
        ax.plot(steps, [p["mean_return"] for p in res["curve"]], color=COLORS.get(core), alpha=0.8, label=label)
    target = results[0]["config"]["target_return"]
    ax.axhline(target, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episode return per rollout")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(f"PPO on the cue-recall T-maze, corridor {args.corridor} (1 CPU thread per run)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    plt.close(fig)

    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["core", "seed", "global_step", "mean_return", "success_rate", "wall_s", "sps"])
        for res in results:
            for p in res["curve"]:
                writer.writerow([res["config"]["core"], res["config"]["seed"], p["global_step"],
                                 f"{p['mean_return']:.4f}", f"{p['success_rate']:.4f}", f"{p['wall_s']:.2f}",
                                 f"{p['sps']:.0f}"])
    summary = [
        {
            "core": res["config"]["core"], "seed": res["config"]["seed"],
            "final_return": res["final_return"], "steps_to_target": res["steps_to_target"],
            "wall_s": round(res["wall_s"], 2), "sps": round(res["sps"]), "threads": res["threads"],
            "total_steps": res["curve"][-1]["global_step"],
        }
        for res in sorted(results, key=lambda r: (r["config"]["core"], r["config"]["seed"]))
    ]
    args.out.with_suffix(".json").write_text(json.dumps({"config": results[0]["config"], "runs": summary}, indent=1))
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
