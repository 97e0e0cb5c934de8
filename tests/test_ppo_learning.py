"""End-to-end: PPO with an AGaLiTe core learns the cue-recall T-maze; a memoryless control does not.

Runs examples/ppo_memory.py's ``train`` on corridor 10 (about 15 s per seed on one thread).
"""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ppo_memory.py"
TIMESTEPS = 98_304  # 24 iterations of 32 envs x 128 steps: "within 100k environment steps"


def _example():
    spec = importlib.util.spec_from_file_location("ppo_memory_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(core: str, seed: int) -> dict:
    ppo = _example()
    cfg = ppo.PPOConfig(
        core=core, corridor=10, seed=seed, total_timesteps=TIMESTEPS, hidden=64, n_layers=1, n_heads=4,
        d_head=16, d_ffc=64, eta=4, r=2, backend="reference", threads=1,
    )
    return ppo.train(cfg, run_dir=None, progress=False)


@pytest.mark.slow
def test_agalite_learns_cue_recall():
    results = [_run("agalite", seed) for seed in (1, 2, 3)]
    finals = [r["final_return"] for r in results]
    solved = [f >= 0.9 and r["steps_to_target"] is not None for f, r in zip(finals, results)]
    steps = [r["steps_to_target"] for r in results]
    assert sum(solved) >= 2, f"final mean returns per seed {finals}, steps to 0.9 {steps}"


@pytest.mark.slow
def test_memoryless_control_cannot():
    result = _run("none", 1)
    best = max(p["mean_return"] for p in result["curve"])
    assert best <= 0.3, f"memoryless policy reached {best} on a task that needs memory"
