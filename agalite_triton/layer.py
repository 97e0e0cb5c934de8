"""The encoder layer both models share: LN -> attention -> ReLU -> GRU gate -> LN -> FFN -> ReLU -> GRU gate.

Only the attention block differs (AGaLiTe's or GaLiTe's), and whether the first layer's input embedding
has a ReLU (AGaLiTe's does, GaLiTe's does not)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AGaLiTeAttention
from .gating import GRUGatingUnit
from .init import orthogonal_blocks

__all__ = ["AGaLiTeLayer", "EncoderLayer"]

Memory = tuple[torch.Tensor, ...]

LN_EPS = 1e-6  # Flax's LayerNorm default; torch's is 1e-5


class EncoderLayer(nn.Module):
    """Identity-map-reordered transformer layer with GRU gating, as the original's encoders.

    ``make_attention()`` builds the attention block (called after the embedding and the first LayerNorm
    exist, so that a seed gives the same initial parameters as a layer that built them in that order).
    With ``input_dim`` set (the first layer of a stack) the input first goes through a Dense embedding to
    d_model (followed by a ReLU when ``embed_relu``), and the first gate's residual input is that
    embedding. Dropout (0 in the original, which never applies it) acts on the attention and FFN outputs
    before their ReLU.
    """

    def __init__(
        self,
        make_attention: Callable[[], nn.Module],
        d_model: int,
        d_ffc: int,
        input_dim: int | None = None,
        embed_relu: bool = True,
        dropout: float = 0.0,
        gate_bias: float = 2.0,
    ) -> None:
        super().__init__()
        self.emb = None
        self.embed_relu = embed_relu
        if input_dim is not None:
            self.emb = nn.Linear(input_dim, d_model)
            orthogonal_blocks(self.emb, [d_model])
        self.ln1 = nn.LayerNorm(d_model, eps=LN_EPS)
        self.attn = make_attention()
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
        tick: torch.Tensor | None,
        memory_out: Memory | None = None,
        *,
        slots: torch.Tensor | None = None,
        restart: tuple[torch.Tensor, ...] | None = None,
        check_slots: bool | None = None,
    ) -> tuple[torch.Tensor, Memory]:
        """x (B, T, d_model or input_dim); memory: this layer's memories; tick: the stack's tick before the
        call (None for a model without one); the rest as the attention block takes them."""
        x_enc = x if self.emb is None else F.relu(self.emb(x)) if self.embed_relu else self.emb(x)
        attn, new_memory = self.attn(
            self.ln1(x_enc), dones, memory, tick, memory_out, slots=slots, restart=restart, check_slots=check_slots
        )
        y1 = self.gate1(x_enc, F.relu(self.dropout(attn)))
        ffc = self.ffn_out(F.relu(self.ffn_in(self.ln2(y1))))
        return self.gate2(y1, F.relu(self.dropout(ffc))), new_memory


class AGaLiTeLayer(EncoderLayer):
    """One AGaLiTe encoder layer (the Dense embedding of the first layer has a ReLU, as the original's)."""

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
        super().__init__(
            lambda: AGaLiTeAttention(
                d_model, n_heads, d_head, eta, r, reset_on_terminate=reset_on_terminate, backend=backend
            ),
            d_model, d_ffc, input_dim=input_dim, embed_relu=True, dropout=dropout, gate_bias=gate_bias,
        )  # fmt: skip
