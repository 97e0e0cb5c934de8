"""AGaLiTe vs RLlib's LSTM (``use_lstm=True``) in RLlib PPO, side by side in one run, and the bytes of recurrent
state RLlib keeps per env step for each preset.

    python examples/rllib_compare.py                 # 3 seeds each -> examples/results/rllib_vs_lstm.{csv,json,png}
    python examples/rllib_compare.py --throughput    # re-times sampling and learning into rllib_vs_lstm.json
    python examples/rllib_compare.py --state-bytes   # -> examples/results/rllib_state_bytes.json

The comparison uses ``examples/rllib_ppo.py``'s models (about equal parameter counts) and settings; every run
samples the same number of env steps on the same local Ray cluster, one after the other. Throughputs are timed by
hand (``rllib_ppo.throughput``), not read from RLlib's smoothed timers. The state bytes are
measured on episodes a local EnvRunner sampled (CartPole, 400 env steps per preset), with RLlib's per-step
``STATE_OUT`` and with ``keep_chunk_start_states``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Before Ray is imported: no usage-stats upload, no auth token written to ~/.ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray  # noqa: E402
import rllib_ppo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return dict(cpu=cpu, cpus=os.cpu_count(), load_avg=list(os.getloadavg()))


def compare(argv: list[str]) -> None:
    p = rllib_ppo.parser()
    p.set_defaults(seeds=[0, 1, 2], timesteps=30_000, epochs=4)
    args = p.parse_args(argv)
    before = machine()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    runs, speeds = [], []
    try:
        for seed in args.seeds:
            for model in ("agalite", "lstm"):
                args.model = model
                runs.append(rllib_ppo.train(args, seed))
        for model in ("agalite", "lstm"):
            args.model = model
            speeds.append(rllib_ppo.throughput(args))
            print(speeds[-1], flush=True)
    finally:
        ray.shutdown()
    after = machine()
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "rllib_vs_lstm.json", "w") as f:
        json.dump(dict(args={k: v for k, v in vars(args).items() if k != "model"}, machine_before=before,
                       machine_after=after, throughput=speeds, runs=runs), f, indent=1)  # fmt: skip
    with open(RESULTS / "rllib_vs_lstm.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "seed", "params", "env_steps", "episode_return_mean", "wall_s",
                         "sampling_env_steps_per_s", "learner_env_steps_per_s"])  # fmt: skip
        for run in runs:
            for point in run["curve"]:
                writer.writerow([run["model"], run["seed"], run["params"], point["env_steps"],
                                 point["episode_return_mean"], point["wall_s"], round(run["sampling_env_steps_per_s"]),
                                 round(run["learner_env_steps_per_s"])])  # fmt: skip
    plot(runs, before, after)


def throughput_only(argv: list[str]) -> None:
    """Re-measure the throughputs into an existing ``rllib_vs_lstm.json`` (its settings), with the load."""
    path = RESULTS / "rllib_vs_lstm.json"
    data = json.loads(path.read_text())
    args = rllib_ppo.parser().parse_args([])
    for key, value in data["args"].items():
        setattr(args, key, value)
    before = machine()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    speeds = []
    try:
        for model in ("agalite", "lstm"):
            args.model = model
            speeds.append(rllib_ppo.throughput(args))
            print(speeds[-1], flush=True)
    finally:
        ray.shutdown()
    data.update(throughput=speeds, throughput_machine_before=before, throughput_machine_after=machine())
    path.write_text(json.dumps(data, indent=1))


def plot(runs: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"agalite": "tab:blue", "lstm": "tab:orange"}
    for run in runs:
        steps = [p["env_steps"] for p in run["curve"]]
        label = f"{run['model']} ({run['params']:,} params)" if run["seed"] == runs[0]["seed"] else None
        ax.plot(steps, [p["episode_return_mean"] for p in run["curve"]], color=colors[run["model"]], alpha=0.8,
                label=label)  # fmt: skip
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean episode return")
    ax.set_title(f"RLlib PPO on StatelessCartPole, 3 seeds each\n{before['cpu']}, {before['cpus']} CPUs, "
                 f"load {before['load_avg'][0]:.1f} before / {after['load_avg'][0]:.1f} after", fontsize=9)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "rllib_vs_lstm.png", dpi=120)


def state_bytes(steps: int = 400) -> None:
    """Bytes of recurrent state kept in the sampled episodes, per env step, for every preset, both storages."""
    import numpy as np
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from agalite_triton import AGaLiTe
    from agalite_triton.presets import PRESETS
    from agalite_triton.rllib import CUSTOM_KEY, AGaLiTeRLModule, keep_chunk_start_states

    max_seq_len = 20
    rows = []
    for preset in PRESETS:
        size = AGaLiTe.from_preset(preset, input_dim=4).state_size
        row: dict[str, Any] = dict(preset=preset, state_size=size, state_bytes=4 * size, max_seq_len=max_seq_len)
        for storage in ("per_step", "chunk_starts"):
            config = (
                PPOConfig()
                .environment("CartPole-v1")
                .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
                .rl_module(rl_module_spec=RLModuleSpec(module_class=AGaLiTeRLModule, model_config=dict(
                    max_seq_len=max_seq_len, core_config=dict(preset=preset, dropout=0.0))))
            )  # fmt: skip
            if storage == "chunk_starts":
                keep_chunk_start_states(config)
            algo = config.build_algo()
            try:
                episodes = algo.env_runner.sample(num_timesteps=steps, explore=True)
            finally:
                algo.stop()
            n = sum(len(ep) for ep in episodes)
            if storage == "per_step":
                kept = sum(ep.get_extra_model_outputs(Columns.STATE_OUT)["state"].nbytes for ep in episodes)
            else:
                arrays = {}
                for ep in episodes:
                    data = ep.custom_data[CUSTOM_KEY]
                    for a in [*data["starts"].values(), data["last"]]:
                        if isinstance(a, np.ndarray):
                            arrays[id(a)] = a
                kept = sum(a.nbytes for a in arrays.values())
            row[f"{storage}_bytes_per_env_step"] = round(kept / n, 1)
            row[f"{storage}_mb_per_1000_steps"] = round(kept / n * 1000 / 1e6, 3)
            row["sampled_env_steps"] = n
        rows.append(row)
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "rllib_state_bytes.json", "w") as f:
        json.dump(dict(machine=machine(), rows=rows), f, indent=1)


if __name__ == "__main__":
    if "--state-bytes" in sys.argv:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            state_bytes()
        finally:
            ray.shutdown()
    elif "--throughput" in sys.argv:
        throughput_only(sys.argv[1:])
    else:
        compare(sys.argv[1:])
