"""Small numpy-vectorised environments for testing recurrent cores."""

from agalite_triton.envs.tmaze import TMazeVecEnv

__all__ = ["TMazeVecEnv"]
