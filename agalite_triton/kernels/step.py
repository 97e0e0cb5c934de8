"""One-step kernel for rollouts (T = 1), in place or out of place, and its public functional API.

Built for an acting loop captured in a CUDA graph: the done flags (bool or 0/1 floating, any stride)
and the raw int64 tick are read in-kernel (the residue tick mod P is taken there), so a step launches
this kernel and nothing else; nothing reads a value back to the host, and the launch config is fixed
(no autotuner, which would re-run the kernel on live state). The oscillator table is created on the
first call and cached, so run one step before capturing (Triton compiles on that call anyway); a first
call inside a capture raises (see ``oscillator_table``).

In place, each program reads its (b, h) state into registers, computes the read-out from the
unrounded updated state, and only then writes the state back. With ``slots``, row b of the projections
reads and writes state row ``slots[b]`` (and its tick) of a larger state, through the index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_recurrence_args
from ..oscillator import oscillator_table
from .forward import load_state, store_state
from .launch import (
    acc_dtype,
    check_in_place,
    dims_of,
    dones_arg,
    new_output,
    same_strides,
    state_strides,
    step_buffers,
)
from .step_math import (
    advance,
    keep_of,
    key_features,
    load_vec,
    oscillators,
    query_features,
    readout,
    sigmoid,
    tick_phase,
)

__all__ = ["agalite_step_", "step_forward"]


@triton.jit
def _step_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr,  # (B, H, D), shared strides sd_*
    p1_ptr, p2_ptr, p3_ptr,  # (B, H, eta), shared strides se_*
    done_ptr,  # (B,) bool or floating, stride sn_b (unused without HAS_DONES)
    tick_ptr, slot_ptr,  # (B_s,) int64 raw ticks, stride stk_t; (B,) int64 state rows, stride ssl (HAS_SLOTS)
    tk_in, tv_in, s_in, tk_out, tv_out, s_out,  # states; out may equal in (in place)
    table_ptr, out_ptr,  # (R, P) table, (B, H, D) contiguous read-out
    H, D, ETA, R, P, eps,
    sd_b: tl.int64, sd_h: tl.int64, se_b: tl.int64, se_h: tl.int64, sn_b: tl.int64, stk_t: tl.int64, ssl: tl.int64,
    itk_b: tl.int64, itk_r: tl.int64, itk_h: tl.int64, itv_b: tl.int64, itv_r: tl.int64, itv_h: tl.int64,
    is_b: tl.int64, is_h: tl.int64,
    otk_b: tl.int64, otk_r: tl.int64, otk_h: tl.int64, otv_b: tl.int64, otv_r: tl.int64, otv_h: tl.int64,
    os_b: tl.int64, os_h: tl.int64,
    HAS_DONES: tl.constexpr, HAS_SLOTS: tl.constexpr,
    R_PAD: tl.constexpr, ETA_PAD: tl.constexpr, D_PAD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, ETA_PAD)
    offs_r = tl.arange(0, R_PAD)
    mask_d = offs_d < D
    mask_n = offs_n < ETA
    mask_r = offs_r < R
    mask_nd = mask_n[:, None] & mask_d[None, :]

    row = b
    if HAS_SLOTS:
        row = tl.load(slot_ptr + b * ssl)
    tk, tv, s = load_state(tk_in, tv_in, s_in, row, h, itk_b, itk_r, itk_h, itv_b, itv_r, itv_h, is_b, is_h,
                           offs_r, offs_n, offs_d, mask_r, mask_nd, D, ACC)  # fmt: skip
    phase = tick_phase(tl.load(tick_ptr + row * stk_t), P) + 1
    phase = tl.where(phase >= P, phase - P, phase)
    c = oscillators(table_ptr, phase, P, offs_r, mask_r, ACC)
    off_d = b * sd_b + h * sd_h
    off_e = b * se_b + h * se_h
    k = load_vec(k_ptr + off_d, offs_d, mask_d, ACC)
    q = load_vec(q_ptr + off_d, offs_d, mask_d, ACC)
    v = load_vec(v_ptr + off_d, offs_d, mask_d, ACC)
    beta_logit = load_vec(beta_ptr + off_d, offs_d, mask_d, ACC)
    bgate, bgate_c = sigmoid(beta_logit), sigmoid(-beta_logit)
    gam = load_vec(gamma_ptr + off_d, offs_d, mask_d, ACC)
    p1 = load_vec(p1_ptr + off_e, offs_n, mask_n, ACC)
    p2 = load_vec(p2_ptr + off_e, offs_n, mask_n, ACC)
    p3 = load_vec(p3_ptr + off_e, offs_n, mask_n, ACC)
    keep = 1.0
    if HAS_DONES:
        keep = keep_of(done_ptr + b * sn_b, ACC)
    key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
    tk, tv, s = advance(tk, tv, s, key, gate, gate_c, v, bgate, bgate_c, keep, c)
    o, _score, _den = readout(tk, tv, s, query_features(q, p2), 2.0 * R, eps)
    tl.store(out_ptr + (b * H + h) * D + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)
    # In place, every thread must have read its state before any thread overwrites it.
    tl.debug_barrier()
    store_state(tk_out, tv_out, s_out, tk, tv, s, row, h, otk_b, otk_r, otk_h, otv_b, otv_r, otv_h, os_b, os_h,
                offs_r, offs_n, offs_d, mask_r, mask_nd, D)  # fmt: skip


def step_forward(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    tilde_k: torch.Tensor,
    tilde_v: torch.Tensor,
    s: torch.Tensor,
    tick: torch.Tensor,
    eps: float,
    in_place: bool,
    state_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the step kernel on (B, H, D) / (B, H, eta) projections and (B,) dones.

    The new state goes to the argument state (``in_place``), to ``state_out`` (caller's buffers, shaped
    like the state; they may be the state itself) or to fresh contiguous tensors; written state tensors
    need a unit last stride (checked by the public callers), and are returned. With ``slots`` (N,) the
    projections have N rows and the state (and tick) B_s: only rows ``slots`` are read and written, so
    ``slots`` needs ``in_place`` or ``state_out``.

    Launches the step kernel and nothing else (no conversion of dones or ticks on the host side), as
    long as the projections of a group share strides (views of one fused projection do).
    """
    batch, heads, dim = keys.shape
    eta, r = p1.shape[-1], tilde_k.shape[1]
    dims = dims_of(keys.unsqueeze(1), eta, r)
    cfg = dims.config("step")
    device = keys.device
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    (tilde_k, tilde_v, s), (tk_out, tv_out, s_out) = step_buffers((tilde_k, tilde_v, s), in_place, state_out, slots)
    done_t, sn_b, _ = dones_arg(dones, keys)
    out = new_output((batch, heads, dim), keys.dtype, device)
    if batch * heads == 0:  # an empty grid is not a valid launch
        return out, tk_out, tv_out, s_out
    _step_kernel[(batch * heads,)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_t,
        tick, slots if slots is not None else tick.new_empty(0),
        tilde_k, tilde_v, s, tk_out, tv_out, s_out, oscillator_table(r, device), out,
        heads, dim, eta, r, dims.period, eps,
        keys.stride(0), keys.stride(1), p1.stride(0), p1.stride(1), sn_b,
        tick.stride(0), slots.stride(0) if slots is not None else 0,
        *state_strides(tilde_k, tilde_v, s), *state_strides(tk_out, tv_out, s_out),
        HAS_DONES=dones is not None, HAS_SLOTS=slots is not None,
        R_PAD=dims.r_pad, ETA_PAD=dims.eta_pad, D_PAD=dims.d_pad, ACC=acc_dtype(keys.dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out, tk_out, tv_out, s_out


@torch.library.custom_op("agalite_triton::step_", mutates_args=("tilde_k", "tilde_v", "s"))
def _step_inplace_op(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    tilde_k: torch.Tensor,
    tilde_v: torch.Tensor,
    s: torch.Tensor,
    tick: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return step_forward(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, in_place=True
    )[0]


@_step_inplace_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps):
    return keys.new_empty(keys.shape)


def agalite_step_(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    tilde_k: torch.Tensor,
    tilde_v: torch.Tensor,
    s: torch.Tensor,
    tick: torch.Tensor,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """One recurrence step for every environment, updating ``(tilde_k, tilde_v, s)`` in place.

    Args:
        keys, queries, values, beta, gamma: (B, H, D) raw projections of this step (any outer strides).
        p1, p2, p3: (B, H, eta) raw projections.
        dones: (B,) bool or 0/1 floating, or None: environments whose memory is zeroed before this step.
        tilde_k (B, R, H, E), tilde_v (B, R, H, D), s (B, H, E): float32 state (float64 for float64
            inputs), updated in place; the last dimension must have unit stride.
        tick: (B,) int64, the tick before the step (this step uses tick + 1). Not modified: the caller
            advances it, as for ``agalite_recurrence``.

    Returns:
        The read-out (B, H, D) in the input dtype. Not differentiable.
    """
    check_recurrence_args(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, has_time=False
    )
    check_in_place(("tilde_k", "tilde_v", "s"), (tilde_k, tilde_v, s))
    return _step_inplace_op(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps)
