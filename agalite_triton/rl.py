"""BPTT plumbing for recurrent PPO-style training: per-env states at the start of each segment.

A rollout of ``num_steps`` steps over ``num_envs`` environments is cut into segments of
``segment_len`` steps. While rolling out, :meth:`SegmentStates.record` keeps each environment's state
at the start of every segment (before that step's forward call); during the update a minibatch is any
set of (env, segment) rows, replayed as one ``(B, segment_len)`` forward from
:meth:`SegmentStates.initial_states`, with the rollout's inputs and dones gathered by
:meth:`SegmentStates.rows`. Passing the same dones that the rollout passed makes episode boundaries
inside a segment reset the memory exactly as they did during the rollout.

It is framework-free and works for any state that is an :class:`~agalite_triton.AGaLiTeState` or a
:class:`~agalite_triton.GaLiTeState` (or any object with ``select(index)``, ``detach()`` and a
``cat(states)`` on its type) or a tensor with the batch first, such as ``model.pack_state(state)`` (B, S)
or an LSTM's ``(h, c)`` stacked batch-first.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

__all__ = ["SegmentStates", "cat_states", "detach_state", "select_state"]

State = TypeVar("State")


def select_state(state: State, index: torch.Tensor) -> State:
    """The rows ``index`` of a batch-first tensor state or of a state with ``select``."""
    if isinstance(state, torch.Tensor):
        return state[index]
    return state.select(index)


def cat_states(states: list[State]) -> State:
    """Concatenate states along the batch (tensors on dim 0, other states with ``type(s).cat``)."""
    if len(states) == 0:
        raise ValueError("states: expected at least one state, got an empty list")
    if isinstance(states[0], torch.Tensor):
        return torch.cat(states, dim=0)
    return type(states[0]).cat(states)


def detach_state(state: State) -> State:
    """A detached copy that later in-place updates of ``state`` by the caller cannot change."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    detached = state.detach()
    return detached.clone() if hasattr(detached, "clone") else detached


