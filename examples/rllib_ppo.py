"""PPO in Ray RLlib (new API stack) with AGaLiTe, or RLlib's own LSTM, on a memory task, with remote EnvRunners.

    python examples/rllib_ppo.py                                  # AGaLiTe, StatelessCartPole, 2 EnvRunners
    python examples/rllib_ppo.py --model lstm --timesteps 60000   # RLlib's DefaultModelConfig(use_lstm=True)
    python examples/rllib_ppo.py --env-runners 4 --num-cpus 4 --per-step-states

Needs ``pip install -e ".[rllib]"``. Prints one line per training iteration (env steps, mean episode return,
sampling env steps/s, learner env steps/s); ``--json PATH`` writes the curve and the throughputs.

By default the run keeps only the chunk-start states (``keep_chunk_start_states``); ``--per-step-states`` keeps
RLlib's default (every step's ``STATE_OUT`` stored in the episodes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

# Before Ray is imported: no usage-stats upload, no auth token written to ~/.ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig  # noqa: E402
from ray.rllib.core.rl_module.rl_module import RLModuleSpec  # noqa: E402
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole  # noqa: E402

from agalite_triton.rllib import AGaLiTeRLModule, keep_chunk_start_states  # noqa: E402

# The compared models: a 64-wide encoder layer, the memory, 64-wide policy and value heads. The memory: one AGaLiTe
# layer of width 64, or the LSTM cell with about as many parameters in all (RLlib's LSTM shared by policy and
# value here, as the AGaLiTe core is).
AGALITE_CORE = dict(d_model=64, n_layers=1, n_heads=4, d_head=16, d_ffc=64, eta=4, r=2)
LSTM_CELL = 116
ENCODER_HIDDENS = [64]
HEAD_HIDDENS = [64]


def make_config(args: argparse.Namespace, seed: int) -> PPOConfig:
    config = (
        PPOConfig()
        .environment(StatelessCartPole)
        .env_runners(num_env_runners=args.env_runners, num_envs_per_env_runner=args.envs_per_runner,
                     rollout_fragment_length="auto")
        .training(train_batch_size_per_learner=args.train_batch, minibatch_size=args.minibatch,
                  num_epochs=args.epochs, lr=args.lr, vf_loss_coeff=0.5, entropy_coeff=0.0)
        .fault_tolerance(restart_failed_env_runners=False, ignore_env_runner_failures=False)
        .debugging(seed=seed)
    )  # fmt: skip
    if args.model == "lstm":
        return config.rl_module(
            model_config=DefaultModelConfig(use_lstm=True, lstm_cell_size=LSTM_CELL, max_seq_len=args.max_seq_len,
                                            fcnet_hiddens=ENCODER_HIDDENS, head_fcnet_hiddens=HEAD_HIDDENS,
                                            vf_share_layers=True)
        )  # fmt: skip
    spec = RLModuleSpec(
        module_class=AGaLiTeRLModule,
        model_config=dict(max_seq_len=args.max_seq_len, core_config=dict(AGALITE_CORE), encoder_hiddens=ENCODER_HIDDENS,
                          head_hiddens=HEAD_HIDDENS),
    )
    config = config.rl_module(rl_module_spec=spec)
    return config if args.per_step_states else keep_chunk_start_states(config)


def _get(result: dict, path: str) -> float:
    for key in path.split("/"):
        result = result[key]
    return float(result)  # type: ignore[arg-type]


def train(args: argparse.Namespace, seed: int, log: bool = True) -> dict[str, Any]:
    """One run: the learning curve, and per-iteration throughputs from RLlib's timers (smoothed by RLlib, so only
    indicative: :func:`throughput` times them by hand)."""
    algo = make_config(args, seed).build_algo()
    try:
        module = algo.learner_group._learner.module["default_policy"]
        params = sum(p.numel() for p in module.parameters())
        curve, sampling, learning = [], [], []
        sampled_before = trained_before = 0.0
        start = time.perf_counter()
        while True:
            result = algo.train()
            sampled = _get(result, "env_runners/num_env_steps_sampled_lifetime")
            trained = _get(result, "learners/__all_modules__/num_env_steps_trained_lifetime")
            # Per iteration: env steps the runners sampled over the sampling call's time, and env steps the
            # learner trained on (over every epoch and minibatch) over the update's time.
            sampling.append((sampled - sampled_before) / _get(result, "timers/env_runner_sampling_timer"))
            learning.append((trained - trained_before) / _get(result, "timers/learner_update_timer"))
            sampled_before, trained_before = sampled, trained
            ret = result["env_runners"].get("episode_return_mean", float("nan"))
            curve.append(dict(env_steps=int(sampled), episode_return_mean=float(ret),
                              wall_s=round(time.perf_counter() - start, 2)))  # fmt: skip
            if log:
                print(f"{args.model:8s} seed {seed} steps {int(sampled):7d} return {ret:7.2f} sample "
                      f"{sampling[-1]:7.0f} env steps/s  learn {learning[-1]:7.0f} env steps/s", flush=True)
            if sampled >= args.timesteps:
                break
        return dict(model=args.model, seed=seed, params=params, curve=curve,
                    sampling_env_steps_per_s=statistics.median(sampling[1:] or sampling),
                    learner_env_steps_per_s=statistics.median(learning[1:] or learning))  # fmt: skip
    finally:
        algo.stop()


def throughput(args: argparse.Namespace, seed: int = 0, rounds: int = 3) -> dict[str, Any]:
    """Timed by hand, after one warm-up iteration: the remote EnvRunners sampling ``train_batch`` env steps in
    parallel (env steps/s), and the learner's PPO update on those episodes, its connector pipeline included
    (env steps trained, over every epoch, per second). Medians over ``rounds``."""
    algo = make_config(args, seed).build_algo()
    try:
        algo.train()
        per_runner = -(-args.train_batch // max(1, args.env_runners))
        sampling, learning = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            episodes = [ep for eps in algo.env_runner_group.foreach_env_runner(
                lambda runner: runner.sample(num_timesteps=per_runner, explore=True), local_env_runner=False)
                for ep in eps]  # fmt: skip
            sampled = time.perf_counter() - start
            steps = sum(len(ep) for ep in episodes)
            start = time.perf_counter()
            algo.learner_group.update(episodes=episodes, num_epochs=args.epochs, minibatch_size=args.minibatch,
                                      timesteps={"num_env_steps_sampled_lifetime": steps})  # fmt: skip
            learned = time.perf_counter() - start
            sampling.append(steps / sampled)
            learning.append(steps * args.epochs / learned)
        return dict(model=args.model, sampling_env_steps_per_s=statistics.median(sampling),
                    learner_env_steps_per_s=statistics.median(learning), rounds=rounds)  # fmt: skip
    finally:
        algo.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("agalite", "lstm"), default="agalite")
    p.add_argument("--timesteps", type=int, default=40_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--env-runners", type=int, default=2)
    p.add_argument("--envs-per-runner", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=2, help="the local Ray cluster's CPUs (one per EnvRunner)")
    p.add_argument("--train-batch", type=int, default=2000)
    p.add_argument("--minibatch", type=int, default=500)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-seq-len", type=int, default=20)
    p.add_argument("--per-step-states", action="store_true", help="keep RLlib's per-step STATE_OUT storage")
    p.add_argument("--json", default=None, help="write the runs (curves, throughputs) here")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        runs = [train(args, seed) for seed in args.seeds]
    finally:
        ray.shutdown()
    for run in runs:
        print(f"{run['model']} seed {run['seed']}: {run['params']} parameters, final return "
              f"{run['curve'][-1]['episode_return_mean']:.1f} at {run['curve'][-1]['env_steps']} env steps, "
              f"sampling {run['sampling_env_steps_per_s']:.0f} env steps/s, "
              f"learner {run['learner_env_steps_per_s']:.0f} env steps/s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), runs=runs), f, indent=1)
    return runs


if __name__ == "__main__":
    main()
