"""Cue-recall T-maze as a numpy-vectorised gymnasium ``VectorEnv``.

Semantics follow ``SimplerTMazeWDistractors`` of the original AGaLiTe code: the observation is
2 cue bits, the agent's position in an 8-bit Gray code and optional random distractor bits; the
cue is visible only in the first observation of an episode; actions are up, down, left, right; at
the junction (the last corridor cell) up or down ends the episode with +1 if it matches the cue and
-1 otherwise. Two deliberate differences: corridor steps cost ``step_penalty`` (default 0, so a
solved maze returns exactly 1), and by default the agent is carried one cell along the corridor each
step whatever it does (``auto_advance``), which makes the task a pure memory test of length
``corridor_len`` instead of an exploration problem; ``auto_advance=False`` gives the original
left/right movement.

Autoreset is same-step (CleanRL convention): the observation returned with a finished episode's
``terminated``/``truncated`` flag is already the first observation of the next episode, so that flag
is exactly "this observation starts a new episode", the ``dones`` a recurrent core expects.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
_CUE_BITS = 2
_POSITION_BITS = 8


def _gray_code_bits(pos: np.ndarray) -> np.ndarray:
    gray = pos ^ (pos >> 1)
    shifts = np.arange(_POSITION_BITS - 1, -1, -1)
    return ((gray[:, None] >> shifts) & 1).astype(np.float32)


class TMazeVecEnv(VectorEnv):
    """``num_envs`` independent T-mazes stepped together; observations are float32 ``(num_envs, 10 + d)``."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int,
        corridor_len: int = 10,
        num_distractors: int = 0,
        auto_advance: bool = True,
        step_penalty: float = 0.0,
        max_episode_steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if not 2 <= corridor_len <= 2**_POSITION_BITS:
            raise ValueError(f"corridor_len must be in [2, {2**_POSITION_BITS}], got {corridor_len}")
        if num_distractors < 0:
            raise ValueError(f"num_distractors must be >= 0, got {num_distractors}")
        if max_episode_steps is None:
            max_episode_steps = 4 * corridor_len
        if max_episode_steps < corridor_len:
            raise ValueError(
                f"max_episode_steps must be >= corridor_len ({corridor_len}) so the junction is reachable, "
                f"got {max_episode_steps}"
            )
        self.num_envs = num_envs
        self.corridor_len = corridor_len
        self.num_distractors = num_distractors
        self.auto_advance = auto_advance
        self.step_penalty = float(step_penalty)
        self.max_episode_steps = max_episode_steps
        obs_dim = _CUE_BITS + _POSITION_BITS + num_distractors
        self.single_observation_space = gym.spaces.Box(0.0, 1.0, (obs_dim,), np.float32)
        self.single_action_space = gym.spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rng = np.random.default_rng(seed)
        self._pos = np.zeros(num_envs, np.int64)
        self._cue = np.zeros(num_envs, np.int64)
        self._length = np.zeros(num_envs, np.int64)
        self._return = np.zeros(num_envs, np.float64)
        self._started = False

    def _observe(self, starting: np.ndarray) -> np.ndarray:
        obs = np.zeros((self.num_envs, self.single_observation_space.shape[0]), np.float32)
        # The original encodes "up" as [0, 1] and "down" as [1, 0]; every later step shows [0, 0].
        obs[starting, 0] = (self._cue[starting] == DOWN).astype(np.float32)
        obs[starting, 1] = (self._cue[starting] == UP).astype(np.float32)
        obs[:, _CUE_BITS : _CUE_BITS + _POSITION_BITS] = _gray_code_bits(self._pos)
        if self.num_distractors:
            noise = self._rng.integers(0, 2, (self.num_envs, self.num_distractors)).astype(np.float32)
            # The first observation carries no distractor bits, as in the original.
            obs[~starting, _CUE_BITS + _POSITION_BITS :] = noise[~starting]
        return obs

    def _start_episodes(self, mask: np.ndarray) -> None:
        n = int(mask.sum())
        self._pos[mask] = 0
        self._cue[mask] = self._rng.integers(0, 2, n)
        self._length[mask] = 0
        self._return[mask] = 0.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        everyone = np.ones(self.num_envs, bool)
        self._start_episodes(everyone)
        self._started = True
        return self._observe(everyone), {}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if not self._started:
            raise RuntimeError("TMazeVecEnv.step called before reset()")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        if not np.isin(actions, (UP, DOWN, LEFT, RIGHT)).all():
            raise ValueError(f"actions must be in {{0, 1, 2, 3}}, got values {np.unique(actions)}")
        at_junction = self._pos == self.corridor_len - 1
        chooses = at_junction & ((actions == UP) | (actions == DOWN))
        rewards = np.full(self.num_envs, -self.step_penalty, np.float64)
        rewards[chooses] = np.where(actions[chooses] == self._cue[chooses], 1.0, -1.0)

        if self.auto_advance:
            moves = np.ones(self.num_envs, np.int64)
        else:
            moves = (actions == RIGHT).astype(np.int64) - (actions == LEFT).astype(np.int64)
        # At the junction left/right do nothing (original semantics): the agent must pick up or down.
        moves[at_junction] = 0
        self._pos = np.clip(self._pos + moves, 0, self.corridor_len - 1)
        self._length += 1
        self._return += rewards

        terminated = chooses
        truncated = ~terminated & (self._length >= self.max_episode_steps)
        done = terminated | truncated
        infos: dict[str, Any] = {}
        if done.any():
            infos["episode_return"] = np.where(done, self._return, 0.0)
            infos["episode_length"] = np.where(done, self._length, 0)
            infos["success"] = terminated & (rewards > 0)
            infos["_episode_return"] = infos["_episode_length"] = infos["_success"] = done.copy()
            infos["final_obs"] = self._observe(np.zeros(self.num_envs, bool))
            infos["_final_obs"] = done.copy()
            self._start_episodes(done)
        obs = self._observe(done)
        return obs, rewards.astype(np.float32), terminated, truncated, infos
