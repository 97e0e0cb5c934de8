"""Backward kernel of the GaLiTe recurrence: gradients of every projection and of the initial memory,
without O(T * memory) storage.

As AGaLiTe's backward (``backward.py``, which says why the direct formula and not the gated-linear-
attention identity): going over the chunks in reverse, a program reloads its rows of the chunk's
checkpoint, recomputes the chunk forward while writing the memory *before* each step into a scratch of
CHUNK slots, then walks the chunk backward with the adjoints in registers.

Grid: (B * H, ceil(D / BJ)), the forward's split of the value rows. Per step t, for the program's rows j
(gC, gs: the adjoints of C_t and s_t, carried from step t + 1 through its decay):
    dnum_j = dout_j / den;  dden = -sum_j dout_j out_j / den            (partial: this block's rows)
    gC[j] += dnum_j Q;  gs += dden Q;  dQ = sum_j dnum_j C_t[j] + dden s_t
    d(b v)_j = <gC[j], K G>;  d(K G) = sum_j (b v)_j gC[j] + gs
    dA = gC * C_{t-1} (A = keep (1 - b G));  d(1 - G) = keep (sum_j b_j dA[j] + gs * s_{t-1})
    dbeta_j = (v_j d(b v)_j - keep <dA[j], G>) sigma(beta_j) sigma(-beta_j)
and the chain rule through the feature maps as AGaLiTe's. Everything summed over value rows (dden,
hence gs; the key-side and query gradients; the gradient of s) is linear in this block's rows, so a
program carries its share: the gradients of k, q, gamma, p1, p2, p3, of the initial s and of the
restart s go to per-block partial buffers summed afterwards in a fixed order. No atomics, so results
are bitwise repeatable. The gradients of v, beta and C rows are complete in their program.

Restarts: where step t restarts from row n, the recompute replaces the memory before step t as the
forward did, the adjoint reaching it is added to row n's gradient (several steps of one batch row may
share a row; rows of different batch rows may not) and the carried adjoint is cut.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .galite_forward import galite_saved_length
from .galite_math import (
    advance,
    load_memory_rows,
    load_norm,
    load_rows,
    load_slot,
    load_step,
    readout,
    store_memory_rows,
    store_norm,
    store_slot,
)
from .launch import acc_dtype, dones_arg, galite_dims_of, new_output, same_strides
from .step_math import keep_of

__all__ = ["galite_backward"]


@triton.jit(do_not_specialize=["T"])
def _galite_backward_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, done_ptr,
    ridx_ptr, rc_ptr, rs_ptr,  # restart index (B, T) and memories (N, ...), contiguous (RESTART)
    saved_ptr, scratch_ptr,
    do_ptr, dcT_ptr, dsT_ptr,  # upstream: dout (strided), final-memory grads (contiguous, optional)
    dk_ptr, dq_ptr, dg_ptr,  # (blocks, B, T, H, D) partials (or the grads themselves with one block)
    dv_ptr, dbeta_ptr,  # (B, T, H, D) contiguous
    dp1_ptr, dp2_ptr, dp3_ptr,  # (blocks, B, T, H, nu) partials (or the grads)
    dc0_ptr, ds0_ptr,  # (B, H, D, K) contiguous; (blocks, B, H, K) partials
    drc_ptr, drs_ptr,  # (N, H, D, K) zero-filled; (blocks, N, H, K) zero-filled partials (RESTART)
    T, H, D, NU, eps,
    sd_b: tl.int64, sd_t: tl.int64, sd_h: tl.int64, se_b: tl.int64, se_t: tl.int64, se_h: tl.int64,
    sn_b: tl.int64, sn_t: tl.int64, sdo_b: tl.int64, sdo_t: tl.int64, sdo_h: tl.int64, sdo_d: tl.int64,
    part_d: tl.int64, part_e: tl.int64, part_s: tl.int64, part_r: tl.int64,
    HAS_DONES: tl.constexpr, HAS_DC: tl.constexpr, HAS_DS: tl.constexpr, RESTART: tl.constexpr,
    CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BJ: tl.constexpr, D_PAD: tl.constexpr, NU_PAD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    jb = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_l = tl.arange(0, BJ)
    offs_j = jb * BJ + offs_l
    offs_i = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, NU_PAD)
    mask_j = offs_j < D
    mask_l = offs_l < BJ
    mask_i = offs_i < D
    mask_n = offs_n < NU
    mask_in = mask_i[:, None] & mask_n[None, :]
    feat = offs_i[:, None] * NU + offs_n[None, :]
    FP: tl.constexpr = D_PAD * NU_PAD
    pad = offs_i[:, None] * NU_PAD + offs_n[None, :]
    K = NU * D
    owns_s = jb == 0

    # Adjoints of the memory after the last step: the final-memory gradients (zero when unused); the
    # gradient of s enters once, in block 0's share.
    g_c = tl.zeros([BJ, D_PAD, NU_PAD], dtype=ACC)
    g_s = tl.zeros([D_PAD, NU_PAD], dtype=ACC)
    if HAS_DC:
        g_c = load_memory_rows(dcT_ptr, b, h, H * D * K, D * K, K, offs_j, feat, mask_j, mask_in, ACC)
    if HAS_DS:
        g_s = load_norm(dsT_ptr, b, h, H * K, K, feat, mask_in & (offs_i < tl.where(owns_s, D, 0))[:, None], ACC)

    NC = tl.cdiv(T, CHUNK)
    slot_len = (D + 1) * FP
    SCR: tl.constexpr = (BJ + 1) * FP
    saved = saved_ptr + pid * (NC.to(tl.int64) * slot_len)
    scratch = scratch_ptr + (pid * tl.num_programs(1) + jb) * (CHUNK * SCR)
    for cc in range(NC):
        chunk = NC - 1 - cc
        t0 = chunk * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        c, s = load_slot(saved + chunk * slot_len, offs_j, mask_j, D, pad, FP)
        c = c.to(ACC)
        s = s.to(ACC)
        # Recompute the chunk forward, keeping the memory before each step.
        for t in tl.range(t0, t1, num_stages=NUM_STAGES):
            if RESTART:
                n = tl.load(ridx_ptr + b * T + t)
                if n >= 0:
                    c, s = load_rows(rc_ptr, rs_ptr, n, h, H * D * K, D * K, K, H * K, K, offs_j, feat, mask_j,
                                     mask_in, ACC)  # fmt: skip
            store_slot(scratch + (t - t0) * SCR, c, s, offs_l, mask_l, BJ, True, pad, FP)
            off_d = b * sd_b + t * sd_t + h * sd_h
            off_e = b * se_b + t * se_t + h * se_h
            _k, _q, _p1, _p2, v, kg, _query, omg, _g, _sg, _sng, _sp3, _snp3, bgate, bgate_c = load_step(
                k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, off_d, off_e, offs_i, mask_i,
                offs_n, mask_n, offs_j, mask_j, mask_in, ACC)  # fmt: skip
            keep = 1.0
            if HAS_DONES:
                keep = keep_of(done_ptr + b * sn_b + t * sn_t, ACC)
            c, s, _decay = advance(c, s, kg, omg, v, bgate, bgate_c, keep)
        # Scratch was written by other threads of this program: make it visible before reading.
        tl.debug_barrier()

        for tt in tl.range(0, t1 - t0, num_stages=NUM_STAGES):
            t = t1 - 1 - tt
            c_prev, s_prev = load_slot(scratch + (t - t0) * SCR, offs_l, mask_l, BJ, pad, FP)
            off_d = b * sd_b + t * sd_t + h * sd_h
            off_e = b * se_b + t * se_t + h * se_h
            k, q, p1, p2, v, kg, query, omg, gate, sig_g, sig_ng, sig_p3, sig_np3, bgate, bgate_c = load_step(
                k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, off_d, off_e, offs_i, mask_i,
                offs_n, mask_n, offs_j, mask_j, mask_in, ACC)  # fmt: skip
            dout = tl.load(do_ptr + b * sdo_b + t * sdo_t + h * sdo_h + offs_j * sdo_d, mask=mask_j,
                           other=0.0).to(ACC)  # fmt: skip
            keep = 1.0
            if HAS_DONES:
                keep = keep_of(done_ptr + b * sn_b + t * sn_t, ACC)
            c, s, decay = advance(c_prev, s_prev, kg, omg, v, bgate, bgate_c, keep)
            out, den = readout(c, s, query, eps)

            # Read-out adjoints (dden: this block's rows' share).
            dnum = dout / den
            dden = -tl.sum(dout * out, axis=0) / den
            g_c += dnum[:, None, None] * query[None, :, :]
            g_s += dden * query
            dquery = tl.sum(dnum[:, None, None] * c, axis=0) + dden * s

            # Inputs and decays of the two sums.
            bv = bgate * v
            dbv = tl.sum(tl.sum(g_c * kg[None, :, :], axis=2), axis=1)
            dkg = tl.sum(bv[:, None, None] * g_c, axis=0) + g_s
            da = g_c * c_prev
            domg = keep * (tl.sum(bgate[:, None, None] * da, axis=0) + g_s * s_prev)
            dbeta = (v * dbv - keep * tl.sum(tl.sum(da * gate[None, :, :], axis=2), axis=1)) * bgate * bgate_c
            dv = dbv * bgate

            # Feature maps: K G = (sigma(gamma) relu(k)) (x) (sigma(p3) relu(p1)), 1 - G (d(1 - G) = -dG).
            relu_k = tl.maximum(k, 0.0)
            relu_q = tl.maximum(q, 0.0)
            relu_p1 = tl.maximum(p1, 0.0)
            relu_p2 = tl.maximum(p2, 0.0)
            dgate = dkg * (relu_k[:, None] * relu_p1[None, :]) - domg
            dkey = dkg * gate
            dk = tl.where(k > 0, tl.sum(dkey * relu_p1[None, :], axis=1), 0.0)
            dp1 = tl.where(p1 > 0, tl.sum(dkey * relu_k[:, None], axis=0), 0.0)
            dq = tl.where(q > 0, tl.sum(dquery * relu_p2[None, :], axis=1), 0.0)
            dp2 = tl.where(p2 > 0, tl.sum(dquery * relu_q[:, None], axis=0), 0.0)
            # sigma'(x) as sigma(x) sigma(-x): y (1 - y) keeps few correct digits once y nears 1.
            dgam = tl.sum(dgate * sig_p3[None, :], axis=1) * sig_g * sig_ng
            dp3 = tl.sum(dgate * sig_g[:, None], axis=0) * sig_p3 * sig_np3

            o_d = ((b * T + t) * H + h) * D
            o_e = ((b * T + t) * H + h) * NU + offs_n
            o_p = o_d + offs_i + jb * part_d
            tl.store(dk_ptr + o_p, dk.to(dk_ptr.dtype.element_ty), mask=mask_i)
            tl.store(dq_ptr + o_p, dq.to(dq_ptr.dtype.element_ty), mask=mask_i)
            tl.store(dg_ptr + o_p, dgam.to(dg_ptr.dtype.element_ty), mask=mask_i)
            tl.store(dv_ptr + o_d + offs_j, dv.to(dv_ptr.dtype.element_ty), mask=mask_j)
            tl.store(dbeta_ptr + o_d + offs_j, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mask_j)
            tl.store(dp1_ptr + o_e + jb * part_e, dp1.to(dp1_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dp2_ptr + o_e + jb * part_e, dp2.to(dp2_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dp3_ptr + o_e + jb * part_e, dp3.to(dp3_ptr.dtype.element_ty), mask=mask_n)

            # Carry to step t - 1: the adjoint reaching the memory before step t through its decay.
            g_c = decay * g_c
            g_s = (keep * omg) * g_s
            if RESTART:
                n = tl.load(ridx_ptr + b * T + t)
                if n >= 0:
                    # The memory before step t was restart row n: the adjoint is (a share of) its gradient,
                    # accumulated (later steps of this row may restart from n too), and nothing flows past.
                    acc_c = load_memory_rows(drc_ptr, n, h, H * D * K, D * K, K, offs_j, feat, mask_j, mask_in, ACC)
                    acc_s = load_norm(drs_ptr + jb * part_r, n, h, H * K, K, feat, mask_in, ACC)
                    # Read before written, by other threads of this program.
                    tl.debug_barrier()
                    store_memory_rows(drc_ptr, acc_c + g_c, n, h, H * D * K, D * K, K, offs_j, feat, mask_j, mask_in)
                    store_norm(drs_ptr + jb * part_r, acc_s + g_s, n, h, H * K, K, feat, mask_in)
                    # An earlier step may read these rows back.
                    tl.debug_barrier()
                    g_c = tl.zeros([BJ, D_PAD, NU_PAD], dtype=ACC)
                    g_s = tl.zeros([D_PAD, NU_PAD], dtype=ACC)
        # The next chunk overwrites the scratch this one just read.
        tl.debug_barrier()

    store_memory_rows(dc0_ptr, g_c, b, h, H * D * K, D * K, K, offs_j, feat, mask_j, mask_in)
    store_norm(ds0_ptr + jb * part_s, g_s, b, h, H * K, K, feat, mask_in)


def galite_backward(
    grad_out: torch.Tensor,
    grad_c: torch.Tensor | None,
    grad_s: torch.Tensor | None,
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    saved: torch.Tensor,
    eps: float,
    chunk: int,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Gradients [keys, queries, values, beta, gamma, p1, p2, p3, c0, s0] and, with ``restart``, those of
    the restart memories (c_r, s_r).

    ``saved`` comes from ``galite_forward(..., save_checkpoints=True, chunk=chunk)`` on the same inputs;
    the state dtype is its. Projection gradients are contiguous in the input dtype.
    """
    batch, steps, heads, dim = keys.shape
    nu = p1.shape[-1]
    dims = galite_dims_of(keys, nu)
    if saved.dim() != 2 or saved.shape != (batch * heads, galite_saved_length(dims, chunk)):
        raise RuntimeError(
            f"galite_backward: saved memory of shape {tuple(saved.shape)} does not match a forward with "
            f"save_checkpoints=True and chunk={chunk} (expected ({batch * heads}, {galite_saved_length(dims, chunk)}))"
        )
    cfg = dims.config("galite_backward")
    rows, blocks = dims.rows("galite_backward"), dims.row_blocks("galite_backward")
    device, dtype, sdt = keys.device, keys.dtype, saved.dtype
    feat = nu * dim
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    done_t, sn_b, sn_t = dones_arg(dones, keys)
    dummy = keys.new_empty(0, dtype=sdt)
    # Final-memory gradients are O(memory): contiguous copies share the gradients' layout.
    gc = grad_c.contiguous() if grad_c is not None else dummy
    gs = grad_s.contiguous() if grad_s is not None else dummy
    scratch = torch.empty(batch * heads * blocks * chunk * (rows + 1) * dims.feat_pad, dtype=sdt, device=device)
    d_shape, e_shape = (batch, steps, heads, dim), (batch, steps, heads, nu)
    grads = [new_output(d_shape, dtype, device) for _ in range(5)]
    grads += [new_output(e_shape, dtype, device) for _ in range(3)]
    grads += [new_output((batch, heads, dim, feat), sdt, device)]
    ds0 = new_output((blocks, batch, heads, feat), sdt, device)
    if blocks > 1:
        # Sums over value rows, one partial per row block, in the accumulation dtype.
        parts_d = [new_output((blocks, *d_shape), sdt, device) for _ in range(3)]
        parts_e = [new_output((blocks, *e_shape), sdt, device) for _ in range(3)]
    else:
        parts_d, parts_e = [grads[0], grads[1], grads[4]], grads[5:8]
    if restart is not None:
        index, c_r, s_r = (x.contiguous() for x in restart)
        # Rows no step restarts from get no gradient: zeros, written only where a restart reads them.
        drc = torch.zeros(c_r.shape, dtype=sdt, device=device)
        drs = torch.zeros((blocks, *s_r.shape), dtype=sdt, device=device)
    else:
        index = torch.empty(0, dtype=torch.int64, device=device)
        c_r = s_r = drc = drs = dummy
    if batch * heads > 0:  # an empty grid is not a valid launch
        _galite_backward_kernel[(batch * heads, blocks)](
            keys, queries, values, beta, gamma, p1, p2, p3, done_t, index, c_r, s_r, saved, scratch,
            grad_out, gc, gs, *parts_d[:2], parts_d[2], grads[2], grads[3], *parts_e, grads[8], ds0, drc, drs,
            steps, heads, dim, nu, eps,
            keys.stride(0), keys.stride(1), keys.stride(2), p1.stride(0), p1.stride(1), p1.stride(2), sn_b, sn_t,
            *grad_out.stride(),
            parts_d[0][0].numel() if blocks > 1 else 0, parts_e[0][0].numel() if blocks > 1 else 0,
            ds0[0].numel(), drs[0].numel() if restart is not None else 0,
            HAS_DONES=dones is not None, HAS_DC=grad_c is not None, HAS_DS=grad_s is not None,
            RESTART=restart is not None, CHUNK=chunk, NUM_STAGES=cfg.num_stages,
            BJ=rows, D_PAD=dims.d_pad, NU_PAD=dims.nu_pad, ACC=acc_dtype(dtype), num_warps=cfg.num_warps,
        )  # fmt: skip
    if blocks > 1:
        for i, part in zip((0, 1, 4, 5, 6, 7), (*parts_d, *parts_e)):
            grads[i].copy_(part.sum(dim=0))
    grads.append(ds0.sum(dim=0) if blocks > 1 else ds0[0])
    if restart is not None:
        grads += [drc, drs.sum(dim=0)]
    return grads
