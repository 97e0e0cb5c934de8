"""LSTM baseline: ``torch.nn.LSTM`` (cuDNN on GPU) with per-environment state resets on dones."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .inputs import as_sequence

__all__ = ["LSTMState", "ResetLSTM"]


class LSTMState(NamedTuple):
    h: torch.Tensor  # (num_layers, B, hidden)
    c: torch.Tensor  # (num_layers, B, hidden)

    @property
    def batch_size(self) -> int:
        return self.h.shape[1]

    def nbytes_per_env(self) -> int:
        return (self.h.nbytes + self.c.nbytes) // self.h.shape[1]


class ResetLSTM(nn.Module):
    """``y, state = lstm(x, state, dones)`` with the same done convention as AGaLiTe.

    ``dones[b, t]`` zeroes environment b's (h, c) before step t (the state is multiplied by 1 - done).
    A multi-step call runs ``nn.LSTM`` over the stretches between time steps where some environment
    is done, so a sequence without dones is one cuDNN call; a single step never syncs with the host.
    """

    def __init__(self, input_dim: int, hidden: int, num_layers: int = 1) -> None:
        super().__init__()
        for name, value in dict(input_dim=input_dim, hidden=hidden, num_layers=num_layers).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.input_dim, self.hidden, self.num_layers = input_dim, hidden, num_layers
        self.lstm = nn.LSTM(input_dim, hidden, num_layers, batch_first=True)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> LSTMState:
        device = self.lstm.weight_ih_l0.device if device is None else torch.device(device)
        zeros = torch.zeros(self.num_layers, batch_size, self.hidden, device=device)
        return LSTMState(zeros, zeros.clone())

    @property
    def state_bytes_per_env(self) -> int:
        return self.initial_state(1, "meta").nbytes_per_env()

    def forward(
        self, x: torch.Tensor, state: LSTMState | None = None, dones: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        x, dones, single = as_sequence(x, dones, self.input_dim)
        B, T = x.shape[:2]
        if state is None:
            state = self.initial_state(B, x.device)
        expected = (self.num_layers, B, self.hidden)
        for name, t in (("h", state.h), ("c", state.c)):
            if tuple(t.shape) != expected or t.device != x.device:
                raise ValueError(
                    f"state.{name}: expected shape {expected} on {x.device}, got {tuple(t.shape)} on {t.device}"
                )
        h, c = state
        if dones is None:
            y, (h, c) = self.lstm(x, (h, c))
            return (y.squeeze(1) if single else y), LSTMState(h, c)
        if T == 1:
            starts = [0]
        else:
            # Boundaries where some environment starts an episode; step 0 is always a boundary.
            starts = sorted({0, *dones[:, 1:].any(dim=0).nonzero().flatten().add(1).tolist()})
        pieces = []
        for start, stop in zip(starts, [*starts[1:], T]):
            keep = (~dones[:, start]).to(h.dtype)[None, :, None]
            y, (h, c) = self.lstm(x[:, start:stop], (h * keep, c * keep))
            pieces.append(y)
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return (y.squeeze(1) if single else y), LSTMState(h, c)
