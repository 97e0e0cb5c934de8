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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..oscillator import oscillator_table, tick_residue
from .forward import load_padded, store_padded, store_state
from .launch import CHUNK, acc_dtype, dims_of, new_output, same_strides
from .step_math import advance, key_features, load_vec, oscillators, query_features, readout, sigmoid

__all__ = ["recurrence_backward"]


@triton.jit(do_not_specialize=["T"])
def _backward_kernel(
    k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, done_ptr,
    res_ptr, table_ptr, ckpt_ptr, scratch_ptr,
    do_ptr, dtkT_ptr, dtvT_ptr, dsT_ptr,  # upstream: dout (strided), final-state grads (optional)
    dk_ptr, dq_ptr, dv_ptr, dbeta_ptr, dgamma_ptr,  # (B, T, H, D) contiguous
    dp1_ptr, dp2_ptr, dp3_ptr,  # (B, T, H, eta) contiguous
    dtk0_ptr, dtv0_ptr, ds0_ptr,  # initial-state grads, contiguous
    T, H, D, ETA, R, P, eps,
    sd_b, sd_t, sd_h, se_b, se_t, se_h, sdo_b, sdo_t, sdo_h, sdo_d,
    stk_b, stk_r, stk_h, stv_b, stv_r, stv_h, ss_b, ss_h,
    HAS_DONES: tl.constexpr, HAS_DTK: tl.constexpr, HAS_DTV: tl.constexpr, HAS_DS: tl.constexpr,
    CHUNK_: tl.constexpr, R_PAD: tl.constexpr, ETA_PAD: tl.constexpr, D_PAD: tl.constexpr, ACC: tl.constexpr,
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
    two_r = 2.0 * R
    E = ETA * D

    # Adjoints of the state after the last step: the final-state gradients (zero when unused).
    g_tk = tl.zeros([R_PAD, ETA_PAD, D_PAD], dtype=ACC)
    g_tv = tl.zeros([R_PAD, D_PAD], dtype=ACC)
    g_s = tl.zeros([ETA_PAD, D_PAD], dtype=ACC)
    feat = offs_n[:, None] * D + offs_d[None, :]
    if HAS_DTK:
        g_tk = tl.load(dtkT_ptr + b * stk_b + h * stk_h + offs_r[:, None, None] * stk_r + feat[None, :, :],
                       mask=mask_r[:, None, None] & mask_nd[None, :, :], other=0.0).to(ACC)  # fmt: skip
    if HAS_DTV:
        g_tv = tl.load(dtvT_ptr + b * stv_b + h * stv_h + offs_r[:, None] * stv_r + offs_d[None, :],
                       mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(ACC)  # fmt: skip
    if HAS_DS:
        g_s = tl.load(dsT_ptr + b * ss_b + h * ss_h + feat, mask=mask_nd, other=0.0).to(ACC)

    res = tl.load(res_ptr + b)
    NC = tl.cdiv(T, CHUNK_)
    STATE_PAD: tl.constexpr = R_PAD * ETA_PAD * D_PAD + R_PAD * D_PAD + ETA_PAD * D_PAD
    scratch = scratch_ptr + pid * (CHUNK_ * STATE_PAD)
    for cc in range(NC):
        chunk = NC - 1 - cc
        t0 = chunk * CHUNK_
        t1 = tl.minimum(t0 + CHUNK_, T)
        tk, tv, s = load_padded(ckpt_ptr + (pid * NC + chunk) * STATE_PAD, offs_r, offs_n, offs_d,
                                R_PAD, ETA_PAD, D_PAD)  # fmt: skip
        # Recompute the chunk forward, keeping the state before each step.
        for t in range(t0, t1):
            store_padded(scratch + (t - t0) * STATE_PAD, tk, tv, s, offs_r, offs_n, offs_d, R_PAD, ETA_PAD, D_PAD)
            c = oscillators(table_ptr, (res + t + 1) % P, P, offs_r, mask_r, ACC)
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
                keep = 1.0 - tl.load(done_ptr + b * T + t).to(ACC)
            key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
            tk, tv, s = advance(tk, tv, s, key, gate, gate_c, v, bgate, bgate_c, keep, c)
        # Scratch was written by other threads of this program: make it visible before reading.
        tl.debug_barrier()

        for tt in range(t1 - t0):
            t = t1 - 1 - tt
            tk_prev, tv_prev, s_prev = load_padded(scratch + (t - t0) * STATE_PAD, offs_r, offs_n, offs_d,
                                                   R_PAD, ETA_PAD, D_PAD)  # fmt: skip
            c = oscillators(table_ptr, (res + t + 1) % P, P, offs_r, mask_r, ACC)
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
                keep = 1.0 - tl.load(done_ptr + b * T + t).to(ACC)
            key, gate, gate_c = key_features(k, gam, p1, p3, mask_nd)
            query = query_features(q, p2)
            tk, tv, s = advance(tk_prev, tv_prev, s_prev, key, gate, gate_c, v, bgate, bgate_c, keep, c)
            out, score, den = readout(tk, tv, s, query, two_r, eps)

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
            tl.store(dk_ptr + o_d, dk.to(dk_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dq_ptr + o_d, dq.to(dq_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dv_ptr + o_d, dv.to(dv_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dbeta_ptr + o_d, dbeta.to(dbeta_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dgamma_ptr + o_d, dgam.to(dgamma_ptr.dtype.element_ty), mask=mask_d)
            tl.store(dp1_ptr + o_e, dp1.to(dp1_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dp2_ptr + o_e, dp2.to(dp2_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dp3_ptr + o_e, dp3.to(dp3_ptr.dtype.element_ty), mask=mask_n)

            # Carry to step t - 1: the adjoint reaching h_{t-1} through this step's decay.
            ak = gate_c * keep
            g_tk = ak[None, :, :] * g_tk
            g_tv = (bgate_c * keep)[None, :] * g_tv
            g_s = ak * g_s
        # The next chunk overwrites the scratch this one just read.
        tl.debug_barrier()

    store_state(dtk0_ptr, dtv0_ptr, ds0_ptr, g_tk, g_tv, g_s, b, h, R * H * E, H * E, E, R * H * D, H * D, D,
                H * E, E, offs_r, offs_n, offs_d, mask_r, mask_nd, D)  # fmt: skip


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
    checkpoints: torch.Tensor,
    tick: torch.Tensor,
    r: int,
    eps: float,
) -> list[torch.Tensor]:
    """Gradients [keys, queries, values, beta, gamma, p1, p2, p3, tilde_k0, tilde_v0, s0].

    ``checkpoints`` come from ``recurrence_forward(..., save_checkpoints=True)`` on the same inputs;
    the state dtype is theirs. Projection gradients are contiguous in the input dtype.
    """
    if checkpoints.dim() != 3:
        raise RuntimeError("recurrence_backward: the forward ran without save_checkpoints=True")
    batch, steps, heads, dim = keys.shape
    eta = p1.shape[-1]
    device, dtype, sdt = keys.device, keys.dtype, checkpoints.dtype
    state_shapes = ((batch, r, heads, eta * dim), (batch, r, heads, dim), (batch, heads, eta * dim))
    dims = dims_of(keys, eta, r)
    keys, queries, values, beta, gamma = same_strides((keys, queries, values, beta, gamma))
    p1, p2, p3 = same_strides((p1, p2, p3))
    done_f = dones.to(sdt).contiguous() if dones is not None else keys.new_empty(0, dtype=sdt)
    # Final-state gradients are O(state): contiguous copies let them share the output layout's strides.
    upstream = [g.contiguous() if g is not None else None for g in (grad_tilde_k, grad_tilde_v, grad_s)]
    dummy = keys.new_empty(0, dtype=sdt)
    gtk, gtv, gs = (g if g is not None else dummy for g in upstream)
    scratch = torch.empty(batch * heads * CHUNK * dims.state_pad, dtype=sdt, device=device)
    grads = [new_output((batch, steps, heads, dim), dtype, device) for _ in range(5)]
    grads += [new_output((batch, steps, heads, eta), dtype, device) for _ in range(3)]
    grads += [new_output(shape, sdt, device) for shape in state_shapes]
    if batch * heads == 0:  # an empty grid is not a valid launch
        return grads
    E = eta * dim
    _backward_kernel[(batch * heads,)](
        keys, queries, values, beta, gamma, p1, p2, p3, done_f,
        tick_residue(tick, r), oscillator_table(r, device), checkpoints, scratch,
        grad_out, gtk, gtv, gs, *grads,
        steps, heads, dim, eta, r, dims.period, eps,
        keys.stride(0), keys.stride(1), keys.stride(2), p1.stride(0), p1.stride(1), p1.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        r * heads * E, heads * E, E, r * heads * dim, heads * dim, dim, heads * E, E,
        HAS_DONES=dones is not None, HAS_DTK=upstream[0] is not None, HAS_DTV=upstream[1] is not None,
        HAS_DS=upstream[2] is not None, CHUNK_=CHUNK,
        R_PAD=dims.r_pad, ETA_PAD=dims.eta_pad, D_PAD=dims.d_pad, ACC=acc_dtype(dtype),
        num_warps=dims.num_warps(backward=True),
    )  # fmt: skip
    return grads
