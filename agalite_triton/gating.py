"""GRU gating unit of GTrXL, as AGaLiTe uses it after attention and after the FFN."""

from __future__ import annotations

import torch
from torch import nn

from .init import orthogonal_blocks

__all__ = ["GRUGatingUnit"]


class GRUGatingUnit(nn.Module):
    """``g(x, y) = (1 - z) x + z h`` with r = sigma(W_r y + U_r x), z = sigma(W_z y + U_z x - b_g),
    h = tanh(W_g y + U_g (r x)).

    The three y-side and two x-side matrices are fused into one matmul each (``w_y`` holds
    [W_r; W_z; W_g], ``u_x`` holds [U_r; U_z]); ``b_g`` (``bgp``, init ``bias``) is subtracted, so a
    positive bias starts the gate near the identity map x.
    """

    def __init__(self, d_model: int, bias: float = 2.0) -> None:
        super().__init__()
        self.d_model = d_model
        self.w_y = nn.Linear(d_model, 3 * d_model, bias=False)
        self.u_x = nn.Linear(d_model, 2 * d_model, bias=False)
        self.u_g = nn.Linear(d_model, d_model, bias=False)
        self.bgp = nn.Parameter(torch.full((d_model,), float(bias)))
        orthogonal_blocks(self.w_y, [d_model] * 3)
        orthogonal_blocks(self.u_x, [d_model] * 2)
        orthogonal_blocks(self.u_g, [d_model])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r_y, z_y, g_y = self.w_y(y).chunk(3, dim=-1)
        r_x, z_x = self.u_x(x).chunk(2, dim=-1)
        r = torch.sigmoid(r_y + r_x)
        z = torch.sigmoid(z_y + z_x - self.bgp)
        h = torch.tanh(g_y + self.u_g(r * x))
        return (1 - z) * x + z * h
