"""The GaLiTe attention layer: per-head projections (fused into one matmul) around the exact recurrence."""

from __future__ import annotations

import torch
from torch import nn

from .backend import check_backend
from .galite_recurrence import galite_recurrence
from .init import GAIN, orthogonal_blocks

__all__ = ["GaLiTeAttention"]

Memory = tuple[torch.Tensor, torch.Tensor]


class GaLiTeAttention(nn.Module):
    """Projects (B, T, d_model) to keys, query pre-projections, values, beta, gamma and the key and gamma
    nu factors with one matmul, forms the queries and their nu factor from the pre-projection with a
    per-head matmul (the original's two stacked query projections), runs the recurrence and projects the
    (B, T, H*D) read-out back to d_model.

    Every attention parameter of the original has a leading head axis (a head's own projections).
    ``in_proj`` columns: the first 5*H*D are ``h*(5D) + j*D + i`` with j = key, query pre-projection,
    value, beta, gamma; the last 2*H*nu are ``h*(2 nu) + j*nu + n`` with j = key factor (p1), gamma factor
    (p3). ``q_weight`` (H, D, D + nu) and ``q_bias`` (H, D + nu) map a head's pre-projection to its query
    (first D) and query factor (p2, last nu).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        nu: int,
        reset_on_terminate: bool = True,
        eps: float = 1e-10,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.d_head, self.nu = d_model, n_heads, d_head, nu
        self.reset_on_terminate = reset_on_terminate
        self.eps = eps
        self.backend = check_backend(backend)
        self.n_dims = 5 * n_heads * d_head
        self.in_proj = nn.Linear(d_model, self.n_dims + 2 * n_heads * nu)
        self.q_weight = nn.Parameter(torch.empty(n_heads, d_head, d_head + nu))
        self.q_bias = nn.Parameter(torch.zeros(n_heads, d_head + nu))
        self.project = nn.Linear(n_heads * d_head, d_model)
        orthogonal_blocks(self.in_proj, [d_head] * (5 * n_heads) + [nu] * (2 * n_heads))
        with torch.no_grad():
            for h in range(n_heads):
                for block in (self.q_weight[h, :, :d_head], self.q_weight[h, :, d_head:]):
                    # A Flax kernel (in, out) is the transpose of a torch weight: orthogonal either way.
                    nn.init.orthogonal_(block.t(), gain=GAIN)
        orthogonal_blocks(self.project, [d_model])

    @property
    def feature_dim(self) -> int:
        return self.nu * self.d_head

    def forward(
        self,
        x: torch.Tensor,
        dones: torch.Tensor | None,
        memory: Memory,
        tick: torch.Tensor | None = None,
        memory_out: Memory | None = None,
        *,
        slots: torch.Tensor | None = None,
        restart: tuple[torch.Tensor, ...] | None = None,
        check_slots: bool | None = None,
    ) -> tuple[torch.Tensor, Memory]:
        """x (B, T, d_model); dones (B, T) or None; memory (c, s); tick: unused (GaLiTe has none), None;
        memory_out: optional buffers for the new memory (inference only); slots, restart, check_slots: see
        ``galite_recurrence``."""
        if tick is not None:
            raise ValueError(f"tick: GaLiTe has no tick, expected None, got {type(tick).__name__}")
        H, D, nu = self.n_heads, self.d_head, self.nu
        z = self.in_proj(x)
        keys, q_pre, values, beta, gamma = z[..., : self.n_dims].unflatten(-1, (H, 5, D)).unbind(-2)
        p1, p3 = z[..., self.n_dims :].unflatten(-1, (H, 2, nu)).unbind(-2)
        # (B, T, H, D) x (H, D, D + nu): one matmul per head over all B T rows. A broadcast matmul of
        # (B, T, H, 1, D) rows would first expand the weight to B T H copies (69 MB per layer at B = 1024).
        # Under autocast the matmul gives the autocast dtype; the float32 bias must not promote the queries
        # past the other projections.
        qz = torch.einsum("bthd,hde->bthe", q_pre, self.q_weight)
        qz = qz + self.q_bias.to(qz.dtype)
        queries, p2 = qz.split([D, nu], dim=-1)
        out, new_memory = galite_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3,
            dones if self.reset_on_terminate else None,
            *memory, eps=self.eps, backend=self.backend, final_out=memory_out, slots=slots, restart=restart,
            check_slots=check_slots,
        )  # fmt: skip
        return self.project(out.flatten(-2)), new_memory
