"""Pure-PyTorch AGaLiTe recurrence: the oracle for the kernels and the CPU path.

It follows the original's maths step for step (feature maps, decays, oscillators, read-out) in
float32, with two deliberate changes that keep it fast on CPU and exact at long horizons:
the discounted sums run as a time loop of fused ``addcmul`` with a hand-written backward (see
``discounted_sum``), and the oscillator phase comes from the integer tick. On CPU the same maths runs
fused by default (``cpu_fused``, one pass per environment and head); this module is its eager definition.
Shapes are documented at :func:`agalite_triton.recurrence.agalite_recurrence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..oscillator import oscillator_coefficients, oscillator_table, step_residues
from . import cpu_fused
from .discounted_sum import discounted_sum

__all__ = ["reference_recurrence", "sigmoid_pair"]


class _SigmoidPair(torch.autograd.Function):
    """``(sigma(x), sigma(-x))`` with the derivative ``sigma(x) sigma(-x)``: torch's ``y (1 - y)`` keeps
    few correct digits once ``y`` nears 1, which is where a gate's gradient matters most."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos, neg = torch.sigmoid(x), torch.sigmoid(-x)
        ctx.save_for_backward(pos, neg)
        return pos, neg

    @staticmethod
    def backward(ctx, grad_pos: torch.Tensor, grad_neg: torch.Tensor) -> torch.Tensor:
        pos, neg = ctx.saved_tensors
        return (grad_pos - grad_neg) * (pos * neg)


def sigmoid_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _SigmoidPair.apply(x)


def _col(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1)


def _row(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-2)


def _outer(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(..., eta) x (..., D) -> (..., eta*D), eta-major."""
    return (_col(p) * _row(x)).flatten(-2)


def reference_recurrence(
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
    eps: float = 1e-5,
    final_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Reference AGaLiTe recurrence; arguments validated by the caller (see ``agalite_recurrence``).

    On CPU it runs fused (``cpu_fused``: one pass per environment and head, same maths, ``slots`` and
    ``restart`` included) unless ``AGALITE_CPU_FUSED=0``, the library cannot be built or the call is being
    traced by torch.compile; the eager maths below is the definition either way. ``slots`` (with
    ``final_out``): row n of the projections steps state row ``slots[n]``.
    """
    if keys.shape[1] > 0 and cpu_fused.usable(keys, dones):
        return cpu_fused.fused_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick,
            eps=eps, final_out=final_out, slots=slots, restart=restart,
        )  # fmt: skip
    if slots is not None:
        return _gathered(
            keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, final_out, slots
        )
    out_dtype = keys.dtype
    compute = torch.promote_types(out_dtype, torch.float32)
    keys, queries, values, beta, gamma, p1, p2, p3 = (
        t.to(compute) for t in (keys, queries, values, beta, gamma, p1, p2, p3)
    )
    tilde_k, tilde_v, s = (t.to(compute) for t in (tilde_k, tilde_v, s))
    batch, steps = keys.shape[:2]
    r = tilde_k.shape[1]

    # Every (H, E) feature is an outer product eta x D of small factors; multiplying the factors first
    # and expanding once saves three full passes over (B, T, H, E) per call (the products associate
    # differently from the original's, a rounding-level difference).
    sig_p3, sig_np3 = sigmoid_pair(p3)
    sig_g, sig_ng = sigmoid_pair(gamma)
    sig_b, sig_nb = sigmoid_pair(beta)
    key_a, key_b = sig_p3 * F.relu(p1), sig_g * F.relu(keys)  # gamma-hat * K = (key_a (x) key_b)
    q_feat = _outer(F.relu(p2), F.relu(queries))  # (B,T,H,E)
    # The decays 1 - sigma(p3) sigma(gamma) and 1 - sigma(beta), written as
    # sigma(-p3) + sigma(p3) sigma(-gamma) and sigma(-beta): the same function without the cancellation
    # that leaves 1 - G with few correct digits as a gate nears 1 (the original computes 1 - G in float32).
    if dones is None:
        decay_k = (_col(sig_p3) * _row(sig_ng)).add_(_col(sig_np3)).flatten(-2)  # (B,T,H,E)
        decay_v = sig_nb
    else:
        keep = (1 - dones.to(compute)).view(batch, steps, 1, 1)
        keep_e = keep.unsqueeze(-1)
        decay_k = (_col(keep * sig_p3) * _row(sig_ng)).add_(keep_e * _col(sig_np3)).flatten(-2)
        decay_v = keep * sig_nb
    k_in = _outer(key_a, key_b)  # (B,T,H,E)
    v_in = sig_b * values

    # With one step and a destination for the final state, the scans write straight into it: the
    # rollout hot path then never copies the state.
    direct = final_out is not None and steps == 1
    buf_k, buf_v, buf_s = (t.unsqueeze(0) for t in final_out) if direct else (None, None, None)
    if restart is None:
        osc = oscillator_coefficients(tick, steps, r).to(compute)  # (B,T,R)
        k_states = discounted_sum(osc[..., None, None] * k_in.unsqueeze(2), decay_k.unsqueeze(2), tilde_k, buf_k)
        s_states = discounted_sum(k_in, decay_k, s, buf_s)  # (B,T,H,E)
        v_states = discounted_sum(osc[..., None, None] * v_in.unsqueeze(2), decay_v.unsqueeze(2), tilde_v, buf_v)
    else:
        k_states, s_states, v_states = _restart_scans(
            restart, tick, k_in, v_in, decay_k, decay_v, (tilde_k, tilde_v, s), (buf_k, buf_s, buf_v)
        )

    # Products and sums rather than einsum: einsum would permute every state into a bmm layout first.
    scores = torch.linalg.vecdot(k_states, q_feat.unsqueeze(2))  # <tilde_k_j, Q>: (B,T,R,H)
    norm = torch.linalg.vecdot(s_states, q_feat).unsqueeze(-1)  # <s, Q>: (B,T,H,1)
    kv = (v_states * scores.unsqueeze(-1)).sum(2)  # (B,T,H,D)
    out = kv / (2 * r * norm + eps)

    last = (k_states[:, -1], v_states[:, -1], s_states[:, -1])
    if final_out is not None:
        if not direct:
            for dst, src in zip(final_out, last):
                dst.copy_(src)
        final = final_out
    elif steps > 1:
        # Copies, so that a returned state never pins the buffer of every step.
        final = tuple(t.clone() for t in last)
    else:
        final = last
    return out.to(out_dtype), final


