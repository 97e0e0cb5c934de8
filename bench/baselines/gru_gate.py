"""GTrXL's GRU-type gating layer (Parisotto et al. 2019, eq. 8), used in place of residual connections."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GRUGate"]


class GRUGate(nn.Module):
    """``g(x, y)``: x is the residual stream, y the sub-layer's (ReLU'd) output.

    r = sigma(W_r y + U_r x), z = sigma(W_z y + U_z x - b_g), h = tanh(W_g y + U_g (r * x)),
    g = (1 - z) * x + z * h. The bias b_g (2 in the paper) starts the gate near the identity, which is
    what lets GTrXL learn in RL at all.
    """

    def __init__(self, d_model: int, gate_bias: float = 2.0) -> None:
        super().__init__()
        self.d_model = d_model
        # W_r, W_z, W_g fused into one matmul on y, and U_r, U_z into one on x; no biases, as the paper.
        self.w_y = nn.Linear(d_model, 3 * d_model, bias=False)
        self.u_x = nn.Linear(d_model, 2 * d_model, bias=False)
        self.u_g = nn.Linear(d_model, d_model, bias=False)
        self.gate_bias = nn.Parameter(torch.full((d_model,), float(gate_bias)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wr, wz, wg = self.w_y(y).chunk(3, dim=-1)
        ur, uz = self.u_x(x).chunk(2, dim=-1)
        r = torch.sigmoid(wr + ur)
        z = torch.sigmoid(wz + uz - self.gate_bias)
        h = torch.tanh(wg + self.u_g(r * x))
        return x + z * (h - x)
