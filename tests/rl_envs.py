"""Environments shared by the RL framework tests.

Imports gymnasium at module level: import it only after ``pytest.importorskip("gymnasium")`` (the GPU
machine has no gymnasium, and the suite must still collect there), never from conftest.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class MaskedCartPole(gym.ObservationWrapper):
    """CartPole with the velocities removed: position and angle only, so the policy needs memory."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return obs[[0, 2]].astype(np.float32)
