"""The recurrent state of an AGaLiTe stack, one NamedTuple of tensors.

Batch is dimension 1 of every memory tensor (dimension 0 is the layer), so that storing per-env
states in a rollout buffer, or picking a minibatch of environments, is plain indexing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._validation import check_tensor

__all__ = ["AGaLiTeState"]


class AGaLiTeState(NamedTuple):
    """Recurrent memory of every layer and the per-environment tick.

    tilde_k: (L, B, R, H, E) float32;  tilde_v: (L, B, R, H, D) float32;  s: (L, B, H, E) float32;
    tick: (B,) int64, the number of steps taken so far plus the initial tick (1, as the original).
    Dones never reset the tick; only the memories. Outputs depend on the tick only modulo the
    oscillators' period P (``model.tick_period``), which is all that ``model.pack_state`` keeps.
    """

    tilde_k: torch.Tensor
    tilde_v: torch.Tensor
    s: torch.Tensor
    tick: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.tick.shape[0]

    @property
    def num_layers(self) -> int:
        return self.tilde_k.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tick.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tilde_k, tilde_v, s)`` of one layer, each with batch first."""
        return self.tilde_k[index], self.tilde_v[index], self.s[index]

    def memories(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tilde_k, self.tilde_v, self.s

    def reset(self, mask: torch.Tensor) -> AGaLiTeState:
        """A new state with the memories of the environments where ``mask`` (B,) is true zeroed.

        The tick is kept, as a done inside a sequence keeps it: ``state.reset(m)`` then a call equals the
        call with ``dones[:, 0] = m``. The state passed in is not modified. The memories are written as
        exact zeros, so a reset also clears a NaN/inf memory (a done inside a call multiplies by 0 as the
        original does, which leaves NaN in place).
        """
        check_tensor("mask", mask, shape=(self.batch_size,), device=self.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        return AGaLiTeState(
            self.tilde_k.masked_fill(mask.view(1, -1, 1, 1, 1), 0),
            self.tilde_v.masked_fill(mask.view(1, -1, 1, 1, 1), 0),
            self.s.masked_fill(mask.view(1, -1, 1, 1), 0),
            self.tick.clone(),
        )

    def select(self, index: torch.Tensor | slice | Sequence[int] | int) -> AGaLiTeState:
        """The state of the environments ``index`` picks (a tensor of indices, a bool mask, a slice...)."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"index: expected an env in [-{self.batch_size}, {self.batch_size}), got {index}")
            index = slice(index, index + 1) if index != -1 else slice(index, None)
        return AGaLiTeState(
            self.tilde_k[:, index], self.tilde_v[:, index], self.s[:, index], self.tick[index]
        )

    def detach(self) -> AGaLiTeState:
        return AGaLiTeState(*(t.detach() for t in self))

    def clone(self) -> AGaLiTeState:
        return AGaLiTeState(*(t.clone() for t in self))

    def to(self, device: torch.device | str) -> AGaLiTeState:
        return AGaLiTeState(*(t.to(device) for t in self))

    @staticmethod
    def cat(states: Sequence[AGaLiTeState]) -> AGaLiTeState:
        """Concatenate states along the batch."""
        if len(states) == 0:
            raise ValueError("states: expected at least one AGaLiTeState, got an empty sequence")
        first = states[0]
        for i, st in enumerate(states):
            if not isinstance(st, AGaLiTeState):
                raise TypeError(f"states[{i}]: expected an AGaLiTeState, got {type(st).__name__}")
            for name, a, b in zip(AGaLiTeState._fields, st, first):
                dim = 0 if name == "tick" else 1  # the batch dimension
                per_env_a, per_env_b = a.shape[:dim] + a.shape[dim + 1 :], b.shape[:dim] + b.shape[dim + 1 :]
                if a.dim() != b.dim() or per_env_a != per_env_b or a.dtype != b.dtype or a.device != b.device:
                    raise ValueError(
                        f"states[{i}].{name}: expected {tuple(per_env_b)} per env (batch dim {dim}), {b.dtype} on "
                        f"{b.device} as states[0]; got shape {tuple(a.shape)}, {a.dtype} on {a.device}"
                    )
        return AGaLiTeState(
            torch.cat([st.tilde_k for st in states], dim=1),
            torch.cat([st.tilde_v for st in states], dim=1),
            torch.cat([st.s for st in states], dim=1),
            torch.cat([st.tick for st in states], dim=0),
        )

    def nbytes_per_env(self) -> int:
        """Bytes one environment's state occupies (memories and tick)."""
        memories = sum(t.element_size() * math.prod(t.shape[:1] + t.shape[2:]) for t in self.memories())
        return memories + self.tick.element_size()
