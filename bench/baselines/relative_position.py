"""Transformer-XL's sinusoidal relative-position embedding R_d of a query-key distance d."""

from __future__ import annotations

import torch

__all__ = ["sinusoid"]


def sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) embeddings ``[sin(d f), cos(d f)]`` with ``f_i = 10000^(-2i/dim)`` (Vaswani et al.).

    ``distances`` is any integer or float tensor; the result is float32 on its device.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim: expected an even int >= 2, got {dim!r}")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    phase = distances.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat([phase.sin(), phase.cos()], dim=-1)