def _state_batch_size(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.shape[0]
    if hasattr(state, "batch_size"):
        return int(state.batch_size)
    raise TypeError(
        f"state: expected a batch-first torch.Tensor or an object with batch_size/select/cat "
        f"(e.g. AGaLiTeState or GaLiTeState), got {type(state).__name__}"
    )


class SegmentStates:
    """Recurrent states of every environment at the start of every training segment of one rollout.

    Usage, with rollout storage laid out ``(num_steps, num_envs, ...)`` (CleanRL)::

        segs = SegmentStates(num_envs, num_steps, segment_len)
        for step in range(num_steps):
            segs.record(step, state)                     # before the step's forward
            y, state = model(obs[step], state, dones[step])
        for env_idx, seg_idx in segs.minibatches(num_minibatches):
            y, _ = model(segs.rows(obs, env_idx, seg_idx), segs.initial_states(env_idx, seg_idx),
                         segs.rows(dones, env_idx, seg_idx))

    ``dones[step]`` means observation ``step`` starts a new episode. Call :meth:`clear` (or just start
    recording at step 0 again) for the next rollout.
    """

    def __init__(self, num_envs: int, num_steps: int, segment_len: int | None = None) -> None:
        segment_len = num_steps if segment_len is None else segment_len
        if num_envs < 1:
            raise ValueError(f"num_envs: expected >= 1, got {num_envs}")
        if num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
        if segment_len < 1 or num_steps % segment_len != 0:
            raise ValueError(
                f"segment_len: expected a positive divisor of num_steps={num_steps}, got {segment_len}"
            )
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.segment_len = segment_len
        self.num_segments = num_steps // segment_len
        self._states: list[Any] = []
        self._flat: Any = None

    @property
    def num_rows(self) -> int:
        """Number of (env, segment) rows in a full rollout."""
        return self.num_envs * self.num_segments

    def clear(self) -> None:
        self._states = []
        self._flat = None

    def is_segment_start(self, step: int) -> bool:
        return step % self.segment_len == 0

    def record(self, step: int, state: State) -> None:
        """Call at every rollout step before the forward call; keeps ``state`` when a segment starts there."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step: expected 0 <= step < num_steps={self.num_steps}, got {step}")
        if not self.is_segment_start(step):
            return
        segment = step // self.segment_len
        if segment == 0:
            self.clear()
        if segment != len(self._states):
            raise RuntimeError(
                f"record: segment {segment} (step {step}) recorded out of order; "
                f"expected segment {len(self._states)} next (record every step from step 0)"
            )
        batch = _state_batch_size(state)
        if batch != self.num_envs:
            raise ValueError(f"state: expected batch size num_envs={self.num_envs}, got {batch}")
        self._states.append(detach_state(state))
        self._flat = None

    def _check_rows(self, env_idx: torch.Tensor, seg_idx: torch.Tensor) -> None:
        bounds = (("env_idx", env_idx, self.num_envs), ("seg_idx", seg_idx, self.num_segments))
        for name, idx, bound in bounds:
            if not isinstance(idx, torch.Tensor):
                raise TypeError(f"{name}: expected a 1-D int64 tensor, got {type(idx).__name__}")
            if idx.dtype != torch.int64 or idx.dim() != 1:
                got = f"{idx.dtype} of shape {tuple(idx.shape)}"
                raise TypeError(f"{name}: expected a 1-D int64 tensor, got {got}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
                lo, hi = int(idx.min()), int(idx.max())
                raise IndexError(f"{name}: values must lie in [0, {bound}), got [{lo}, {hi}]")
        if env_idx.shape != seg_idx.shape:
            raise ValueError(
                "env_idx and seg_idx: expected the same shape, "
                f"got {tuple(env_idx.shape)} and {tuple(seg_idx.shape)}"
            )

    def initial_states(self, env_idx: torch.Tensor, seg_idx: torch.Tensor) -> Any:
        """State of row b = the state of env ``env_idx[b]`` at the start of segment ``seg_idx[b]``."""
        self._check_rows(env_idx, seg_idx)
        if len(self._states) != self.num_segments:
            raise RuntimeError(
                f"initial_states: the rollout recorded {len(self._states)} of {self.num_segments} segments; "
                "record every step of the rollout first"
            )
        if self._flat is None:
            # Row index seg * num_envs + env: one gather serves any minibatch.
            self._flat = cat_states(self._states)
        flat_idx = seg_idx * self.num_envs + env_idx
        flat_idx = flat_idx.to(getattr(self._flat, "device", flat_idx.device))
        return select_state(self._flat, flat_idx)

    def rows(
        self, x: torch.Tensor, env_idx: torch.Tensor, seg_idx: torch.Tensor, time_major: bool = True
    ) -> torch.Tensor:
        """Gather rollout storage into ``(B, segment_len, ...)`` rows.

        ``x`` is ``(num_steps, num_envs, ...)`` when ``time_major`` (CleanRL's layout) and
        ``(num_envs, num_steps, ...)`` otherwise.
        """
        self._check_rows(env_idx, seg_idx)
        lead = (self.num_steps, self.num_envs) if time_major else (self.num_envs, self.num_steps)
        if x.dim() < 2 or tuple(x.shape[:2]) != lead:
            layout = "(num_steps, num_envs, ...)" if time_major else "(num_envs, num_steps, ...)"
            raise ValueError(f"x: expected shape {layout} = {lead + ('...',)}, got {tuple(x.shape)}")
        env_idx, seg_idx = env_idx.to(x.device), seg_idx.to(x.device)
        rest = x.shape[2:]
        if time_major:
            # Advanced indices split by a slice put the row dimension first: (B, segment_len, ...).
            return x.reshape(self.num_segments, self.segment_len, self.num_envs, *rest)[seg_idx, :, env_idx]
        return x.reshape(self.num_envs, self.num_segments, self.segment_len, *rest)[env_idx, seg_idx]

    def minibatches(
        self, num_minibatches: int, generator: torch.Generator | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All rows shuffled and split into ``num_minibatches`` (env_idx, seg_idx) pairs of equal size."""
        if num_minibatches < 1 or self.num_rows % num_minibatches != 0:
            raise ValueError(
                f"num_minibatches: expected a positive divisor of num_envs * num_segments = {self.num_rows}, "
                f"got {num_minibatches}"
            )
        perm = torch.randperm(self.num_rows, generator=generator)
        size = self.num_rows // num_minibatches
        return [
            (chunk % self.num_envs, torch.div(chunk, self.num_envs, rounding_mode="floor"))
            for chunk in perm.split(size)
        ]
