"""The AGaLiTe attention layer: fused projections around the recurrence."""

from __future__ import annotations

import torch
from torch import nn

from .backend import check_backend
from .init import orthogonal_blocks
from .recurrence import agalite_recurrence

__all__ = ["AGaLiTeAttention"]

Memory = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AGaLiTeAttention(nn.Module):
    """Projects (B, T, d_model) to keys, queries, values, beta, gamma and p1, p2, p3 with one matmul,
    runs the recurrence and projects the (B, T, H*D) read-out back to d_model.

    ``in_proj`` columns keep the original's layouts: the first 5*H*D are ``h*(5D) + j*D + i`` with
    j = key, query, value, beta, gamma; the last 3*H*eta are ``h*(3 eta) + j*eta + n`` with j = p1, p2, p3.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        eta: int,
        r: int,
        reset_on_terminate: bool = True,
        eps: float = 1e-5,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.d_head, self.eta, self.r = d_model, n_heads, d_head, eta, r
        self.reset_on_terminate = reset_on_terminate
        self.eps = eps
        self.backend = check_backend(backend)
        self.n_kqvbg = 5 * n_heads * d_head
        self.in_proj = nn.Linear(d_model, self.n_kqvbg + 3 * n_heads * eta)
        self.project = nn.Linear(n_heads * d_head, d_model)
        orthogonal_blocks(self.in_proj, [self.n_kqvbg, 3 * n_heads * eta])
        orthogonal_blocks(self.project, [d_model])

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
        """x (B, T, d_model); dones (B, T) or None; memory (tilde_k, tilde_v, s); tick (B,) before the call;
        memory_out: optional buffers for the new memory (inference only); slots, restart, check_slots: see
        ``agalite_recurrence``."""
        z = self.in_proj(x)
        kqvbg = z[..., : self.n_kqvbg].unflatten(-1, (self.n_heads, 5, self.d_head))
        keys, queries, values, beta, gamma = kqvbg.unbind(-2)
        p1, p2, p3 = z[..., self.n_kqvbg :].unflatten(-1, (self.n_heads, 3, self.eta)).unbind(-2)
        out, new_memory = agalite_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3,
            dones if self.reset_on_terminate else None,
            *memory, tick, eps=self.eps, backend=self.backend, final_out=memory_out, slots=slots, restart=restart,
            check_slots=check_slots,
        )  # fmt: skip
        return self.project(out.flatten(-2)), new_memory
