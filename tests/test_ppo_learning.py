"""End-to-end: PPO with an AGaLiTe core learns the cue-recall T-maze; a memoryless control does not.

Runs examples/ppo_memory.py's ``train`` on corridor 10; an AGaLiTe run stops once two consecutive rollouts
average >= 0.9 (about 6 s per seed on one idle thread), the control runs the full budget.
"""

import pytest

# The example trains on the gymnasium T-maze: without gymnasium (e.g. on the GPU machine) these tests skip.
pytest.importorskip("gymnasium", reason="needs gymnasium (examples/ppo_memory.py trains on the gymnasium T-maze)")

from .examples import load_example  # noqa: E402

TIMESTEPS = 98_304  # 24 iterations of 32 envs x 128 steps: "within 100k environment steps"


def _run(core: str, seed: int, stop_after_target: int = 0) -> dict:
    ppo = load_example("ppo_memory.py")
    cfg = ppo.PPOConfig(
        core=core, corridor=10, seed=seed, total_timesteps=TIMESTEPS, hidden=64, n_layers=1, n_heads=4,
        d_head=16, d_ffc=64, eta=4, r=2, backend="reference", threads=1, stop_after_target=stop_after_target,
    )
    return ppo.train(cfg, run_dir=None, progress=False)


@pytest.mark.slow
def test_agalite_learns_cue_recall():
    results = [_run("agalite", seed, stop_after_target=2) for seed in (1, 2, 3)]
    # Solved: two consecutive rollouts (about 400 episodes each) with mean return >= 0.9, within budget.
    solved = [r["final_return"] >= 0.9 and r["steps_to_target"] is not None for r in results]
    finals = [r["final_return"] for r in results]
    steps = [r["steps_to_target"] for r in results]
    assert sum(solved) >= 2, f"final mean returns per seed {finals}, steps to 0.9 {steps}"


@pytest.mark.slow
def test_memoryless_control_cannot():
    result = _run("none", 1)
    best = max(p["mean_return"] for p in result["curve"])
    assert best <= 0.3, f"memoryless policy reached {best} on a task that needs memory"
