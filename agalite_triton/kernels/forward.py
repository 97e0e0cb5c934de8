"""Fused forward kernel over a (B, T) sequence: feature maps, decays, oscillators, the three
discounted sums and the normalised read-out in one pass.

Grid: one program per (b, h). The whole state of a head lives in registers in the accumulation dtype
(fp32; fp64 for fp64 inputs): tilde_k [R_PAD, ETA_PAD, D_PAD], tilde_v [R_PAD, D_PAD], s [ETA_PAD, D_PAD].
The read-out needs full sums over E and over R, so neither is split across programs; parallelism comes
from B*H. Each step reads the raw projections once (5 D-vectors and 3 eta-vectors), writes one
D-vector, and the final state is written once, straight into the caller's buffers when given. With
``save_checkpoints`` the state before every chunk-th step is also written (padded layout), and each
step's scores and denominator, for the backward kernel.

Dones are read as they come (bool or 0/1 floating, any strides) and the tick residue is taken in-kernel
from the raw int64 tick, so a call launches this kernel and nothing else. With ``slots`` row b of the
projections reads and writes state row ``slots[b]`` (stepping a subset of a larger state in place);
with ``restart`` the memory before a marked step is replaced by a row of the restart memories.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..oscillator import oscillator_table, step_residues
from .launch import (
    Dims,
    acc_dtype,
    dims_of,
    dones_arg,
    last_dim_contiguous,
    new_output,
    same_strides,
    state_strides,
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
                offs_r, offs_n, offs_d, mask_r, mask_nd, D, STORE_TV: tl.constexpr = True):  # fmt: skip
    feat = offs_n[:, None] * D + offs_d[None, :]
    mask_rnd = mask_r[:, None, None] & mask_nd[None, :, :]
    tl.store(tk_ptr + b * stk_b + h * stk_h + offs_r[:, None, None] * stk_r + feat[None, :, :],
             tk.to(tk_ptr.dtype.element_ty), mask=mask_rnd)  # fmt: skip
    if STORE_TV:
        mask_rd = mask_r[:, None] & (offs_d < D)[None, :]
        tl.store(tv_ptr + b * stv_b + h * stv_h + offs_r[:, None] * stv_r + offs_d[None, :],
                 tv.to(tv_ptr.dtype.element_ty), mask=mask_rd)  # fmt: skip
    tl.store(s_ptr + b * ss_b + h * ss_h + feat, s.to(s_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def store_padded(base_ptr, tk, tv, s, offs_r, offs_n, offs_d,
                 R_PAD: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    """A state triple into one padded slot (checkpoint or scratch) laid out for N_PAD feature rows;
    ``offs_n`` index those rows. No masks: padding included."""
    nd = offs_n[:, None] * D_PAD + offs_d[None, :]
    tl.store(base_ptr + offs_r[:, None, None] * (N_PAD * D_PAD) + nd[None, :, :], tk)
    tv_base = base_ptr + R_PAD * N_PAD * D_PAD
    tl.store(tv_base + offs_r[:, None] * D_PAD + offs_d[None, :], tv)
    tl.store(tv_base + R_PAD * D_PAD + nd, s)


@triton.jit
def load_padded(base_ptr, offs_r, offs_n, offs_d,
                R_PAD: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    """The inverse of ``store_padded``; ``offs_n`` may pick a subset of the N_PAD rows (a split)."""
    nd = offs_n[:, None] * D_PAD + offs_d[None, :]
    tk = tl.load(base_ptr + offs_r[:, None, None] * (N_PAD * D_PAD) + nd[None, :, :])
    tv_base = base_ptr + R_PAD * N_PAD * D_PAD
    tv = tl.load(tv_base + offs_r[:, None] * D_PAD + offs_d[None, :])
    s = tl.load(tv_base + R_PAD * D_PAD + nd)
    return tk, tv, s


@triton.jit(do_not_specialize=["T"])
def _forward_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr,  # (B, T, H, D), shared strides sd_*
    p1_ptr, p2_ptr, p3_ptr,  # (B, T, H, eta), shared strides se_*
    done_ptr,  # (B, T) bool or floating, strides sn_* (unused without HAS_DONES)
    tick_ptr,  # (B_s,) int64 raw ticks, stride stk_t; with RESTART (B, T) contiguous residues of each step's tick
    slot_ptr,  # (B,) int64 state row of each projection row, stride ssl (HAS_SLOTS)
    ridx_ptr,  # (B, T) int64 contiguous restart index, -1 = none (RESTART)
    tk0_ptr, tv0_ptr, s0_ptr,  # initial state, strides i*
    rtk_ptr, rtv_ptr, rs_ptr,  # (N, ...) contiguous restart memories (RESTART)
    table_ptr,  # (R, P) fp32 oscillator table
    out_ptr,  # (B, T, H, D) contiguous, input dtype
    tk_ptr, tv_ptr, s_ptr,  # final state, strides o*; may be the initial state itself
    saved_ptr,  # (B*H, NC * STATE_PAD + T * (R_PAD + 1)), state dtype (SAVE_CKPT): see saved_length
    T, H, D, ETA, R, P, eps,
    sd_b: tl.int64, sd_t: tl.int64, sd_h: tl.int64, se_b: tl.int64, se_t: tl.int64, se_h: tl.int64,
    sn_b: tl.int64, sn_t: tl.int64, stk_t: tl.int64, ssl: tl.int64,
    itk_b: tl.int64, itk_r: tl.int64, itk_h: tl.int64, itv_b: tl.int64, itv_r: tl.int64, itv_h: tl.int64,
    is_b: tl.int64, is_h: tl.int64,
    otk_b: tl.int64, otk_r: tl.int64, otk_h: tl.int64, otv_b: tl.int64, otv_r: tl.int64, otv_h: tl.int64,
    os_b: tl.int64, os_h: tl.int64,
    HAS_DONES: tl.constexpr, SAVE_CKPT: tl.constexpr, HAS_SLOTS: tl.constexpr, RESTART: tl.constexpr,
    CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
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
    E = ETA * D

    row = b
    if HAS_SLOTS:
        row = tl.load(slot_ptr + b * ssl)
    tk, tv, s = load_state(tk0_ptr, tv0_ptr, s0_ptr, row, h, itk_b, itk_r, itk_h, itv_b, itv_r, itv_h, is_b, is_h,
                           offs_r, offs_n, offs_d, mask_r, mask_nd, D, ACC)  # fmt: skip
    two_r = 2.0 * R
    phase = tl.zeros([], dtype=tl.int64)
    if not RESTART:
        phase = tick_phase(tl.load(tick_ptr + row * stk_t), P)
    off_d = b * sd_b + h * sd_h
    off_e = b * se_b + h * se_h
    off_o = (b * T * H + h) * D
    STATE_PAD: tl.constexpr = R_PAD * ETA_PAD * D_PAD + R_PAD * D_PAD + ETA_PAD * D_PAD
    ckpt_len = tl.cdiv(T, CHUNK).to(tl.int64) * STATE_PAD
    saved = saved_ptr + pid * (ckpt_len + T * (R_PAD + 1))
    for t in tl.range(0, T, num_stages=NUM_STAGES):
        if SAVE_CKPT:
            if t % CHUNK == 0:
                store_padded(saved + (t // CHUNK) * STATE_PAD, tk, tv, s, offs_r, offs_n, offs_d,
                             R_PAD, ETA_PAD, D_PAD)  # fmt: skip
        if RESTART:
            n = tl.load(ridx_ptr + b * T + t)
            if n >= 0:
                tk, tv, s = load_state(rtk_ptr, rtv_ptr, rs_ptr, n, h, R * H * E, H * E, E, R * H * D, H * D, D,
                                       H * E, E, offs_r, offs_n, offs_d, mask_r, mask_nd, D, ACC)  # fmt: skip
            phase = tl.load(tick_ptr + b * T + t)
        else:
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
            keep = keep_of(done_ptr + b * sn_b + t * sn_t, ACC)
        key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
        tk, tv, s = advance(tk, tv, s, key, gate, gate_c, v, bgate, bgate_c, keep, c)
        o, score, den = readout(tk, tv, s, query_features(q, p2), two_r, eps)
        tl.store(out_ptr + off_o + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)
        if SAVE_CKPT:
            aux = saved + ckpt_len + t * (R_PAD + 1)
            tl.store(aux + offs_r, score.to(saved_ptr.dtype.element_ty))
            tl.store(aux + R_PAD, den.to(saved_ptr.dtype.element_ty))
        off_d += sd_t
        off_e += se_t
        off_o += H * D

    # The final state may overwrite the initial one (an in-place call): every thread must have read
    # its share of the initial state before any thread writes.
    tl.debug_barrier()
    store_state(tk_ptr, tv_ptr, s_ptr, tk, tv, s, row, h, otk_b, otk_r, otk_h, otv_b, otv_r, otv_h, os_b, os_h,
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
    chunk: int,
    *,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
    state_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; arguments as ``agalite_recurrence`` (already validated).

    ``chunk`` is the checkpoint interval (the caller takes it from the launch table and hands the same
    value to the backward). ``state_out``: buffers (state-shaped, unit last stride, possibly the state
    itself) that receive the final state; required with ``slots``, whose rows are the only ones written.

    Returns out (B, T, H, D) contiguous in the input dtype, the final state (``state_out`` or fresh
    contiguous tensors, state dtype) and, with ``save_checkpoints``, one buffer holding the checkpoints
    (B*H, ceil(T/chunk) * state_pad) followed by each step's scores and denominator (T * (R_PAD + 1)
    values; every value is written, padding included), or a 1-D empty tensor without.
    """
    dims = dims_of(keys, p1.shape[-1], tilde_k.shape[1])
    cfg = dims.config("forward")
    device, dtype = keys.device, keys.dtype
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    tilde_k, tilde_v, s = (last_dim_contiguous(x) for x in (tilde_k, tilde_v, s))
    sdt = tilde_k.dtype
    done_t, sn_b, sn_t = dones_arg(dones, keys)
    out = new_output((dims.batch, dims.steps, dims.heads, dims.dim), dtype, device)
    if state_out is None:
        state_out = tuple(new_output(tuple(x.shape), sdt, device) for x in (tilde_k, tilde_v, s))
    saved = saved_buffer(dims, chunk, sdt, device, save_checkpoints)
    empty_i64 = tick.new_empty(0)
    if restart is not None:
        index, tk_r, tv_r, s_r, tick_r = restart
        r = dims.r
        tick_arg = step_residues(tick, dims.steps, r, index, tick_r).contiguous()
        index = index.contiguous()
        tk_r, tv_r, s_r = (x.contiguous() for x in (tk_r, tv_r, s_r))
    else:
        index, tick_arg = empty_i64, tick
        tk_r, tv_r, s_r = tilde_k, tilde_v, s  # never read
    if dims.batch * dims.heads == 0:  # an empty grid is not a valid launch
        return out, *state_out, saved
    _forward_kernel[(dims.batch * dims.heads,)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_t, tick_arg,
        slots if slots is not None else empty_i64, index,
        tilde_k, tilde_v, s, tk_r, tv_r, s_r, oscillator_table(dims.r, device),
        out, *state_out, saved,
        dims.steps, dims.heads, dims.dim, dims.eta, dims.r, dims.period, eps,
        keys.stride(0), keys.stride(1), keys.stride(2), p1.stride(0), p1.stride(1), p1.stride(2), sn_b, sn_t,
        tick_arg.stride(0), slots.stride(0) if slots is not None else 0,
        *state_strides(tilde_k, tilde_v, s), *state_strides(*state_out),
        HAS_DONES=dones is not None, SAVE_CKPT=save_checkpoints, HAS_SLOTS=slots is not None,
        RESTART=restart is not None, CHUNK=chunk if save_checkpoints else 1, NUM_STAGES=cfg.num_stages,
        R_PAD=dims.r_pad, ETA_PAD=dims.eta_pad, D_PAD=dims.d_pad, ACC=acc_dtype(dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out, *state_out, saved


def saved_length(dims: Dims, chunk: int) -> int:
    """Values per (b, h) of what a forward keeps for its backward: checkpoints, then scores/denominators."""
    return triton.cdiv(dims.steps, chunk) * dims.state_pad + dims.steps * (dims.r_pad + 1)


def saved_buffer(dims: Dims, chunk: int, dtype: torch.dtype, device: torch.device, save: bool) -> torch.Tensor:
    """Checkpoints are read back in full by the backward (padding included), so no poisoning here.
    Without ``save`` a 1-D empty tensor stands in (the backward tells the two apart by rank)."""
    if not save:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.empty(dims.batch * dims.heads, saved_length(dims, chunk), dtype=dtype, device=device)
