"""Pure-PyTorch GaLiTe recurrence: the eager oracle for the kernels and the fused CPU path.

GaLiTe keeps the exact outer-product memory that AGaLiTe approximates: per head a (D, K) matrix C and a
(K,) normaliser s, each entry of C decaying by its own ``1 - sigma(beta_j) G_k``. That decay is not a
product of a value-side and a key-side factor, so every step touches the whole (D, K) matrix; the scans
below run over (B, T, H, D, K) tensors, which is fine for an oracle and a fallback but is why the fused
CPU path (``galite_cpu_fused``) is the default on CPU tensors. Shapes are documented at
:func:`agalite_triton.galite_recurrence.galite_recurrence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import galite_cpu_fused
from .discounted_sum import discounted_sum
from .recurrence import sigmoid_pair

__all__ = ["galite_reference_recurrence", "outer_features"]

Memory = tuple[torch.Tensor, torch.Tensor]


def outer_features(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(..., D) x (..., nu) -> (..., D*nu), dim-major (feature i*nu + n), as the original's ``pp_*``."""
    return (x.unsqueeze(-1) * p.unsqueeze(-2)).flatten(-2)


def galite_reference_recurrence(
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
    eps: float = 1e-10,
    final_out: Memory | None = None,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Memory]:
    """Eager GaLiTe recurrence; arguments validated by the caller (see ``galite_recurrence``).

    On CPU it runs fused (``galite_cpu_fused``: one pass per environment and head, same maths, ``slots``
    and ``restart`` included) unless ``AGALITE_CPU_FUSED=0``, the library cannot be built or the call is
    being traced by torch.compile; the eager maths below is the definition either way. ``slots`` (with
    ``final_out``): row n of the projections steps state row ``slots[n]``.
    """
    if keys.shape[1] > 0 and galite_cpu_fused.usable(keys, dones):
        return galite_cpu_fused.galite_fused_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s,
            eps=eps, final_out=final_out, slots=slots, restart=restart,
        )  # fmt: skip
    if slots is not None:
        rows = (c.index_select(0, slots), s.index_select(0, slots))
        out, rows = galite_reference_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3, dones, *rows, eps=eps, final_out=rows
        )
        assert final_out is not None
        for dst, src in zip(final_out, rows):
            dst.index_copy_(0, slots, src)
        return out, final_out
    out_dtype = keys.dtype
    compute = torch.promote_types(out_dtype, torch.float32)
    keys, queries, values, beta, gamma, p1, p2, p3 = (
        t.to(compute) for t in (keys, queries, values, beta, gamma, p1, p2, p3)
    )
    c, s = c.to(compute), s.to(compute)
    batch, steps = keys.shape[:2]

    sig_b, sig_nb = sigmoid_pair(beta)
    sig_g, sig_ng = sigmoid_pair(gamma)
    sig_p3, sig_np3 = sigmoid_pair(p3)
    # G K = (sigma(gamma) relu(k)) (x) (sigma(p3) relu(p1)): the factors multiply before the expansion.
    kg = outer_features(sig_g * F.relu(keys), sig_p3 * F.relu(p1))  # (B,T,H,K)
    q_feat = outer_features(F.relu(queries), F.relu(p2))  # (B,T,H,K)
    # 1 - G = sigma(-gamma) + sigma(gamma) sigma(-p3) and 1 - b G = sigma(-beta) + sigma(beta) (1 - G): the
    # same functions as the original's float32 ``1 - W`` without its cancellation as a gate nears 1.
    one_minus_g = torch.addcmul(sig_ng.unsqueeze(-1), sig_g.unsqueeze(-1), sig_np3.unsqueeze(-2)).flatten(-2)
    decay_s = one_minus_g
    decay_c = torch.addcmul(sig_nb.unsqueeze(-1), sig_b.unsqueeze(-1), one_minus_g.unsqueeze(-2))  # (B,T,H,D,K)
    if dones is not None:
        keep = (1 - dones.to(compute)).view(batch, steps, 1, 1)
        decay_s = keep * decay_s
        decay_c = keep.unsqueeze(-1) * decay_c
    x_c = (sig_b * values).unsqueeze(-1) * kg.unsqueeze(-2)  # (B,T,H,D,K)
    x_s = kg

    if restart is not None:
        # h_t = a_t m + x_t from restart memory m: the input gains a_t m and the decay becomes 0, which
        # also cuts every gradient to what was carried in.
        index, c_r, s_r = restart
        rb, rt = torch.nonzero(index >= 0, as_tuple=True)
        if rb.numel():
            rn = index[rb, rt]
            x_c = x_c.index_put((rb, rt), torch.addcmul(x_c[rb, rt], decay_c[rb, rt], c_r[rn].to(compute)))
            x_s = x_s.index_put((rb, rt), torch.addcmul(x_s[rb, rt], decay_s[rb, rt], s_r[rn].to(compute)))
            decay_c = decay_c.index_put((rb, rt), decay_c.new_zeros(()))
            decay_s = decay_s.index_put((rb, rt), decay_s.new_zeros(()))

    # One step with a destination for the final state: the scans write straight into it (the rollout's
    # in-place step never copies the state).
    direct = final_out is not None and steps == 1
    buf_c, buf_s = (t.unsqueeze(0) for t in final_out) if direct else (None, None)
    c_states = discounted_sum(x_c, decay_c, c, buf_c)  # (B,T,H,D,K)
    s_states = discounted_sum(x_s, decay_s, s, buf_s)  # (B,T,H,K)

    num = torch.linalg.vecdot(c_states, q_feat.unsqueeze(-2))  # (B,T,H,D)
    den = torch.linalg.vecdot(s_states, q_feat).unsqueeze(-1)  # (B,T,H,1)
    out = num / (den + eps)

    last = (c_states[:, -1], s_states[:, -1])
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
