"""One-step GaLiTe kernel for rollouts (T = 1), in place or out of place, and its public in-place API.

Built for an acting loop captured in a CUDA graph, as AGaLiTe's (``step.py``): done flags are read
in-kernel as they come, nothing is read back to the host and the launch configuration is fixed.

Grid: one program per (b, h). The program walks the (D, K) memory in blocks of BJ value rows (the
table's ``rows``): each block is read, updated, read out and written back before the next, so registers
hold one block and an in-place step never has another program reading what this one writes; s is
written once, after the last block. With ``slots``, row b of the
projections reads and writes memory row ``slots[b]`` of a larger memory, through the index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_galite_args
from .galite_math import advance, load_memory_rows, load_norm, load_step, readout, store_memory_rows, store_norm
from .launch import acc_dtype, check_in_place, dones_arg, galite_dims_of, new_output, same_strides, step_buffers
from .step_math import keep_of

__all__ = ["galite_step_", "galite_step_forward"]


@triton.jit
def _galite_step_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr,  # (B, H, D), shared strides sd_*
    p1_ptr, p2_ptr, p3_ptr,  # (B, H, nu), shared strides se_*
    done_ptr,  # (B,) bool or floating, stride sn_b (HAS_DONES)
    slot_ptr,  # (B,) int64 memory rows, stride ssl (HAS_SLOTS)
    c_in, s_in, c_out, s_out,  # memories; out may equal in (in place)
    out_ptr,  # (B, H, D) contiguous read-out
    H, D, NU, eps,
    sd_b: tl.int64, sd_h: tl.int64, se_b: tl.int64, se_h: tl.int64, sn_b: tl.int64, ssl: tl.int64,
    ic_b: tl.int64, ic_h: tl.int64, ic_j: tl.int64, is_b: tl.int64, is_h: tl.int64,
    oc_b: tl.int64, oc_h: tl.int64, oc_j: tl.int64, os_b: tl.int64, os_h: tl.int64,
    HAS_DONES: tl.constexpr, HAS_SLOTS: tl.constexpr,
    BJ: tl.constexpr, D_PAD: tl.constexpr, NU_PAD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_i = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, NU_PAD)
    mask_i = offs_i < D
    mask_n = offs_n < NU
    mask_in = mask_i[:, None] & mask_n[None, :]
    feat = offs_i[:, None] * NU + offs_n[None, :]

    row = b
    if HAS_SLOTS:
        row = tl.load(slot_ptr + b * ssl)
    off_d = b * sd_b + h * sd_h
    off_e = b * se_b + h * se_h
    keep = 1.0
    if HAS_DONES:
        keep = keep_of(done_ptr + b * sn_b, ACC)
    s_prev = load_norm(s_in, row, h, is_b, is_h, feat, mask_in, ACC)
    s = s_prev
    for jb in range(0, tl.cdiv(D, BJ)):
        offs_j = jb * BJ + tl.arange(0, BJ)
        mask_j = offs_j < D
        # The key side and s_t are the same for every block (recomputed, as the sequence kernels do, so the
        # step is bitwise their T = 1).
        _k, _q, _p1, _p2, v, kg, query, omg, _g, _sg, _sng, _sp3, _snp3, bgate, bgate_c = load_step(
            k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, off_d, off_e, offs_i, mask_i,
            offs_n, mask_n, offs_j, mask_j, mask_in, ACC)  # fmt: skip
        c = load_memory_rows(c_in, row, h, ic_b, ic_h, ic_j, offs_j, feat, mask_j, mask_in, ACC)
        c, s, _decay = advance(c, s_prev, kg, omg, v, bgate, bgate_c, keep)
        o, _den = readout(c, s, query, eps)
        tl.store(out_ptr + (b * H + h) * D + offs_j, o.to(out_ptr.dtype.element_ty), mask=mask_j)
        # In place, every thread must have read the block before any thread overwrites it.
        tl.debug_barrier()
        store_memory_rows(c_out, c, row, h, oc_b, oc_h, oc_j, offs_j, feat, mask_j, mask_in)
    tl.debug_barrier()
    store_norm(s_out, s, row, h, os_b, os_h, feat, mask_in)


def galite_step_forward(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    c: torch.Tensor,
    s: torch.Tensor,
    eps: float,
    in_place: bool,
    state_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the step kernel on (B, H, D) / (B, H, nu) projections and (B,) dones.

    The new memory goes to the argument memory (``in_place``), to ``state_out`` (buffers shaped like the
    memory; they may be the memory itself) or to fresh contiguous tensors; written tensors need a unit
    last stride. With ``slots`` (N,) the projections have N rows and the memory B_s: only rows ``slots``
    are read and written, so ``slots`` needs ``in_place`` or ``state_out``.
    """
    batch, heads, dim = keys.shape
    dims = galite_dims_of(keys.unsqueeze(1), p1.shape[-1])
    cfg = dims.config("galite_step")
    device = keys.device
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    (c, s), (c_out, s_out) = step_buffers((c, s), in_place, state_out, slots)
    done_t, sn_b, _ = dones_arg(dones, keys)
    out = new_output((batch, heads, dim), keys.dtype, device)
    if batch * heads == 0:  # an empty grid is not a valid launch
        return out, c_out, s_out
    _galite_step_kernel[(batch * heads,)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_t,
        slots if slots is not None else torch.empty(0, dtype=torch.int64, device=device),
        c, s, c_out, s_out, out, heads, dim, dims.nu, eps,
        keys.stride(0), keys.stride(1), p1.stride(0), p1.stride(1), sn_b, slots.stride(0) if slots is not None else 0,
        *c.stride()[:3], *s.stride()[:2], *c_out.stride()[:3], *s_out.stride()[:2],
        HAS_DONES=dones is not None, HAS_SLOTS=slots is not None,
        BJ=dims.rows("galite_step"), D_PAD=dims.d_pad, NU_PAD=dims.nu_pad, ACC=acc_dtype(keys.dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out, c_out, s_out


@torch.library.custom_op("agalite_triton::galite_step_", mutates_args=("c", "s"))
def _galite_step_inplace_op(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    c: torch.Tensor,
    s: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return galite_step_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, in_place=True)[0]


@_galite_step_inplace_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps):
    return keys.new_empty(keys.shape)


def galite_step_(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    c: torch.Tensor,
    s: torch.Tensor,
    *,
    eps: float = 1e-10,
) -> torch.Tensor:
    """One GaLiTe step for every environment, updating the memory ``(c, s)`` in place.

    Args:
        keys, queries, values, beta, gamma: (B, H, D) raw projections of this step (any outer strides).
        p1, p2, p3: (B, H, nu) raw projections.
        dones: (B,) bool or 0/1 floating, or None: environments whose memory is zeroed before this step.
        c (B, H, D, K), s (B, H, K): float32 memory (float64 for float64 inputs), updated in place; the
            last dimension must have unit stride.

    Returns:
        The read-out (B, H, D) in the input dtype. Not differentiable.
    """
    check_galite_args(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, has_time=False)
    check_in_place(("c", "s"), (c, s))
    return _galite_step_inplace_op(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps)
