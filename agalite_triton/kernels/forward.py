"""Fused forward kernel over a (B, T) sequence: feature maps, decays, oscillators, the three
discounted sums and the normalised read-out in one pass.

Grid: one program per (b, h). The whole state of a head lives in registers in the accumulation dtype
(fp32; fp64 for fp64 inputs): tilde_k [R_PAD, ETA_PAD, D_PAD], tilde_v [R_PAD, D_PAD], s [ETA_PAD, D_PAD].
The read-out needs full sums over E and over R, so neither is split across programs; parallelism comes
from B*H. Each step reads the raw projections once (5 D-vectors and 3 eta-vectors), writes one
D-vector, and the final state is written once. With ``save_checkpoints`` the state before every
CHUNK-th step is also written (padded layout), for the backward kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..oscillator import oscillator_table, tick_residue
from .launch import (
    CHUNK,
    Dims,
    acc_dtype,
    dims_of,
    last_dim_contiguous,
    new_output,
    same_strides,
)
from .step_math import advance, key_features, load_vec, oscillators, query_features, readout, sigmoid

__all__ = ["recurrence_forward"]


@triton.jit
def load_state(tk_ptr, tv_ptr, s_ptr, b, h, stk_b, stk_r, stk_h, stv_b, stv_r, stv_h, ss_b, ss_h,
               offs_r, offs_n, offs_d, mask_r, mask_nd, D, ACC: tl.constexpr):  # fmt: skip
    """A (tilde_k, tilde_v, s) triple from (B, R, H, E), (B, R, H, D), (B, H, E) strided tensors."""
    feat = offs_n[:, None] * D + offs_d[None, :]
    mask_rnd = mask_r[:, None, None] & mask_nd[None, :, :]
    tk = tl.load(tk_ptr + b * stk_b + h * stk_h + offs_r[:, None, None] * stk_r + feat[None, :, :],
                 mask=mask_rnd, other=0.0).to(ACC)  # fmt: skip
    mask_rd = mask_r[:, None] & (offs_d < D)[None, :]
    tv = tl.load(tv_ptr + b * stv_b + h * stv_h + offs_r[:, None] * stv_r + offs_d[None, :],
                 mask=mask_rd, other=0.0).to(ACC)  # fmt: skip
    s = tl.load(s_ptr + b * ss_b + h * ss_h + feat, mask=mask_nd, other=0.0).to(ACC)
    return tk, tv, s


@triton.jit
def store_state(tk_ptr, tv_ptr, s_ptr, tk, tv, s, b, h, stk_b, stk_r, stk_h, stv_b, stv_r, stv_h, ss_b, ss_h,
                offs_r, offs_n, offs_d, mask_r, mask_nd, D):  # fmt: skip
    feat = offs_n[:, None] * D + offs_d[None, :]
    mask_rnd = mask_r[:, None, None] & mask_nd[None, :, :]
    tl.store(tk_ptr + b * stk_b + h * stk_h + offs_r[:, None, None] * stk_r + feat[None, :, :],
             tk.to(tk_ptr.dtype.element_ty), mask=mask_rnd)  # fmt: skip
    mask_rd = mask_r[:, None] & (offs_d < D)[None, :]
    tl.store(tv_ptr + b * stv_b + h * stv_h + offs_r[:, None] * stv_r + offs_d[None, :],
             tv.to(tv_ptr.dtype.element_ty), mask=mask_rd)  # fmt: skip
    tl.store(s_ptr + b * ss_b + h * ss_h + feat, s.to(s_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def store_padded(base_ptr, tk, tv, s, offs_r, offs_n, offs_d,
                 R_PAD: tl.constexpr, ETA_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    """A state triple into one padded slot (checkpoint or scratch); no masks, padding included."""
    nd = offs_n[:, None] * D_PAD + offs_d[None, :]
    tl.store(base_ptr + offs_r[:, None, None] * (ETA_PAD * D_PAD) + nd[None, :, :], tk)
    tv_base = base_ptr + R_PAD * ETA_PAD * D_PAD
    tl.store(tv_base + offs_r[:, None] * D_PAD + offs_d[None, :], tv)
    tl.store(tv_base + R_PAD * D_PAD + nd, s)


@triton.jit
def load_padded(base_ptr, offs_r, offs_n, offs_d,
                R_PAD: tl.constexpr, ETA_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    nd = offs_n[:, None] * D_PAD + offs_d[None, :]
    tk = tl.load(base_ptr + offs_r[:, None, None] * (ETA_PAD * D_PAD) + nd[None, :, :])
    tv_base = base_ptr + R_PAD * ETA_PAD * D_PAD
    tv = tl.load(tv_base + offs_r[:, None] * D_PAD + offs_d[None, :])
    s = tl.load(tv_base + R_PAD * D_PAD + nd)
    return tk, tv, s


@triton.jit(do_not_specialize=["T"])
def _forward_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr,  # (B, T, H, D), shared strides sd_*
    p1_ptr, p2_ptr, p3_ptr,  # (B, T, H, eta), shared strides se_*
    done_ptr,  # (B, T) contiguous, accumulation dtype (unused without HAS_DONES)
    tk0_ptr, tv0_ptr, s0_ptr,  # initial state, strided
    res_ptr, table_ptr,  # (B,) int64 tick mod P; (R, P) fp32 table
    out_ptr,  # (B, T, H, D) contiguous, input dtype
    tk_ptr, tv_ptr, s_ptr,  # final state, contiguous
    ckpt_ptr,  # (B*H, NC, STATE_PAD) accumulation dtype (unused without SAVE_CKPT)
    T, H, D, ETA, R, P, eps,
    sd_b, sd_t, sd_h, se_b, se_t, se_h,
    stk_b, stk_r, stk_h, stv_b, stv_r, stv_h, ss_b, ss_h,
    HAS_DONES: tl.constexpr, SAVE_CKPT: tl.constexpr, CHUNK_: tl.constexpr,
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

    tk, tv, s = load_state(tk0_ptr, tv0_ptr, s0_ptr, b, h, stk_b, stk_r, stk_h, stv_b, stv_r, stv_h, ss_b, ss_h,
                           offs_r, offs_n, offs_d, mask_r, mask_nd, D, ACC)  # fmt: skip
    two_r = 2.0 * R
    phase = tl.load(res_ptr + b)
    off_d = b * sd_b + h * sd_h
    off_e = b * se_b + h * se_h
    off_o = (b * T * H + h) * D
    NC = tl.cdiv(T, CHUNK_)
    STATE_PAD: tl.constexpr = R_PAD * ETA_PAD * D_PAD + R_PAD * D_PAD + ETA_PAD * D_PAD
    for t in range(T):
        if SAVE_CKPT:
            if t % CHUNK_ == 0:
                store_padded(ckpt_ptr + (pid * NC + t // CHUNK_) * STATE_PAD, tk, tv, s, offs_r, offs_n, offs_d,
                             R_PAD, ETA_PAD, D_PAD)  # fmt: skip
        phase = phase + 1
        phase = tl.where(phase >= P, phase - P, phase)
        c = oscillators(table_ptr, phase, P, offs_r, mask_r, ACC)
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
            keep = 1.0 - tl.load(done_ptr + b * T + t).to(ACC)
        key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
        tk, tv, s = advance(tk, tv, s, key, gate, gate_c, v, bgate, bgate_c, keep, c)
        o, _score, _den = readout(tk, tv, s, query_features(q, p2), two_r, eps)
        tl.store(out_ptr + off_o + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)
        off_d += sd_t
        off_e += se_t
        off_o += H * D

    E = ETA * D
    store_state(tk_ptr, tv_ptr, s_ptr, tk, tv, s, b, h, R * H * E, H * E, E, R * H * D, H * D, D, H * E, E,
                offs_r, offs_n, offs_d, mask_r, mask_nd, D)  # fmt: skip


def recurrence_forward(
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
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; arguments as ``agalite_recurrence`` (already validated).

    Returns out (B, T, H, D) contiguous in the input dtype, the final state (contiguous, state dtype)
    and the checkpoints (B*H, ceil(T/CHUNK), state_pad), or an empty tensor without ``save_checkpoints``.
    """
    dims = dims_of(keys, p1.shape[-1], tilde_k.shape[1])
    device, dtype = keys.device, keys.dtype
    acc = acc_dtype(dtype)
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    tilde_k, tilde_v, s = (last_dim_contiguous(x) for x in (tilde_k, tilde_v, s))
    sdt = tilde_k.dtype
    done_f = dones.to(sdt).contiguous() if dones is not None else keys.new_empty(0, dtype=sdt)
    out = new_output((dims.batch, dims.steps, dims.heads, dims.dim), dtype, device)
    tk_out = new_output(tuple(tilde_k.shape), sdt, device)
    tv_out = new_output(tuple(tilde_v.shape), sdt, device)
    s_out = new_output(tuple(s.shape), sdt, device)
    ckpt = checkpoint_buffer(dims, sdt, device, save_checkpoints)
    if dims.batch * dims.heads == 0:  # an empty grid is not a valid launch
        return out, tk_out, tv_out, s_out, ckpt
    _forward_kernel[(dims.batch * dims.heads,)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_f,
        tilde_k, tilde_v, s, tick_residue(tick, dims.r), oscillator_table(dims.r, device),
        out, tk_out, tv_out, s_out, ckpt,
        dims.steps, dims.heads, dims.dim, dims.eta, dims.r, dims.period, eps,
        keys.stride(0), keys.stride(1), keys.stride(2), p1.stride(0), p1.stride(1), p1.stride(2),
        tilde_k.stride(0), tilde_k.stride(1), tilde_k.stride(2),
        tilde_v.stride(0), tilde_v.stride(1), tilde_v.stride(2), s.stride(0), s.stride(1),
        HAS_DONES=dones is not None, SAVE_CKPT=save_checkpoints, CHUNK_=CHUNK,
        R_PAD=dims.r_pad, ETA_PAD=dims.eta_pad, D_PAD=dims.d_pad, ACC=acc,
        num_warps=dims.num_warps(),
    )  # fmt: skip
    return out, tk_out, tv_out, s_out, ckpt


def checkpoint_buffer(dims: Dims, dtype: torch.dtype, device: torch.device, save: bool) -> torch.Tensor:
    """Checkpoints are read back in full by the backward (padding included), so no poisoning here.
    Without ``save`` a 1-D empty tensor stands in (the backward tells the two apart by rank)."""
    if not save:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.empty(dims.batch * dims.heads, dims.num_chunks, dims.state_pad, dtype=dtype, device=device)
