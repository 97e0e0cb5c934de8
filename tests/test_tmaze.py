import numpy as np
import pytest

# The T-maze is a gymnasium VectorEnv: without gymnasium (e.g. on the GPU machine) these tests skip.
pytest.importorskip("gymnasium", reason="needs gymnasium (the T-maze is a gymnasium VectorEnv)")

from agalite_triton.envs import TMazeVecEnv  # noqa: E402
from agalite_triton.envs.tmaze import DOWN, LEFT, RIGHT, UP  # noqa: E402


def _cue_bits(obs: np.ndarray) -> np.ndarray:
    return obs[:, :2]


def _cue_of(obs: np.ndarray) -> np.ndarray:
    # [0, 1] is "up", [1, 0] is "down".
    return np.where(obs[:, 1] == 1.0, UP, DOWN)


def test_spaces_and_dtype():
    env = TMazeVecEnv(5, corridor_len=7, num_distractors=3, seed=0)
    obs, _ = env.reset(seed=1)
    assert env.single_observation_space.shape == (13,)
    assert env.observation_space.shape == (5, 13)
    assert env.single_action_space.n == 4
    assert env.action_space.shape == (5,)
    assert obs.shape == (5, 13) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    obs, rew, term, trunc, _ = env.step(np.full(5, RIGHT))
    assert env.observation_space.contains(obs)
    assert rew.shape == term.shape == trunc.shape == (5,)
    assert term.dtype == trunc.dtype == np.bool_


def test_cue_only_at_first_step_and_position_code():
    env = TMazeVecEnv(64, corridor_len=6, num_distractors=2, seed=0)
    obs, _ = env.reset(seed=3)
    cue_bits = _cue_bits(obs)
    assert (cue_bits.sum(1) == 1).all()
    assert 0 < (cue_bits[:, 0] == 1).sum() < 64, "both cues should occur among 64 envs"
    assert (obs[:, 2:10] == 0).all(), "position 0 is Gray code 00000000"
    assert (obs[:, 10:] == 0).all(), "the first observation carries no distractors"
    expected_gray = {1: [0] * 7 + [1], 2: [0] * 6 + [1, 1], 3: [0] * 6 + [1, 0], 4: [0] * 5 + [1, 1, 0]}
    for pos in range(1, 6):
        obs, rew, term, trunc, _ = env.step(np.full(64, LEFT))
        assert (_cue_bits(obs) == 0).all(), f"cue visible at step {pos}"
        assert not (term | trunc).any()
        assert (rew == 0).all()
        if pos in expected_gray:
            assert (obs[:, 2:10] == np.array(expected_gray[pos], np.float32)).all()


def test_rewards_at_junction_and_same_step_autoreset():
    corridor = 5
    env = TMazeVecEnv(32, corridor_len=corridor, seed=0)
    obs, _ = env.reset(seed=7)
    cue = _cue_of(obs)
    for _ in range(corridor - 1):
        obs, rew, term, _, _ = env.step(np.full(32, RIGHT))
        assert not term.any() and (rew == 0).all()
    # At the junction left/right neither end the episode nor pay anything.
    obs, rew, term, trunc, _ = env.step(np.full(32, LEFT))
    assert not (term | trunc).any() and (rew == 0).all() and (_cue_bits(obs) == 0).all()
    actions = np.where(np.arange(32) % 2 == 0, cue, 1 - cue)
    obs, rew, term, trunc, info = env.step(actions)
    assert term.all() and not trunc.any()
    np.testing.assert_array_equal(rew, np.where(np.arange(32) % 2 == 0, 1.0, -1.0))
    np.testing.assert_array_equal(info["episode_return"], rew)
    np.testing.assert_array_equal(info["episode_length"], np.full(32, corridor + 1))
    np.testing.assert_array_equal(info["success"], rew > 0)
    # Same-step autoreset: the returned observation already starts the next episode.
    assert (_cue_bits(obs).sum(1) == 1).all() and (obs[:, 2:10] == 0).all()


def test_episode_length_is_corridor_when_choosing_at_once():
    corridor = 9
    env = TMazeVecEnv(4, corridor_len=corridor, seed=0)
    env.reset(seed=0)
    lengths = []
    for _ in range(5 * corridor):
        _, _, term, trunc, info = env.step(np.full(4, UP))
        assert not trunc.any()
        if term.any():
            assert term.all()
            lengths.append(info["episode_length"])
    assert len(lengths) == 5
    assert all((ln == corridor).all() for ln in lengths)


def test_manual_movement_and_truncation():
    env = TMazeVecEnv(3, corridor_len=4, auto_advance=False, step_penalty=0.1, max_episode_steps=6, seed=0)
    obs, _ = env.reset(seed=0)
    obs, rew, *_ = env.step(np.array([RIGHT, LEFT, UP]))
    np.testing.assert_allclose(rew, -0.1)
    # Gray code of positions 1, 0 (clipped at the wall), 0 (no move).
    np.testing.assert_array_equal(obs[:, 9], [1.0, 0.0, 0.0])
    for step in range(2, 7):
        obs, rew, term, trunc, info = env.step(np.full(3, LEFT))
        assert not term.any()
        assert trunc.all() == (step == 6)
    np.testing.assert_allclose(info["episode_return"], -0.6, rtol=1e-6)
    np.testing.assert_array_equal(info["episode_length"], [6, 6, 6])


def test_memoryless_policy_scores_zero_on_average():
    env = TMazeVecEnv(256, corridor_len=3, seed=0)
    env.reset(seed=11)
    returns = []
    for _ in range(30):
        _, _, term, _, info = env.step(np.full(256, UP))
        if term.any():
            returns.append(info["episode_return"][term])
    mean = np.concatenate(returns).mean()
    assert abs(mean) < 0.1, mean


def test_seeding_is_reproducible():
    def roll(seed):
        env = TMazeVecEnv(8, corridor_len=4, num_distractors=4)
        out = [env.reset(seed=seed)[0]]
        for _ in range(10):
            out.append(env.step(np.full(8, UP))[0])
        return np.stack(out)

    np.testing.assert_array_equal(roll(5), roll(5))
    assert not np.array_equal(roll(5), roll(6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_envs=0), "num_envs"),
        (dict(num_envs=2, corridor_len=1), "corridor_len"),
        (dict(num_envs=2, corridor_len=300), "corridor_len"),
        (dict(num_envs=2, num_distractors=-1), "num_distractors"),
        (dict(num_envs=2, corridor_len=8, max_episode_steps=5), "max_episode_steps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TMazeVecEnv(**kwargs)


def test_bad_actions():
    env = TMazeVecEnv(2, corridor_len=3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, np.int64))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="actions"):
        env.step(np.array([0, 4]))
