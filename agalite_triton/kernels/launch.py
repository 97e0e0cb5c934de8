"""Host-side helpers shared by the launchers: tile sizes, warp counts, oscillator tables, strides and
output allocation.

Warp counts are fixed from the size of the largest register tile (tilde_k, R_PAD*ETA_PAD*D_PAD fp32
values per program) rather than autotuned: the one-step kernel updates live state in place, where an
autotuner re-running the kernel would corrupt it, and no GPU was available to tune the sequence
kernels. The counts were chosen from ptxas register/spill reports for sm_90 (compiled without a GPU):
the forward and step kernels use 64-125 registers and never spill at these counts; the backward holds
about three state tiles plus temporaries and is spill-free at the paper size (R=2, eta=4, D=64: 8 warps,
246 registers), spills a few bytes up to 2048-value tiles, and spills heavily beyond (e.g. R=8, eta=4,
D=128), where splitting R or E across programs would be the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..oscillator import oscillator_period

__all__ = [
    "CHUNK",
    "Dims",
    "POISON_OUTPUTS",
    "acc_dtype",
    "dims_of",
    "last_dim_contiguous",
    "new_output",
    "same_strides",
]

# Steps between two forward-state checkpoints kept for the backward pass (see backward.py). The
# backward holds CHUNK recomputed states per (b, h) in scratch, the checkpoints cost T / CHUNK states:
# 16 balances the two for the T ~ 128-1024 of RL training and keeps both far below T states.
CHUNK = 16

# Test hook: when True every kernel output is allocated filled with NaN, so an element a kernel
# forgets to write fails the comparison instead of silently holding a plausible stale value.
POISON_OUTPUTS = False


@dataclass(frozen=True)
class Dims:
    batch: int
    steps: int
    heads: int
    dim: int
    eta: int
    r: int
    period: int
    d_pad: int
    eta_pad: int
    r_pad: int

    @property
    def feat(self) -> int:
        return self.eta * self.dim

    @property
    def state_pad(self) -> int:
        """fp32 values of one padded (tilde_k, tilde_v, s) triple, the unit of checkpoints and scratch."""
        return self.r_pad * self.eta_pad * self.d_pad + self.r_pad * self.d_pad + self.eta_pad * self.d_pad

    @property
    def num_chunks(self) -> int:
        return triton.cdiv(self.steps, CHUNK)

    def num_warps(self, backward: bool = False) -> int:
        tile = self.r_pad * self.eta_pad * self.d_pad
        if backward:
            return 4 if tile <= 256 else 8 if tile <= 2048 else 16
        return 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 2048 else 8


def dims_of(keys: torch.Tensor, eta: int, r: int) -> Dims:
    """Sizes from (B, T, H, D) keys, the feature multiplier eta and the number of oscillators R."""
    batch, steps, heads, dim = keys.shape
    return Dims(
        batch, steps, heads, dim, eta, r, oscillator_period(r),
        triton.next_power_of_2(dim), triton.next_power_of_2(eta), triton.next_power_of_2(r),
    )  # fmt: skip


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulation dtype in-kernel: float64 inputs keep a float64 oracle path, all others fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any outer strides but need a unit stride along the last dimension."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def same_strides(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One set of (B, T, H) strides serves a whole group of inputs. Views of one fused projection
    already share them; any other mix is copied to contiguous once rather than passing more strides."""
    tensors = tuple(last_dim_contiguous(t) for t in tensors)
    if all(t.stride() == tensors[0].stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
