"""Per-step maths of the recurrence as ``@triton.jit`` helpers shared by the forward, backward and
one-step kernels, so that the three compute bit-identical states.

Tile shapes inside a program (one batch row b, one head h):
    feature tiles  [ETA_PAD, D_PAD]         -- index (n, i) is feature n*D + i (eta-major, as the original)
    tilde_k        [R_PAD, ETA_PAD, D_PAD]
    tilde_v        [R_PAD, D_PAD]
    s              [ETA_PAD, D_PAD]
Padded lanes are loaded as 0 and must stay 0: relu(0) = 0 makes K and Q vanish there and ``G`` is
masked explicitly, so padded state lanes see decay (1 - 0) * keep and input 0 and never become NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    # exp overflow gives 1 / inf = 0, the right limit, so saturated logits never make NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def load_vec(ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def key_features(k, gam, p1, p3, mask_nd):
    """K = relu(p1) (x) relu(k), G = sigma(p3) (x) sigma(gamma) and 1 - G, masked to 0 / 1 in padding.

    1 - G is formed as sigma(-p3) + sigma(p3) sigma(-gamma), the same function without the cancellation
    that leaves few correct digits as G nears 1 (as the reference does)."""
    key = tl.maximum(p1, 0.0)[:, None] * tl.maximum(k, 0.0)[None, :]
    sig_p3 = sigmoid(p3)
    gate = tl.where(mask_nd, sig_p3[:, None] * sigmoid(gam)[None, :], 0.0)
    gate_c = tl.where(mask_nd, sigmoid(-p3)[:, None] + sig_p3[:, None] * sigmoid(-gam)[None, :], 1.0)
    return key, gate, gate_c


@triton.jit
def query_features(q, p2):
    return tl.maximum(p2, 0.0)[:, None] * tl.maximum(q, 0.0)[None, :]


@triton.jit
def advance(tk, tv, s, key, gate, gate_c, v, bgate, bgate_c, keep, c):
    """One step of the three discounted sums; ``c`` [R_PAD] are the oscillator coefficients and
    ``gate_c`` / ``bgate_c`` the complements 1 - G and 1 - b = sigma(-beta)."""
    kin = gate * key
    ak = gate_c * keep
    tk = ak[None, :, :] * tk + c[:, None, None] * kin[None, :, :]
    tv = (bgate_c * keep)[None, :] * tv + c[:, None] * (bgate * v)[None, :]
    s = ak * s + kin
    return tk, tv, s


@triton.jit
def readout(tk, tv, s, query, two_r, eps):
    """Normalised read-out [D_PAD], the scores <tilde_k_j, Q> [R_PAD] and the denominator."""
    score = tl.sum(tl.sum(tk * query[None, :, :], axis=2), axis=1)
    norm = tl.sum(tl.sum(s * query, axis=1), axis=0)
    den = two_r * norm + eps
    return readout_from_scores(tv, score, den), score, den


@triton.jit
def tick_phase(tick, P):
    """``tick mod P`` in [0, P) from a raw int64 tick, for every int64 (negative ones and those near
    2**63 included): the remainder is taken before anything is added, and its sign fixed whichever
    convention (C's or Python's) the integer remainder follows."""
    res = tick % P
    return tl.where(res < 0, res + P, res)


@triton.jit
def keep_of(done_ptr, ACC: tl.constexpr):
    """``1 - done`` from a bool or 0/1 floating done flag, read as it is (no host-side conversion)."""
    return 1.0 - tl.load(done_ptr).to(ACC)


@triton.jit
def readout_from_scores(tv, score, den):
    """The read-out [D_PAD] from the scores and denominator a forward saved (see ``readout``)."""
    return tl.sum(tv * score[:, None], axis=0) / den


@triton.jit
def oscillators(table_ptr, phase, P, offs_r, mask_r, ACC: tl.constexpr):
    """cos(tick * omega_j) for the step whose tick residue is ``phase`` (table is (R, P), row-major)."""
    return tl.load(table_ptr + offs_r * P + phase, mask=mask_r, other=0.0).to(ACC)
