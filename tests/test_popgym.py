"""The PPO example's POPGym path: real POPGym environments through gymnasium's SyncVectorEnv.

Checks the observation encoding (one-hots of Discrete / MultiDiscrete / Tuple spaces, MultiDiscrete
actions flattened, previous-action wrappers where the env asks for them), that a few thousand steps of
PPO run with the replay check inside every update holding, and that this check does fail when the
replay starts from the wrong states.
"""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="gymnasium is not installed (pip install -e '.[rl]')")
pytest.importorskip("popgym", reason="popgym is not installed (pip install -e '.[rl]', which pins popgym==1.0.7)")

from .examples import load_example  # noqa: E402


@pytest.fixture(scope="module")
def ppo():
    return load_example("ppo_memory.py")


def _config(ppo, env: str, core: str = "agalite", iterations: int = 3, **kw):
    # 8 envs x 128 steps per rollout; a small model, one thread.
    return ppo.PPOConfig(
        env=f"popgym:{env}", core=core, seed=3, num_envs=8, num_steps=128, total_timesteps=iterations * 8 * 128,
        hidden=32, n_layers=1, n_heads=2, d_head=8, d_ffc=32, eta=2, r=4, backend="reference", threads=1, **kw,
    )


# (env, flat observation width, number of one-hot groups per observation, actions)
SPACES = [
    ("RepeatPreviousEasy", 4, 1, 4),  # Discrete(4) suit
    ("CountRecallEasy", 4, 2, 27),  # MultiDiscrete([2, 2]): dealt card, queried card
    ("AutoencodeEasy", 6, 2, 4),  # Tuple(Discrete(2), Discrete(4)): phase flag, suit
    # Discrete(3) cell + previous action MultiDiscrete([4, 4]) + is-first-step Discrete(2); 16 actions
    ("MineSweeperEasy", 3 + 4 + 4 + 2, 4, 16),
]


@pytest.mark.parametrize("name, width, groups, actions", SPACES)
def test_observations_are_flat_one_hots(ppo, name, width, groups, actions):
    envs = ppo.make_popgym_envs(name, num_envs=3)
    assert envs.single_observation_space.shape == (width,)
    assert envs.single_action_space.n == actions
    obs, _ = envs.reset(seed=0)
    rows = [obs]
    for _ in range(20):
        obs, *_ = envs.step(envs.action_space.sample())
        rows.append(obs)
    obs = np.concatenate(rows).astype(np.float32)
    assert set(np.unique(obs)) <= {0.0, 1.0}
    assert (obs.sum(1) == groups).all()  # exactly one bit set in each one-hot group


def test_unknown_or_continuous_env_is_rejected(ppo):
    with pytest.raises(ValueError, match="env: expected popgym:<Name>"):
        ppo.make_popgym_envs("RepeatPreviousEasyy", num_envs=2)
    with pytest.raises(ValueError, match="expected Discrete or MultiDiscrete"):
        ppo.make_popgym_envs("PositionOnlyPendulumEasy", num_envs=2)
    with pytest.raises(ValueError, match="env: expected 'tmaze' or 'popgym:<Name>'"):
        ppo.train(ppo.PPOConfig(env="gym:CartPole-v1"), progress=False)


# Tighter than train()'s default 1e-4, which train() itself enforces. Measured on CPU: AGaLiTe's and GaLiTe's
# replays are exact (0.0); the LSTM's is within 2.4e-7 (float32 rounding: the replay's matmuls run over other row
# counts than the rollout's), so its bound leaves a 40x margin.
REPLAY_TOLERANCE = {"agalite": 1e-6, "galite": 1e-6, "lstm": 1e-5}


@pytest.mark.parametrize(
    "env, core", [("RepeatPreviousEasy", "agalite"), ("RepeatPreviousEasy", "galite"), ("MineSweeperEasy", "lstm")]
)
def test_ppo_runs_and_replay_holds(ppo, env, core):
    tolerance = REPLAY_TOLERANCE[core]
    result = ppo.train(_config(ppo, env, core, replay_tolerance=tolerance), progress=False)
    curve = result["curve"]
    assert [p["global_step"] for p in curve] == [1024, 2048, 3072]
    for point in curve:
        assert point["episodes"] > 0 and math.isfinite(point["mean_return"])
        # train() raises when the replay is off; here it is float32 rounding at most.
        assert 0.0 <= point["replay_err"] <= tolerance
    assert all(math.isfinite(point[k]) for point in curve for k in ("pg_loss", "v_loss", "entropy"))


def test_replay_check_catches_a_wrong_initial_state(ppo, monkeypatch):
    # Replaying every segment from a zeroed memory matches the first rollout (which did start from
    # zero) but not the second, whose segments start from the state carried over.
    original = ppo.SegmentStates.initial_states

    def zeroed(self, env_idx, seg_idx):
        state = original(self, env_idx, seg_idx)
        return state.reset(torch.ones(state.batch_size, dtype=torch.bool))

    monkeypatch.setattr(ppo.SegmentStates, "initial_states", zeroed)
    with pytest.raises(RuntimeError, match="replay: iteration 2"):
        ppo.train(_config(ppo, "RepeatPreviousEasy", iterations=2), progress=False)
