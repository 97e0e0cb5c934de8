"""Per-step maths of the GaLiTe recurrence as ``@triton.jit`` helpers shared by its forward, backward and
one-step kernels, so that the three compute bit-identical memories.

Tile shapes inside a program (one batch row b, one head h, a block of BJ value rows j):
    feature tiles  [D_PAD, NU_PAD]          -- index (i, n) is key feature i*nu + n (dim-major, the original's)
    C              [BJ, D_PAD, NU_PAD]      -- value rows j of the (D, K) memory
    s              [D_PAD, NU_PAD]          -- the whole normaliser (every row block needs <s, Q>)
Padded lanes are loaded as 0 and stay 0: relu(0) = 0 makes K G and Q vanish there and 1 - G is masked
to 1, so padded memory lanes see decay keep (...) and input 0 and never become NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def galite_features(k, q, gam, p1, p2, p3, mask_in):
    """K G, Q, 1 - G and G (masked to 0 / 1 / 0 in padding) as feature tiles, and the sigmoids the
    gradients need: sigma(gamma), sigma(-gamma) [D_PAD], sigma(p3), sigma(-p3) [NU_PAD].

    G K = (sigma(gamma) relu(k)) (x) (sigma(p3) relu(p1)), the factors multiplied before the expansion,
    and 1 - G = sigma(-gamma) + sigma(gamma) sigma(-p3): the reference's forms, so that a gate near 1
    keeps its digits. The sigmoids are written out (as ``step_math.sigmoid``) because under the
    interpreter every nested jit call costs milliseconds, and this runs every step."""
    sig_g = 1.0 / (1.0 + tl.exp(-gam))
    sig_ng = 1.0 / (1.0 + tl.exp(gam))
    sig_p3 = 1.0 / (1.0 + tl.exp(-p3))
    sig_np3 = 1.0 / (1.0 + tl.exp(p3))
    kg = (sig_g * tl.maximum(k, 0.0))[:, None] * (sig_p3 * tl.maximum(p1, 0.0))[None, :]
    query = tl.maximum(q, 0.0)[:, None] * tl.maximum(p2, 0.0)[None, :]
    omg = tl.where(mask_in, sig_ng[:, None] + sig_g[:, None] * sig_np3[None, :], 1.0)
    gate = tl.where(mask_in, sig_g[:, None] * sig_p3[None, :], 0.0)
    return kg, query, omg, gate, sig_g, sig_ng, sig_p3, sig_np3


@triton.jit
def advance(c, s, kg, omg, v, bgate, bgate_c, keep):
    """One step on a block of value rows: C_t = keep C (1 - b G) + (b v) (x) (K G), s_t = keep s (1 - G) + K G,
    with 1 - b_j G_k as sigma(-beta_j) + sigma(beta_j) (1 - G_k). Returns C_t, s_t and the decay of C
    [BJ, D_PAD, NU_PAD] (the backward carries its adjoint through it)."""
    decay = keep * (bgate_c[:, None, None] + bgate[:, None, None] * omg[None, :, :])
    c = decay * c + (bgate * v)[:, None, None] * kg[None, :, :]
    s = (keep * omg) * s + kg
    return c, s, decay


@triton.jit
def readout(c, s, query, eps):
    """The block's rows of the read-out C_t Q / (<s_t, Q> + eps) [BJ], and the denominator."""
    den = tl.sum(tl.sum(s * query, axis=1), axis=0) + eps
    return tl.sum(tl.sum(c * query[None, :, :], axis=2), axis=1) / den, den


@triton.jit
def load_memory_rows(c_ptr, row, h, sc_b, sc_h, sc_j, offs_j, feat, mask_j, mask_in, ACC: tl.constexpr):
    """Rows ``offs_j`` of C (B, H, D, K), strided, for batch row ``row``."""
    return tl.load(c_ptr + row * sc_b + h * sc_h + offs_j[:, None, None] * sc_j + feat[None, :, :],
                   mask=mask_j[:, None, None] & mask_in[None, :, :], other=0.0).to(ACC)  # fmt: skip


@triton.jit
def load_norm(s_ptr, row, h, ss_b, ss_h, feat, mask_in, ACC: tl.constexpr):
    return tl.load(s_ptr + row * ss_b + h * ss_h + feat, mask=mask_in, other=0.0).to(ACC)


