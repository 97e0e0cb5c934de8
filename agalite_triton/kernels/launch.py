"""Host-side helpers shared by the launchers: padded sizes, launch configurations, strides and output
allocation. The launch configuration itself lives in ``config.py`` (one table, one source of truth).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..oscillator import oscillator_period
from .config import LaunchConfig, get_config

__all__ = [
    "Dims",
    "GaliteDims",
    "POISON_OUTPUTS",
    "acc_dtype",
    "dims_of",
    "galite_dims_of",
    "into_buffers",
    "needs_grad_of",
    "shares_memory",
    "step_buffers",
    "check_in_place",
    "dones_arg",
    "last_dim_contiguous",
    "new_output",
    "same_strides",
    "state_strides",
]

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

    def config(self, kernel: str) -> LaunchConfig:
        """This launch's entry of the launch-configuration table (read at launch time)."""
        return get_config(kernel, self.r_pad, self.eta_pad, self.d_pad)


def dims_of(keys: torch.Tensor, eta: int, r: int) -> Dims:
    """Sizes from (B, T, H, D) keys, the feature multiplier eta and the number of oscillators R."""
    batch, steps, heads, dim = keys.shape
    return Dims(
        batch, steps, heads, dim, eta, r, oscillator_period(r),
        triton.next_power_of_2(dim), triton.next_power_of_2(eta), triton.next_power_of_2(r),
    )  # fmt: skip


@dataclass(frozen=True)
class GaliteDims:
    """GaLiTe's sizes: a head's memory is (D, K) with K = nu * D, held as [rows, D_PAD, NU_PAD] tiles."""

    batch: int
    steps: int
    heads: int
    dim: int
    nu: int
    d_pad: int
    nu_pad: int

    @property
    def feat_pad(self) -> int:
        """Padded values of one memory row (and of s): the unit of checkpoints and scratch."""
        return self.d_pad * self.nu_pad

    def config(self, kernel: str) -> LaunchConfig:
        """Classed by a head's padded memory, D_PAD * NU_PAD * D_PAD values."""
        return get_config(kernel, self.d_pad, self.nu_pad, self.d_pad)

    def rows(self, kernel: str) -> int:
        """Value rows per program (the table's ``rows``, at most D_PAD)."""
        return min(self.config(kernel).rows, self.d_pad)

    def row_blocks(self, kernel: str) -> int:
        return triton.cdiv(self.dim, self.rows(kernel))


def galite_dims_of(keys: torch.Tensor, nu: int) -> GaliteDims:
    """Sizes from (B, T, H, D) keys and the feature multiplier nu."""
    batch, steps, heads, dim = keys.shape
    return GaliteDims(batch, steps, heads, dim, nu, triton.next_power_of_2(dim), triton.next_power_of_2(nu))


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage (an in-place call)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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


def state_strides(tilde_k: torch.Tensor, tilde_v: torch.Tensor, s: torch.Tensor) -> tuple[int, ...]:
    """The (b, r, h) strides of tilde_k and tilde_v and the (b, h) strides of s, in the kernels' order."""
    return (*tilde_k.stride()[:3], *tilde_v.stride()[:3], *s.stride()[:2])


def dones_arg(dones: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Dones as the kernels read them: the caller's tensor itself (bool or 0/1 floating, any strides;
    the kernels convert each flag as they load it), with its (batch, time) strides. Without dones an
    empty tensor stands in (the kernels never read it)."""
    if dones is None:
        return like.new_empty(0, dtype=torch.float32), 0, 0
    if dones.dim() == 1:
        return dones, dones.stride(0), 0
    return dones, dones.stride(0), dones.stride(1)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def needs_grad_of(
    differentiable: tuple[torch.Tensor, ...], final_out: tuple[torch.Tensor, ...] | None, slots: torch.Tensor | None
) -> bool:
    """Whether autograd will need a backward, after checking that ``final_out`` and ``slots`` (inference
    only) are not combined with it."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if final_out is not None and needs_grad:
        raise RuntimeError("final_out: only for inference; call under torch.no_grad() or torch.inference_mode()")
    if slots is not None and final_out is None:
        raise ValueError("slots: needs final_out (the state to step in place, or another of its size), got None")
    return needs_grad


def into_buffers(
    final_out: tuple[torch.Tensor, ...], run: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``run(bufs)`` writes the final state into ``bufs``: ``final_out`` itself where every buffer has a
    unit last stride, else contiguous stand-ins (whole copies, so rows a slot step leaves alone stay as
    they were) copied back. Returns run's read-out and ``final_out``."""
    direct = all(t.stride(-1) == 1 for t in final_out)
    bufs = final_out if direct else tuple(t.contiguous() for t in final_out)
    out = run(bufs)
    if not direct:
        for dst, src in zip(final_out, bufs):
            dst.copy_(src)
    return out, final_out


def step_buffers(
    state: tuple[torch.Tensor, ...],
    in_place: bool,
    state_out: tuple[torch.Tensor, ...] | None,
    slots: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(state read, state written) of a one-step launch: the state itself (``in_place``), the caller's
    ``state_out`` or fresh tensors; a read state without a unit last stride is copied. ``slots`` writes
    rows of a state, so it needs one of the first two."""
    if in_place:
        return state, state
    state = tuple(x if x.stride(-1) == 1 else x.contiguous() for x in state)
    if state_out is not None:
        return state, tuple(state_out)
    if slots is not None:
        raise ValueError("slots: the step writes rows of a state, so it needs in_place or state_out")
    return state, tuple(new_output(tuple(x.shape), x.dtype, x.device) for x in state)


def check_in_place(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """A state updated in place by a public step API needs a unit last stride (the kernels' layout)."""
    for name, t in zip(names, tensors):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: updated in place, so its last dimension needs stride 1, got {t.stride()}")
