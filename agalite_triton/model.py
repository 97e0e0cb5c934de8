"""The AGaLiTe stack: the module RL code puts where its LSTM was."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .layer import AGaLiTeLayer
from .oscillator import oscillator_period, oscillator_table
from .presets import PRESETS
from .stack import RecurrentStack, check_sizes
from .state import AGaLiTeState

__all__ = ["AGaLiTe"]


class AGaLiTe(RecurrentStack):
    """A stack of AGaLiTe layers with a recurrent state whose size does not grow with context.

    ``y, new_state = model(x, state, dones)``:
      * ``x``: (B, T, input_dim) (or (T, B, input_dim) with ``batch_first=False``), or one step (B, input_dim).
      * ``dones``: (B, T) (or (T, B)) / (B,), bool or 0/1 float; ``dones[b, t]`` means observation t
        starts a new episode, so environment b's memory is zeroed before step t. The tick keeps counting.
      * ``state``: an :class:`AGaLiTeState` (``None``: :meth:`initial_state`). Not modified.
      * ``y``: (B, T, d_model) (or time-major) / (B, d_model). A call of T steps advances the tick by T.

    Keyword-only: ``out`` (a state that receives the new state, inference), ``env_ids`` (step a subset of
    a larger state in place, for async environments) and ``restart``/``restart_state`` (restart chosen
    steps from stored states, for TorchRL's recurrent-mode replay); see :meth:`forward`.
    """

    state_class = AGaLiTeState
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    def __init__(
        self,
        input_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_head: int,
        d_ffc: int,
        eta: int,
        r: int,
        reset_on_terminate: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        sizes = dict(input_dim=input_dim, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     d_head=d_head, d_ffc=d_ffc, eta=eta, r=r)  # fmt: skip
        check_sizes(sizes, dropout)
        self._init_stack(dict(sizes, reset_on_terminate=reset_on_terminate, dropout=dropout), backend, batch_first)
        self.eta, self.r = eta, r
        self.layers = nn.ModuleList(
            AGaLiTeLayer(
                d_model, n_heads, d_head, d_ffc, eta, r,
                input_dim=input_dim if i == 0 else None,
                reset_on_terminate=reset_on_terminate, dropout=dropout, backend=backend,
            )
            for i in range(n_layers)
        )  # fmt: skip

    @property
    def feature_dim(self) -> int:
        return self.eta * self.d_head

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        R, H, D, E = self.r, self.n_heads, self.d_head, self.feature_dim
        return (R, H, E), (R, H, D), (H, E)

    def _prepare_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            # Built now (a host-to-device copy), so that a CUDA graph captured right after needs no warm-up step.
            oscillator_table(self.r, device)

    @property
    def tick_period(self) -> int:
        """P: outputs depend on the tick only modulo P (the oscillators' common period, 2 (r - 1) or 2)."""
        return oscillator_period(self.r)

    def _pack_tick(self, tick: torch.Tensor) -> torch.Tensor:
        # The word holds (tick - 1) mod P, a small exact integer: a zero word is initial_state's tick 1.
        # Reduced before subtracting, so that no tick can overflow.
        return torch.remainder(torch.remainder(tick, self.tick_period) - 1, self.tick_period)

    def _unpack_tick(self, word: torch.Tensor) -> torch.Tensor:
        # tick = 1 + word in [1, P]: congruent to the packed tick modulo P, so every output and memory that
        # follows is the same as from the original state. The word must be an exact integer in [0, P).
        return word + 1
