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

from .step_math import load_vec, sigmoid


@triton.jit
def galite_features(k, q, gam, p1, p2, p3, mask_in):
    """K G, Q and 1 - G as feature tiles, and G (masked to 0 in padding) for the gradients.

    G K = (sigma(gamma) relu(k)) (x) (sigma(p3) relu(p1)), the factors multiplied before the expansion,
    and 1 - G = sigma(-gamma) + sigma(gamma) sigma(-p3): the reference's forms, so that a gate near 1
    keeps its digits."""
    sig_g = sigmoid(gam)
    sig_p3 = sigmoid(p3)
    kg = (sig_g * tl.maximum(k, 0.0))[:, None] * (sig_p3 * tl.maximum(p1, 0.0))[None, :]
    query = tl.maximum(q, 0.0)[:, None] * tl.maximum(p2, 0.0)[None, :]
    omg = tl.where(mask_in, sigmoid(-gam)[:, None] + sig_g[:, None] * sigmoid(-p3)[None, :], 1.0)
    gate = tl.where(mask_in, sig_g[:, None] * sig_p3[None, :], 0.0)
    return kg, query, omg, gate


@triton.jit
def memory_decay(omg, bgate, bgate_c, keep):
    """keep (1 - b_j G_k) as keep (sigma(-beta_j) + sigma(beta_j) (1 - G_k)), [BJ, D_PAD, NU_PAD]."""
    return keep * (bgate_c[:, None, None] + bgate[:, None, None] * omg[None, :, :])


@triton.jit
def advance_memory(c, kg, omg, v, bgate, bgate_c, keep):
    """C_t = keep C (1 - b G) + (b v) (x) (K G) on a block of value rows."""
    return memory_decay(omg, bgate, bgate_c, keep) * c + (bgate * v)[:, None, None] * kg[None, :, :]


@triton.jit
def advance_norm(s, kg, omg, keep):
    return (keep * omg) * s + kg


@triton.jit
def row_numerators(c, query):
    """<C_t[j], Q> for each row of the block, [BJ]."""
    return tl.sum(tl.sum(c * query[None, :, :], axis=2), axis=1)


@triton.jit
def denominator(s, query, eps):
    return tl.sum(tl.sum(s * query, axis=1), axis=0) + eps


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
def load_key_side(k_ptr, q_ptr, gamma_ptr, p1_ptr, p2_ptr, p3_ptr, off_d, off_e, offs_i, mask_i, offs_n, mask_n,
                  ACC: tl.constexpr):  # fmt: skip
    """One step's key-side projections: k, q, gamma over the D key dims, p1, p2, p3 over the nu factors."""
    k = load_vec(k_ptr + off_d, offs_i, mask_i, ACC)
    q = load_vec(q_ptr + off_d, offs_i, mask_i, ACC)
    gam = load_vec(gamma_ptr + off_d, offs_i, mask_i, ACC)
    p1 = load_vec(p1_ptr + off_e, offs_n, mask_n, ACC)
    p2 = load_vec(p2_ptr + off_e, offs_n, mask_n, ACC)
    p3 = load_vec(p3_ptr + off_e, offs_n, mask_n, ACC)
    return k, q, gam, p1, p2, p3


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
