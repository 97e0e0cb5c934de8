"""Shared input checking for the baselines' ``y, state = core(x, state, dones)`` call."""

from __future__ import annotations

import torch

__all__ = ["as_sequence"]


def as_sequence(
    x: torch.Tensor, dones: torch.Tensor | None, input_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Validate ``x`` (B, T, input_dim) or one step (B, input_dim) and ``dones`` (B, T) / (B,).

    Returns x as (B, T, input_dim), dones as bool (B, T) or None, and whether the call was one step.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() not in (2, 3) or x.shape[-1] != input_dim:
        raise ValueError(f"x: expected shape (B, T, {input_dim}) or (B, {input_dim}), got {tuple(x.shape)}")
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(1)
    if dones is None:
        return x, None, single
    expected = x.shape[:1] if single else x.shape[:2]
    if not isinstance(dones, torch.Tensor) or tuple(dones.shape) != tuple(expected):
        raise ValueError(f"dones: expected shape {tuple(expected)}, got {tuple(getattr(dones, 'shape', ()))}")
    if dones.device != x.device:
        raise ValueError(f"dones: expected device {x.device}, got {dones.device}")
    dones = dones.bool()
    return x, (dones.unsqueeze(1) if single else dones), single
