"""Fused forward kernel of the GaLiTe recurrence over a (B, T) sequence: feature maps, gates, the memory
update and the normalised read-out in one pass, the memory held in registers across the time loop.

Grid: (B * H, ceil(D / BJ)). A program owns BJ value rows of a head's (D, K) memory, a [BJ, D_PAD, NU_PAD]
tile in the accumulation dtype (fp32; fp64 for fp64 inputs). Each entry decays by its own
``1 - b_j G_k``, which is not a product of a row and a column factor, so no chunked (matmul) form
exists and the rows are independent: splitting them across programs costs only the normaliser s (K
values), which every program keeps whole because its rows' read-out divides by ``<s, Q>``; row block 0
writes it. With ``save_checkpoints`` the memory before every CHUNK-th step is written (rows padded to
D_PAD * NU_PAD values, s after them) for the backward, which recomputes the chunks from there.

Dones are read as they come (bool or 0/1 floating, any strides). With ``slots`` row b of the projections
reads and writes memory row ``slots[b]``; with ``restart`` the memory before a marked step is replaced
by a row of the restart memories.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .galite_math import advance, load_rows, load_step, readout, store_memory_rows, store_norm, store_slot
from .launch import (
    GaliteDims,
    acc_dtype,
    dones_arg,
    galite_dims_of,
    last_dim_contiguous,
    new_output,
    same_strides,
    shares_memory,
)
from .step_math import keep_of

__all__ = ["galite_forward", "galite_saved_length"]


@triton.jit(do_not_specialize=["T"])
def _galite_forward_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr,  # (B, T, H, D), shared strides sd_*
    p1_ptr, p2_ptr, p3_ptr,  # (B, T, H, nu), shared strides se_*
    done_ptr,  # (B, T) bool or floating, strides sn_* (HAS_DONES)
    slot_ptr,  # (B,) int64 memory row of each projection row, stride ssl (HAS_SLOTS)
    ridx_ptr,  # (B, T) int64 contiguous restart index, -1 = none (RESTART)
    c0_ptr, s0_ptr,  # initial memory, strides ic_* / is_*
    rc_ptr, rs_ptr,  # (N, H, D, K), (N, H, K) contiguous restart memories (RESTART)
    out_ptr,  # (B, T, H, D) contiguous, input dtype
    c_ptr, s_ptr,  # final memory, strides oc_* / os_*; C may be the initial one (s never is: see the launcher)
    saved_ptr,  # (B*H, ceil(T/CHUNK) * (D + 1) * D_PAD * NU_PAD), state dtype (SAVE_CKPT)
    T, H, D, NU, eps,
    sd_b: tl.int64, sd_t: tl.int64, sd_h: tl.int64, se_b: tl.int64, se_t: tl.int64, se_h: tl.int64,
    sn_b: tl.int64, sn_t: tl.int64, ssl: tl.int64,
    ic_b: tl.int64, ic_h: tl.int64, ic_j: tl.int64, is_b: tl.int64, is_h: tl.int64,
    oc_b: tl.int64, oc_h: tl.int64, oc_j: tl.int64, os_b: tl.int64, os_h: tl.int64,
    HAS_DONES: tl.constexpr, SAVE_CKPT: tl.constexpr, HAS_SLOTS: tl.constexpr, RESTART: tl.constexpr,
    CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BJ: tl.constexpr, D_PAD: tl.constexpr, NU_PAD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    jb = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_j = jb * BJ + tl.arange(0, BJ)
    offs_i = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, NU_PAD)
    mask_j = offs_j < D
    mask_i = offs_i < D
    mask_n = offs_n < NU
    mask_in = mask_i[:, None] & mask_n[None, :]
    feat = offs_i[:, None] * NU + offs_n[None, :]
    FP: tl.constexpr = D_PAD * NU_PAD
    pad = offs_i[:, None] * NU_PAD + offs_n[None, :]
    K = NU * D
    owns_s = jb == 0

    row = b
    if HAS_SLOTS:
        row = tl.load(slot_ptr + b * ssl)
    c, s = load_rows(c0_ptr, s0_ptr, row, h, ic_b, ic_h, ic_j, is_b, is_h, offs_j, feat, mask_j, mask_in, ACC)
    off_d = b * sd_b + h * sd_h
    off_e = b * se_b + h * se_h
    off_o = (b * T * H + h) * D
    slot_len = (D + 1) * FP
    saved = saved_ptr + pid * (tl.cdiv(T, CHUNK).to(tl.int64) * slot_len)
    for t in tl.range(0, T, num_stages=NUM_STAGES):
        if SAVE_CKPT:
            if t % CHUNK == 0:
                store_slot(saved + (t // CHUNK) * slot_len, c.to(saved_ptr.dtype.element_ty),
                           s.to(saved_ptr.dtype.element_ty), offs_j, mask_j, D, owns_s, pad, FP)  # fmt: skip
        if RESTART:
            n = tl.load(ridx_ptr + b * T + t)
            if n >= 0:
                c, s = load_rows(rc_ptr, rs_ptr, n, h, H * D * K, D * K, K, H * K, K, offs_j, feat, mask_j, mask_in,
                                 ACC)  # fmt: skip
        _k, _q, _p1, _p2, v, kg, query, omg, _g, _sg, _sng, _sp3, _snp3, bgate, bgate_c = load_step(
            k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, off_d, off_e, offs_i, mask_i,
            offs_n, mask_n, offs_j, mask_j, mask_in, ACC)  # fmt: skip
        keep = 1.0
        if HAS_DONES:
            keep = keep_of(done_ptr + b * sn_b + t * sn_t, ACC)
        c, s, _decay = advance(c, s, kg, omg, v, bgate, bgate_c, keep)
        o, _den = readout(c, s, query, eps)
        tl.store(out_ptr + off_o + offs_j, o.to(out_ptr.dtype.element_ty), mask=mask_j)
        off_d += sd_t
        off_e += se_t
        off_o += H * D

    # The final rows may overwrite the initial ones (an in-place call): every thread must have read its
    # share before any thread writes.
    tl.debug_barrier()
    store_memory_rows(c_ptr, c, row, h, oc_b, oc_h, oc_j, offs_j, feat, mask_j, mask_in)
    if owns_s:
        store_norm(s_ptr, s, row, h, os_b, os_h, feat, mask_in)


def galite_saved_length(dims: GaliteDims, chunk: int) -> int:
    """Values per (b, h) of the checkpoints a forward keeps for its backward."""
    return triton.cdiv(dims.steps, chunk) * (dims.dim + 1) * dims.feat_pad


def galite_forward(
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
    save_checkpoints: bool,
    chunk: int,
    *,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
    state_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; arguments as ``galite_recurrence`` (already validated).

    ``chunk``: the checkpoint interval (the caller hands the same value to the backward). ``state_out``:
    buffers shaped like the memory, unit last stride, possibly the memory itself, that receive the final
    memory; required with ``slots``, whose rows are the only ones written.

    Returns out (B, T, H, D) contiguous in the input dtype, the final (c, s) (``state_out`` or fresh
    tensors, state dtype) and the checkpoints (B*H, galite_saved_length) or a 1-D empty tensor.
    """
    dims = galite_dims_of(keys, p1.shape[-1])
    cfg = dims.config("galite_forward")
    rows, blocks = dims.rows("galite_forward"), dims.row_blocks("galite_forward")
    device, dtype = keys.device, keys.dtype
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    c, s = last_dim_contiguous(c), last_dim_contiguous(s)
    sdt = c.dtype
    done_t, sn_b, sn_t = dones_arg(dones, keys)
    out = new_output((dims.batch, dims.steps, dims.heads, dims.dim), dtype, device)
    if state_out is None:
        state_out = (new_output(tuple(c.shape), sdt, device), new_output(tuple(s.shape), sdt, device))
    if blocks > 1 and shares_memory(s, state_out[1]):
        # Every row block reads the whole initial s and block 0 writes the final one; programs run in no
        # set order, so an in-place call reads s from a copy (K values per row, against D * K of C).
        s = s.clone()
    if save_checkpoints:
        saved = torch.empty(dims.batch * dims.heads, galite_saved_length(dims, chunk), dtype=sdt, device=device)
    else:
        saved = torch.empty(0, dtype=sdt, device=device)
    empty_i64 = torch.empty(0, dtype=torch.int64, device=device)
    if restart is not None:
        index, c_r, s_r = (x.contiguous() for x in restart)
    else:
        index, c_r, s_r = empty_i64, c, s  # never read
    if dims.batch * dims.heads == 0:  # an empty grid is not a valid launch
        return out, *state_out, saved
    _galite_forward_kernel[(dims.batch * dims.heads, blocks)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_t,
        slots if slots is not None else empty_i64, index, c, s, c_r, s_r, out, *state_out, saved,
        dims.steps, dims.heads, dims.dim, dims.nu, eps,
        keys.stride(0), keys.stride(1), keys.stride(2), p1.stride(0), p1.stride(1), p1.stride(2), sn_b, sn_t,
        slots.stride(0) if slots is not None else 0,
        *c.stride()[:3], *s.stride()[:2], *state_out[0].stride()[:3], *state_out[1].stride()[:2],
        HAS_DONES=dones is not None, SAVE_CKPT=save_checkpoints, HAS_SLOTS=slots is not None,
        RESTART=restart is not None, CHUNK=chunk if save_checkpoints else 1, NUM_STAGES=cfg.num_stages,
        BJ=rows, D_PAD=dims.d_pad, NU_PAD=dims.nu_pad, ACC=acc_dtype(dtype), num_warps=cfg.num_warps,
    )  # fmt: skip
    return out, *state_out, saved