@triton.jit
def load_rows(c_ptr, s_ptr, row, h, sc_b, sc_h, sc_j, ss_b, ss_h, offs_j, feat, mask_j, mask_in, ACC: tl.constexpr):
    """Rows ``offs_j`` of C (B, H, D, K) and the whole s (B, H, K), strided, for batch row ``row``."""
    c = load_memory_rows(c_ptr, row, h, sc_b, sc_h, sc_j, offs_j, feat, mask_j, mask_in, ACC)
    return c, load_norm(s_ptr, row, h, ss_b, ss_h, feat, mask_in, ACC)


@triton.jit
def load_step(k_ptr, q_ptr, v_ptr, beta_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, off_d, off_e, offs_i, mask_i,
              offs_n, mask_n, offs_j, mask_j, mask_in, ACC: tl.constexpr):  # fmt: skip
    """One step's projections and features: the key side over the D key dims and nu factors, v and
    sigma(+-beta) over this block's value rows ``offs_j``, then ``galite_features``."""
    k = tl.load(k_ptr + off_d + offs_i, mask=mask_i, other=0.0).to(ACC)
    q = tl.load(q_ptr + off_d + offs_i, mask=mask_i, other=0.0).to(ACC)
    gam = tl.load(gamma_ptr + off_d + offs_i, mask=mask_i, other=0.0).to(ACC)
    p1 = tl.load(p1_ptr + off_e + offs_n, mask=mask_n, other=0.0).to(ACC)
    p2 = tl.load(p2_ptr + off_e + offs_n, mask=mask_n, other=0.0).to(ACC)
    p3 = tl.load(p3_ptr + off_e + offs_n, mask=mask_n, other=0.0).to(ACC)
    v = tl.load(v_ptr + off_d + offs_j, mask=mask_j, other=0.0).to(ACC)
    beta = tl.load(beta_ptr + off_d + offs_j, mask=mask_j, other=0.0).to(ACC)
    kg, query, omg, gate, sig_g, sig_ng, sig_p3, sig_np3 = galite_features(k, q, gam, p1, p2, p3, mask_in)
    bgate = 1.0 / (1.0 + tl.exp(-beta))
    bgate_c = 1.0 / (1.0 + tl.exp(beta))
    return k, q, p1, p2, v, kg, query, omg, gate, sig_g, sig_ng, sig_p3, sig_np3, bgate, bgate_c


@triton.jit
def store_memory_rows(c_ptr, c, row, h, sc_b, sc_h, sc_j, offs_j, feat, mask_j, mask_in):
    tl.store(c_ptr + row * sc_b + h * sc_h + offs_j[:, None, None] * sc_j + feat[None, :, :],
             c.to(c_ptr.dtype.element_ty), mask=mask_j[:, None, None] & mask_in[None, :, :])  # fmt: skip


@triton.jit
def store_norm(s_ptr, s, row, h, ss_b, ss_h, feat, mask):
    tl.store(s_ptr + row * ss_b + h * ss_h + feat, s.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_slot(base_ptr, c, s, offs_j, mask_j, rows, write_s, pad, FP: tl.constexpr):
    """A checkpoint or scratch slot of ``rows`` padded memory rows then s, FP = D_PAD * NU_PAD values each:
    rows ``offs_j`` (masked by ``mask_j``) of C, and s where ``write_s``. ``pad`` [D_PAD, NU_PAD] are the
    padded feature offsets i * NU_PAD + n."""
    tl.store(base_ptr + offs_j[:, None, None] * FP + pad[None, :, :], c, mask=mask_j[:, None, None])
    if write_s:
        tl.store(base_ptr + rows * FP + pad, s)


@triton.jit
def load_slot(base_ptr, offs_j, mask_j, rows, pad, FP: tl.constexpr):
    """The inverse of ``store_slot`` (masked rows read as 0)."""
    c = tl.load(base_ptr + offs_j[:, None, None] * FP + pad[None, :, :], mask=mask_j[:, None, None], other=0.0)
    s = tl.load(base_ptr + rows * FP + pad)
    return c, s