def _gathered(
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
    final_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Eager ``slots``: gather the N rows, step them in place (they are fresh copies), scatter them back."""
    rows = (tilde_k.index_select(0, slots), tilde_v.index_select(0, slots), s.index_select(0, slots))
    out, rows = reference_recurrence(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, *rows, tick.index_select(0, slots),
        eps=eps, final_out=rows,
    )  # fmt: skip
    for dst, src in zip(final_out, rows):
        dst.index_copy_(0, slots, src)
    return out, final_out


def _restart_scans(
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tick: torch.Tensor,
    k_in: torch.Tensor,
    v_in: torch.Tensor,
    decay_k: torch.Tensor,
    decay_v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bufs: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three discounted sums with the memory before chosen steps replaced by restart memories.

    In ``h_t = a_t h_{t-1} + x_t`` a restart at (b, t) from memory m is ``h_t = a_t m + x_t``: the step's
    input gains ``a_t m`` (formed by the same ``addcmul`` that a carried memory goes through, so that a
    replay matches the rollout's step bit for bit) and its decay becomes 0, which also cuts every gradient
    to what was carried in. Only the N restart rows are gathered; nothing of size (B, T) x state is copied.
    """
    index, tk_r, tv_r, s_r, tick_r = restart
    tilde_k, tilde_v, s = state
    buf_k, buf_s, buf_v = bufs
    compute = k_in.dtype
    steps, r = k_in.shape[1], tilde_k.shape[1]
    residues = step_residues(tick, steps, r, index, tick_r)  # (B,T)
    osc = oscillator_table(r, device=tick.device).t()[residues].to(compute)  # (B,T,R)
    x_k = osc[..., None, None] * k_in.unsqueeze(2)  # (B,T,R,H,E), fresh: written in place below
    x_v = osc[..., None, None] * v_in.unsqueeze(2)  # (B,T,R,H,D)
    rb, rt = torch.nonzero(index >= 0, as_tuple=True)
    if rb.numel():
        rn = index[rb, rt]
        a_k, a_v = decay_k[rb, rt], decay_v[rb, rt]  # (N', H, E), (N', H, D)
        x_k[rb, rt] = torch.addcmul(x_k[rb, rt], a_k.unsqueeze(1), tk_r[rn].to(compute))
        x_v[rb, rt] = torch.addcmul(x_v[rb, rt], a_v.unsqueeze(1), tv_r[rn].to(compute))
        # Out of place: k_in and decay_v (sigma(-beta) without dones) are saved for other backwards.
        x_s = k_in.index_put((rb, rt), torch.addcmul(k_in[rb, rt], a_k, s_r[rn].to(compute)))
        decay_k = decay_k.index_put((rb, rt), decay_k.new_zeros(()))
        decay_v = decay_v.index_put((rb, rt), decay_v.new_zeros(()))
    else:
        x_s = k_in
    k_states = discounted_sum(x_k, decay_k.unsqueeze(2), tilde_k, buf_k)
    s_states = discounted_sum(x_s, decay_k, s, buf_s)
    v_states = discounted_sum(x_v, decay_v.unsqueeze(2), tilde_v, buf_v)
    return k_states, s_states, v_states

