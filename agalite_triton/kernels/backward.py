"""Backward kernel: gradients of every projection and of the initial state, without O(T * state) memory.

Strategy: per-chunk checkpoints and the direct gradient formula. The forward stored the state before
every CHUNK-th step. Going over the chunks in reverse, the kernel reloads a chunk's checkpoint,
recomputes the chunk forward while writing the state *before* each step into a per-program scratch of
CHUNK padded states, then walks the chunk backward with the adjoint states in registers. Each step
recomputes its state from the previous one, so both h_{t-1} (for the decay gradient) and h_t (for the
read-out gradient) are exact.

Why not the gated-linear-attention identity d log a_t = sum_{u >= t} (q_u dq_u - k_u dk_u): it yields
the gradient with respect to log a, and mapping it to gamma divides by a = (1 - G) keep, which is 0 in
fp32 once the gates saturate; the cancelling reverse cumsum then turns rounding noise into inf/NaN
exactly in the near-1 regime we must support. Nor can the forward state be stepped backwards (that
divides by the decay too). The direct formula dL/da_t = <g_t, h_{t-1}> has neither problem, costs
one extra forward pass, and needs O(T/CHUNK + CHUNK) states of memory per (b, h).

Per step t, with g_t the total adjoint of a state after step t (carried as a_{t+1} g_{t+1}, plus the
direct read-out terms added here):
    dnum = dout / den;  dnorm = -2R <dout, out> / den;  dscore_j = <dnum, tilde_v_j>
    g_tk_j += dscore_j Q;  g_tv_j += score_j dnum;  g_s += dnorm Q
    dQ = sum_j dscore_j tilde_k_j + dnorm s
    dkin = sum_j c_j g_tk_j + g_s;  dak = sum_j g_tk_j tilde_k_{t-1, j} + g_s s_{t-1}
    dvin = sum_j c_j g_tv_j;        dav = sum_j g_tv_j tilde_v_{t-1, j}
and the chain rule through kin = G K, ak = (1 - G) keep, vin = b v, av = (1 - b) keep and the feature
maps. No atomics: every program owns its (b, h) rows, so results are deterministic.

The scores <tilde_k_j, Q> and the denominator of each step come from the forward (saved with the
checkpoints), so no step reduces over the whole feature dimension E here. That lets ``split``
programs share one (b, h), each owning ETA_PAD / split rows of the feature map (its slice of tilde_k
and s; tilde_v, which is only (R, D), is recomputed by each): the gradients of p1, p2, p3 and of the
state slices are then complete in one program, and those of keys, queries and gamma (sums over the
eta rows) are written as per-split partials and summed afterwards in a fixed order. Smaller tiles per
program mean fewer registers and more resident programs per SM.

Restarts: where step t restarts from row n of the restart memories, the recompute replaces the state
before step t as the forward did, and the adjoint reaching that state is the gradient of row n: it is
added there (steps of one batch row may share a restart row; rows of *different* batch rows may not,
since their programs would race) and the carried adjoint is cut (zero) before step t - 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..oscillator import oscillator_table, step_residues
from .forward import load_padded, load_state, saved_length, store_padded, store_state
from .launch import acc_dtype, dims_of, dones_arg, new_output, same_strides
from .step_math import (
    advance,
    keep_of,
    key_features,
    load_vec,
    oscillators,
    query_features,
    readout_from_scores,
    sigmoid,
    tick_phase,
)

__all__ = ["recurrence_backward"]


@triton.jit
def store_tv(ptr, tv, row, h, R, H, D, offs_r, offs_d, mask_r, mask_d):
    """A tilde_v tile into row ``row`` of a contiguous (rows, R, H, D) tensor."""
    offs = row * (R * H * D) + h * D + offs_r[:, None] * (H * D) + offs_d[None, :]
    tl.store(ptr + offs, tv.to(ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


@triton.jit(do_not_specialize=["T"])
def _backward_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, done_ptr,
    tick_ptr,  # (B,) int64 raw ticks, stride stk_t; with RESTART (B, T) contiguous residues of each step's tick
    ridx_ptr, rtk_ptr, rtv_ptr, rs_ptr,  # restart index (B, T) and memories (N, ...), contiguous (RESTART)
    table_ptr, saved_ptr, scratch_ptr,
    do_ptr, dtkT_ptr, dtvT_ptr, dsT_ptr,  # upstream: dout (strided), final-state grads (optional)
    dk_ptr, dq_ptr, dg_ptr,  # (SPLIT, B, T, H, D) partials, or the (B, T, H, D) grads when SPLIT == 1
    dv_ptr, dbeta_ptr,  # (B, T, H, D) contiguous
    dp1_ptr, dp2_ptr, dp3_ptr,  # (B, T, H, eta) contiguous
    dtk0_ptr, dtv0_ptr, ds0_ptr,  # initial-state grads, contiguous
    drtk_ptr, drtv_ptr, drs_ptr,  # restart-memory grads, contiguous, zero-filled (RESTART)
    T, H, D, ETA, R, P, eps,
    sd_b: tl.int64, sd_t: tl.int64, sd_h: tl.int64, se_b: tl.int64, se_t: tl.int64, se_h: tl.int64,
    sn_b: tl.int64, sn_t: tl.int64, stk_t: tl.int64,
    sdo_b: tl.int64, sdo_t: tl.int64, sdo_h: tl.int64, sdo_d: tl.int64, split_stride: tl.int64,
    HAS_DONES: tl.constexpr, HAS_DTK: tl.constexpr, HAS_DTV: tl.constexpr, HAS_DS: tl.constexpr,
    RESTART: tl.constexpr, CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr, SPLIT: tl.constexpr,
    R_PAD: tl.constexpr, ETA_PAD: tl.constexpr, D_PAD: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    b = pid // H
    h = pid % H
    EB: tl.constexpr = ETA_PAD // SPLIT  # feature rows of this program
    offs_d = tl.arange(0, D_PAD)
    offs_l = tl.arange(0, EB)  # local row index (scratch layout)
    offs_n = sp * EB + offs_l  # global row index
    offs_r = tl.arange(0, R_PAD)
    mask_d = offs_d < D
    mask_n = offs_n < ETA
    mask_r = offs_r < R
    mask_nd = mask_n[:, None] & mask_d[None, :]
    two_r = 2.0 * R
    E = ETA * D
    owns_tv = sp == 0  # tilde_v is recomputed by every split; one of them writes its gradients
    mask_dv = offs_d < tl.where(owns_tv, D, 0)

    # Adjoints of the state after the last step: the final-state gradients (zero when unused).
    g_tk = tl.zeros([R_PAD, EB, D_PAD], dtype=ACC)
    g_tv = tl.zeros([R_PAD, D_PAD], dtype=ACC)
    g_s = tl.zeros([EB, D_PAD], dtype=ACC)
    feat = offs_n[:, None] * D + offs_d[None, :]
    if HAS_DTK:
        g_tk = tl.load(dtkT_ptr + b * (R * H * E) + h * E + offs_r[:, None, None] * (H * E) + feat[None, :, :],
                       mask=mask_r[:, None, None] & mask_nd[None, :, :], other=0.0).to(ACC)  # fmt: skip
    if HAS_DTV:
        g_tv = tl.load(dtvT_ptr + b * (R * H * D) + h * D + offs_r[:, None] * (H * D) + offs_d[None, :],
                       mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(ACC)  # fmt: skip
    if HAS_DS:
        g_s = tl.load(dsT_ptr + b * (H * E) + h * E + feat, mask=mask_nd, other=0.0).to(ACC)

    res = tl.zeros([], dtype=tl.int64)
    if not RESTART:
        res = tick_phase(tl.load(tick_ptr + b * stk_t), P)
    NC = tl.cdiv(T, CHUNK)
    STATE_PAD: tl.constexpr = R_PAD * ETA_PAD * D_PAD + R_PAD * D_PAD + ETA_PAD * D_PAD
    SCR_PAD: tl.constexpr = R_PAD * EB * D_PAD + R_PAD * D_PAD + EB * D_PAD
    ckpt_len = NC.to(tl.int64) * STATE_PAD
    saved = saved_ptr + pid * (ckpt_len + T * (R_PAD + 1))
    scratch = scratch_ptr + (pid * SPLIT + sp) * (CHUNK * SCR_PAD)
    for cc in range(NC):
        chunk = NC - 1 - cc
        t0 = chunk * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        tk, tv, s = load_padded(saved + chunk * STATE_PAD, offs_r, offs_n, offs_d, R_PAD, ETA_PAD, D_PAD)
        # Recompute the chunk forward, keeping the state before each step.
        for t in tl.range(t0, t1, num_stages=NUM_STAGES):
            if RESTART:
                n = tl.load(ridx_ptr + b * T + t)
                if n >= 0:
                    tk, tv, s = load_state(rtk_ptr, rtv_ptr, rs_ptr, n, h, R * H * E, H * E, E, R * H * D, H * D, D,
                                           H * E, E, offs_r, offs_n, offs_d, mask_r, mask_nd, D, ACC)  # fmt: skip
                phase = tl.load(tick_ptr + b * T + t)
            else:
                phase = (res + t + 1) % P
            store_padded(scratch + (t - t0) * SCR_PAD, tk, tv, s, offs_r, offs_l, offs_d, R_PAD, EB, D_PAD)
            c = oscillators(table_ptr, phase, P, offs_r, mask_r, ACC)
            off_d = b * sd_b + t * sd_t + h * sd_h
            off_e = b * se_b + t * se_t + h * se_h
            k = load_vec(k_ptr + off_d, offs_d, mask_d, ACC)
            v = load_vec(v_ptr + off_d, offs_d, mask_d, ACC)
            beta_logit = load_vec(beta_ptr + off_d, offs_d, mask_d, ACC)
            bgate, bgate_c = sigmoid(beta_logit), sigmoid(-beta_logit)
            gam = load_vec(gamma_ptr + off_d, offs_d, mask_d, ACC)
            p1 = load_vec(p1_ptr + off_e, offs_n, mask_n, ACC)
            p3 = load_vec(p3_ptr + off_e, offs_n, mask_n, ACC)
            keep = 1.0
            if HAS_DONES:
                keep = keep_of(done_ptr + b * sn_b + t * sn_t, ACC)
            key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
            tk, tv, s = advance(tk, tv, s, key, gate, gate_c, v, bgate, bgate_c, keep, c)
        # Scratch was written by other threads of this program: make it visible before reading.
        tl.debug_barrier()

        for tt in tl.range(0, t1 - t0, num_stages=NUM_STAGES):
            t = t1 - 1 - tt
            tk_prev, tv_prev, s_prev = load_padded(scratch + (t - t0) * SCR_PAD, offs_r, offs_l, offs_d,
                                                   R_PAD, EB, D_PAD)  # fmt: skip
            if RESTART:
                phase = tl.load(tick_ptr + b * T + t)
            else:
                phase = (res + t + 1) % P
            c = oscillators(table_ptr, phase, P, offs_r, mask_r, ACC)
            off_d = b * sd_b + t * sd_t + h * sd_h
            off_e = b * se_b + t * se_t + h * se_h
            k = load_vec(k_ptr + off_d, offs_d, mask_d, ACC)
            q = load_vec(q_ptr + off_d, offs_d, mask_d, ACC)
            v = load_vec(v_ptr + off_d, offs_d, mask_d, ACC)
            beta_logit = load_vec(beta_ptr + off_d, offs_d, mask_d, ACC)
            bgate, bgate_c = sigmoid(beta_logit), sigmoid(-beta_logit)
            gam = load_vec(gamma_ptr + off_d, offs_d, mask_d, ACC)
            p1 = load_vec(p1_ptr + off_e, offs_n, mask_n, ACC)
            p2 = load_vec(p2_ptr + off_e, offs_n, mask_n, ACC)
            p3 = load_vec(p3_ptr + off_e, offs_n, mask_n, ACC)
            dout = tl.load(do_ptr + b * sdo_b + t * sdo_t + h * sdo_h + offs_d * sdo_d,
                           mask=mask_d, other=0.0).to(ACC)  # fmt: skip
            keep = 1.0
            if HAS_DONES:
                keep = keep_of(done_ptr + b * sn_b + t * sn_t, ACC)
            key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
            query = query_features(q, p2)
            tk, tv, s = advance(tk_prev, tv_prev, s_prev, key, gate, gate_c, v, bgate, bgate_c, keep, c)
            aux = saved + ckpt_len + t * (R_PAD + 1)
            score = tl.load(aux + offs_r).to(ACC)
            den = tl.load(aux + R_PAD).to(ACC)
            out = readout_from_scores(tv, score, den)

            # Read-out adjoints.
            dnum = dout / den
            dnorm = -two_r * tl.sum(dout * out, axis=0) / den
            dscore = tl.sum(tv * dnum[None, :], axis=1)
            g_tk += dscore[:, None, None] * query[None, :, :]
            g_tv += score[:, None] * dnum[None, :]
            g_s += dnorm * query
            dquery = tl.sum(dscore[:, None, None] * tk, axis=0) + dnorm * s

            # Inputs and decays of the three sums.
            dkin = tl.sum(c[:, None, None] * g_tk, axis=0) + g_s
            dak = tl.sum(g_tk * tk_prev, axis=0) + g_s * s_prev
            dvin = tl.sum(c[:, None] * g_tv, axis=0)
            dav = tl.sum(g_tv * tv_prev, axis=0)

            # Feature maps: kin = G K, ak = (1 - G) keep, vin = b v, av = (1 - b) keep (d(1 - G) = -dG).
            dgate = dkin * key - keep * dak
            dkey = dkin * gate
            relu_k = tl.maximum(k, 0.0)
            relu_q = tl.maximum(q, 0.0)
            relu_p1 = tl.maximum(p1, 0.0)
            relu_p2 = tl.maximum(p2, 0.0)
            sig_g = sigmoid(gam)
            sig_p3 = tl.where(mask_n, sigmoid(p3), 0.0)
            dk = tl.where(k > 0, tl.sum(dkey * relu_p1[:, None], axis=0), 0.0)
            dp1 = tl.where(p1 > 0, tl.sum(dkey * relu_k[None, :], axis=1), 0.0)
            dq = tl.where(q > 0, tl.sum(dquery * relu_p2[:, None], axis=0), 0.0)
            dp2 = tl.where(p2 > 0, tl.sum(dquery * relu_q[None, :], axis=1), 0.0)
            # sigma'(x) as sigma(x) sigma(-x): y (1 - y) keeps few correct digits once y nears 1.
            dgam = tl.sum(dgate * sig_p3[:, None], axis=0) * sig_g * sigmoid(-gam)
            dp3 = tl.sum(dgate * sig_g[None, :], axis=1) * sig_p3 * sigmoid(-p3)
            dbg = dvin * v - keep * dav
            dbeta = dbg * bgate * bgate_c
            dv = dvin * bgate

            o_d = ((b * T + t) * H + h) * D + offs_d
            o_e = ((b * T + t) * H + h) * ETA + offs_n
            o_p = o_d + sp * split_stride
            tl.store(dk_ptr + o_p, dk.to(dk_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dq_ptr + o_p, dq.to(dq_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dg_ptr + o_p, dgam.to(dg_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dv_ptr + o_d, dv.to(dv_ptr.dtype.element_ty), mask=mask_dv)
            tl.store(dbeta_ptr + o_d, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mask_dv)
            tl.store(dp1_ptr + o_e, dp1.to(dp1_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dp2_ptr + o_e, dp2.to(dp2_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dp3_ptr + o_e, dp3.to(dp3_ptr.dtype.element_ty), mask=mask_n)

            # Carry to step t - 1: the adjoint reaching h_{t-1} through this step's decay.
            ak = gate_c * keep
            g_tk = ak[None, :, :] * g_tk
            g_tv = (bgate_c * keep)[None, :] * g_tv
            g_s = ak * g_s
            if RESTART:
                n = tl.load(ridx_ptr + b * T + t)
                if n >= 0:
                    # h_{t-1} was restart row n: the adjoint is (a share of) its gradient, and nothing
                    # flows past it. Accumulated, since later steps of this row may restart from n too.
                    acc_tk, acc_tv, acc_s = load_state(drtk_ptr, drtv_ptr, drs_ptr, n, h, R * H * E, H * E, E,
                                                       R * H * D, H * D, D, H * E, E, offs_r, offs_n, offs_d,
                                                       mask_r, mask_nd, D, ACC)  # fmt: skip
                    store_state(drtk_ptr, drtv_ptr, drs_ptr, acc_tk + g_tk, acc_tv, acc_s + g_s, n, h, R * H * E,
                                H * E, E, R * H * D, H * D, D, H * E, E, offs_r, offs_n, offs_d, mask_r, mask_nd, D,
                                STORE_TV=False)  # fmt: skip
                    if owns_tv:
                        store_tv(drtv_ptr, acc_tv + g_tv, n, h, R, H, D, offs_r, offs_d, mask_r, mask_d)
                    # An earlier step may read these rows back (through other threads).
                    tl.debug_barrier()
                    g_tk = tl.zeros([R_PAD, EB, D_PAD], dtype=ACC)
                    g_tv = tl.zeros([R_PAD, D_PAD], dtype=ACC)
                    g_s = tl.zeros([EB, D_PAD], dtype=ACC)
        # The next chunk overwrites the scratch this one just read.
        tl.debug_barrier()

    store_state(dtk0_ptr, dtv0_ptr, ds0_ptr, g_tk, g_tv, g_s, b, h, R * H * E, H * E, E, R * H * D, H * D, D,
                H * E, E, offs_r, offs_n, offs_d, mask_r, mask_nd, D, STORE_TV=False)  # fmt: skip
    if owns_tv:
        store_tv(dtv0_ptr, g_tv, b, h, R, H, D, offs_r, offs_d, mask_r, mask_d)


def recurrence_backward(
    grad_out: torch.Tensor,
    grad_tilde_k: torch.Tensor | None,
    grad_tilde_v: torch.Tensor | None,
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
    tick: torch.Tensor,
    r: int,
    eps: float,
    chunk: int,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Gradients [keys, queries, values, beta, gamma, p1, p2, p3, tilde_k0, tilde_v0, s0] and, with
    ``restart``, those of the restart memories (tilde_k_r, tilde_v_r, s_r).

    ``saved`` comes from ``recurrence_forward(..., save_checkpoints=True, chunk=chunk)`` on the same
    inputs; the state dtype is its. Projection gradients are contiguous in the input dtype.
    """
    batch, steps, heads, dim = keys.shape
    eta = p1.shape[-1]
    dims = dims_of(keys, eta, r)
    if saved.dim() != 2 or saved.shape != (batch * heads, saved_length(dims, chunk)):
        raise RuntimeError(
            f"recurrence_backward: saved state of shape {tuple(saved.shape)} does not match a forward with "
            f"save_checkpoints=True and chunk={chunk} (expected ({batch * heads}, {saved_length(dims, chunk)}))"
        )
    cfg = dims.config("backward")
    split = min(cfg.split, dims.eta_pad)
    device, dtype, sdt = keys.device, keys.dtype, saved.dtype
    state_shapes = ((batch, r, heads, eta * dim), (batch, r, heads, dim), (batch, heads, eta * dim))
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    done_t, sn_b, sn_t = dones_arg(dones, keys)
    # Final-state gradients are O(state): contiguous copies let them share the output layout's strides.
    upstream = [g.contiguous() if g is not None else None for g in (grad_tilde_k, grad_tilde_v, grad_s)]
    dummy = keys.new_empty(0, dtype=sdt)
    gtk, gtv, gs = (g if g is not None else dummy for g in upstream)
    scr_pad = dims.r_pad * (dims.eta_pad // split) * dims.d_pad + dims.r_pad * dims.d_pad
    scr_pad += (dims.eta_pad // split) * dims.d_pad
    scratch = torch.empty(batch * heads * split * chunk * scr_pad, dtype=sdt, device=device)
    grads = [new_output((batch, steps, heads, dim), dtype, device) for _ in range(5)]
    grads += [new_output((batch, steps, heads, eta), dtype, device) for _ in range(3)]
    grads += [new_output(shape, sdt, device) for shape in state_shapes]
    d_shape = (batch, steps, heads, dim)
    if split > 1:
        # Sums over the eta rows, one partial per split, in the accumulation dtype.
        parts = [new_output((split, *d_shape), sdt, device) for _ in range(3)]
    else:
        parts = [grads[0], grads[1], grads[4]]
    if restart is not None:
        index, tk_r, tv_r, s_r, tick_r = restart
        tick_arg = step_residues(tick, steps, r, index, tick_r).contiguous()
        index = index.contiguous()
        tk_r, tv_r, s_r = (x.contiguous() for x in (tk_r, tv_r, s_r))
        # Rows no step restarts from get no gradient: zeros, written only where a restart reads them.
        rgrads = [torch.zeros(x.shape, dtype=sdt, device=device) for x in (tk_r, tv_r, s_r)]
    else:
        index, tick_arg = tick.new_empty(0), tick
        tk_r = tv_r = s_r = dummy
        rgrads = [dummy, dummy, dummy]
    if batch * heads == 0:  # an empty grid is not a valid launch
        return grads + (rgrads if restart is not None else [])
    _backward_kernel[(batch * heads, split)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_t, tick_arg, index, tk_r, tv_r, s_r,
        oscillator_table(r, device), saved, scratch,
        grad_out, gtk, gtv, gs, *parts, grads[2], grads[3], *grads[5:], *rgrads,
        steps, heads, dim, eta, r, dims.period, eps,
        keys.stride(0), keys.stride(1), keys.stride(2), p1.stride(0), p1.stride(1), p1.stride(2), sn_b, sn_t,
        tick_arg.stride(0), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        parts[0][0].numel() if split > 1 else 0,
        HAS_DONES=dones is not None, HAS_DTK=upstream[0] is not None, HAS_DTV=upstream[1] is not None,
        HAS_DS=upstream[2] is not None, RESTART=restart is not None, CHUNK=chunk,
        NUM_STAGES=cfg.num_stages, SPLIT=split,
        R_PAD=dims.r_pad, ETA_PAD=dims.eta_pad, D_PAD=dims.d_pad, ACC=acc_dtype(dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    if split > 1:
        for i, part in zip((0, 1, 4), parts):
            grads[i].copy_(part.sum(dim=0))
    return grads + (rgrads if restart is not None else [])
