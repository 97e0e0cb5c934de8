"""The recurrent states of the two stacks, NamedTuples of tensors with shared operations.

Batch is dimension 1 of every memory tensor (dimension 0 is the layer), so that storing per-env
states in a rollout buffer, or picking a minibatch of environments, is plain indexing. AGaLiTe's state
also carries a per-environment tick (batch on dimension 0); GaLiTe's has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import torch

from ._validation import check_tensor

__all__ = ["AGaLiTeState", "GaLiTeState", "StateOps"]

S = TypeVar("S", bound="StateOps")


class StateOps:
    """Operations of a state NamedTuple whose fields are per-layer memories (L, B, ...) and, optionally, a
    last field ``tick`` (B,). Every method returns a new state; none modifies the one it is called on."""

    __slots__ = ()
    _fields: tuple[str, ...]

    def _tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)  # type: ignore[call-overload]

    def _new(self: S, parts: Sequence[torch.Tensor]) -> S:
        return type(self)(*parts)  # type: ignore[call-arg]

    @property
    def has_tick(self) -> bool:
        return self._fields[-1] == "tick"

    def memories(self) -> tuple[torch.Tensor, ...]:
        """The memory tensors, each (L, B, ...)."""
        parts = self._tuple()
        return parts[:-1] if self.has_tick else parts

    @property
    def batch_size(self) -> int:
        return self.memories()[0].shape[1]

    @property
    def num_layers(self) -> int:
        return self.memories()[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.memories()[0].device

    def layer(self, index: int) -> tuple[torch.Tensor, ...]:
        """The memories of one layer, each with batch first."""
        return tuple(m[index] for m in self.memories())

    def _with_memories(self: S, memories: Sequence[torch.Tensor], tick: torch.Tensor | None) -> S:
        return self._new([*memories, *((tick,) if self.has_tick else ())])

    def reset(self: S, mask: torch.Tensor) -> S:
        """A new state with the memories of the environments where ``mask`` (B,) is true zeroed.

        A tick is kept, as a done inside a sequence keeps it: ``state.reset(m)`` then a call equals the
        call with ``dones[:, 0] = m``. The memories are written as exact zeros, so a reset also clears a
        NaN/inf memory (a done inside a call multiplies by 0 as the original does, which leaves NaN in place).
        """
        check_tensor("mask", mask, shape=(self.batch_size,), device=self.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        memories = [m.masked_fill(mask.view(1, -1, *([1] * (m.dim() - 2))), 0) for m in self.memories()]
        return self._with_memories(memories, self._tuple()[-1].clone() if self.has_tick else None)

    def select(self: S, index: torch.Tensor | slice | Sequence[int] | int) -> S:
        """The state of the environments ``index`` picks (a tensor of indices, a bool mask, a slice...)."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"index: expected an env in [-{self.batch_size}, {self.batch_size}), got {index}")
            index = slice(index, index + 1) if index != -1 else slice(index, None)
        memories = [m[:, index] for m in self.memories()]
        return self._with_memories(memories, self._tuple()[-1][index] if self.has_tick else None)

    def detach(self: S) -> S:
        return self._new([t.detach() for t in self._tuple()])

    def clone(self: S) -> S:
        return self._new([t.clone() for t in self._tuple()])

    def to(self: S, device: torch.device | str) -> S:
        return self._new([t.to(device) for t in self._tuple()])

    @classmethod
    def cat(cls: type[S], states: Sequence[S]) -> S:
        """Concatenate states along the batch."""
        if len(states) == 0:
            raise ValueError(f"states: expected at least one {cls.__name__}, got an empty sequence")
        first = states[0]
        for i, st in enumerate(states):
            if not isinstance(st, cls):
                raise TypeError(f"states[{i}]: expected an {cls.__name__}, got {type(st).__name__}")
            for name, a, b in zip(cls._fields, st._tuple(), first._tuple()):
                dim = 0 if name == "tick" else 1  # the batch dimension
                per_env_a, per_env_b = a.shape[:dim] + a.shape[dim + 1 :], b.shape[:dim] + b.shape[dim + 1 :]
                if a.dim() != b.dim() or per_env_a != per_env_b or a.dtype != b.dtype or a.device != b.device:
                    raise ValueError(
                        f"states[{i}].{name}: expected {tuple(per_env_b)} per env (batch dim {dim}), {b.dtype} on "
                        f"{b.device} as states[0]; got shape {tuple(a.shape)}, {a.dtype} on {a.device}"
                    )
        return cls(*(  # type: ignore[call-arg]
            torch.cat([st._tuple()[f] for st in states], dim=0 if name == "tick" else 1)
            for f, name in enumerate(cls._fields)
        ))  # fmt: skip

    def nbytes_per_env(self) -> int:
        """Bytes one environment's state occupies (memories, and the tick where there is one)."""
        memories = sum(t.element_size() * math.prod(t.shape[:1] + t.shape[2:]) for t in self.memories())
        tick: Any = self._tuple()[-1]
        return memories + (tick.element_size() if self.has_tick else 0)


class _AGaLiTeFields(NamedTuple):
    tilde_k: torch.Tensor
    tilde_v: torch.Tensor
    s: torch.Tensor
    tick: torch.Tensor


class AGaLiTeState(_AGaLiTeFields, StateOps):
    """Recurrent memory of every AGaLiTe layer and the per-environment tick.

    tilde_k: (L, B, R, H, E) float32;  tilde_v: (L, B, R, H, D) float32;  s: (L, B, H, E) float32;
    tick: (B,) int64, the number of steps taken so far plus the initial tick (1, as the original).
    Dones never reset the tick; only the memories. Outputs depend on the tick only modulo the
    oscillators' period P (``model.tick_period``), which is all that ``model.pack_state`` keeps.
    """

    __slots__ = ()


class _GaLiTeFields(NamedTuple):
    c: torch.Tensor
    s: torch.Tensor


class GaLiTeState(_GaLiTeFields, StateOps):
    """Recurrent memory of every GaLiTe layer, in the original's layout.

    c: (L, B, H, D, K) float32, ``c[..., j, k]`` value row j, key feature k = i * nu + n (K = nu * D);
    s: (L, B, H, K) float32. There is no tick: GaLiTe depends on time only through its memory.
    """

    __slots__ = ()
