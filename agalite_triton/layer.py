"""One AGaLiTe encoder layer: LN -> attention -> ReLU -> GRU gate -> LN -> FFN -> ReLU -> GRU gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AGaLiTeAttention, Memory
from .gating import GRUGatingUnit
from .init import orthogonal_blocks

__all__ = ["AGaLiTeLayer"]

LN_EPS = 1e-6  # Flax's LayerNorm default; torch's is 1e-5


class AGaLiTeLayer(nn.Module):
    """Identity-map-reordered transformer layer with GRU gating, as the original's encoder.

    With ``input_dim`` set (the first layer of a stack) the input first goes through a Dense + ReLU
    embedding to d_model, and the first gate's residual input is that embedding. Dropout (0 in the
    original, which never applies it) acts on the attention and FFN outputs before their ReLU.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_ffc: int,
        eta: int,
        r: int,
        input_dim: int | None = None,
        reset_on_terminate: bool = True,
        dropout: float = 0.0,
        gate_bias: float = 2.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.emb = None
        if input_dim is not None:
            self.emb = nn.Linear(input_dim, d_model)
            orthogonal_blocks(self.emb, [d_model])
        self.ln1 = nn.LayerNorm(d_model, eps=LN_EPS)
        self.attn = AGaLiTeAttention(
            d_model, n_heads, d_head, eta, r, reset_on_terminate=reset_on_terminate, backend=backend
        )
        self.gate1 = GRUGatingUnit(d_model, gate_bias)
        self.ln2 = nn.LayerNorm(d_model, eps=LN_EPS)
        self.ffn_in = nn.Linear(d_model, d_ffc)
        self.ffn_out = nn.Linear(d_ffc, d_model)
        orthogonal_blocks(self.ffn_in, [d_ffc])
        orthogonal_blocks(self.ffn_out, [d_model])
        self.gate2 = GRUGatingUnit(d_model, gate_bias)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        dones: torch.Tensor | None,
        memory: Memory,
        tick: torch.Tensor,
        memory_out: Memory | None = None,
        *,
        slots: torch.Tensor | None = None,
        restart: tuple[torch.Tensor, ...] | None = None,
        check_slots: bool | None = None,
    ) -> tuple[torch.Tensor, Memory]:
        x_enc = F.relu(self.emb(x)) if self.emb is not None else x
        attn, new_memory = self.attn(
            self.ln1(x_enc), dones, memory, tick, memory_out, slots=slots, restart=restart, check_slots=check_slots
        )
        y1 = self.gate1(x_enc, F.relu(self.dropout(attn)))
        ffc = self.ffn_out(F.relu(self.ffn_in(self.ln2(y1))))
        return self.gate2(y1, F.relu(self.dropout(ffc))), new_memory
