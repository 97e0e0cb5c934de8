"""Pure-PyTorch AGaLiTe recurrence: the oracle for the kernels and the CPU path.

It follows the original's maths step for step (feature maps, decays, oscillators, read-out) in
float32, with two deliberate changes that keep it fast on CPU and exact at long horizons:
``tilde_k`` and ``s`` share the decay ``(1 - gamma) * keep``, so they run as one scan of R + 1 slices
(``s`` is the slice with coefficient 1); and the oscillator phase comes from the integer tick.
Shapes are documented at :func:`agalite_triton.recurrence.agalite_recurrence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..oscillator import oscillator_coefficients
from .discounted_sum import discounted_sum

__all__ = ["feature_maps", "reference_recurrence"]


def feature_maps(
    keys: torch.Tensor,
    queries: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eta-major outer-product features ``(..., H, eta*D)``: index ``n*D + i`` holds ``f(p[n]) g(x[i])``."""

    def outer(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (p.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)

    k_feat = outer(F.relu(p1), F.relu(keys))
    q_feat = outer(F.relu(p2), F.relu(queries))
    g_feat = outer(torch.sigmoid(p3), torch.sigmoid(gamma))
    return k_feat, q_feat, g_feat


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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Reference AGaLiTe recurrence; arguments validated by the caller (see ``agalite_recurrence``)."""
    out_dtype = keys.dtype
    compute = torch.promote_types(out_dtype, torch.float32)
    keys, queries, values, beta, gamma, p1, p2, p3 = (
        t.to(compute) for t in (keys, queries, values, beta, gamma, p1, p2, p3)
    )
    tilde_k, tilde_v, s = (t.to(compute) for t in (tilde_k, tilde_v, s))
    batch, steps = keys.shape[:2]
    r = tilde_k.shape[1]

    k_feat, q_feat, g_feat = feature_maps(keys, queries, gamma, p1, p2, p3)  # (B,T,H,E)
    b_gate = torch.sigmoid(beta)  # (B,T,H,D)
    decay_k = 1 - g_feat
    decay_v = 1 - b_gate
    if dones is not None:
        keep = (1 - dones.to(compute)).view(batch, steps, 1, 1)
        decay_k = decay_k * keep
        decay_v = decay_v * keep
    k_in = g_feat * k_feat
    v_in = b_gate * values

    osc = oscillator_coefficients(tick, steps, r).to(compute)  # (B,T,R)
    osc_s = torch.cat([osc, osc.new_ones(batch, steps, 1)], dim=-1)  # slice R is s: no oscillator
    k_states = discounted_sum(
        osc_s[..., None, None] * k_in.unsqueeze(2),
        decay_k.unsqueeze(2),
        torch.cat([tilde_k, s.unsqueeze(1)], dim=1),
    )  # (B,T,R+1,H,E)
    v_states = discounted_sum(
        osc[..., None, None] * v_in.unsqueeze(2), decay_v.unsqueeze(2), tilde_v
    )  # (B,T,R,H,D)

    scores = torch.einsum("btjhe,bthe->btjh", k_states, q_feat)  # <tilde_k_j, Q> and <s, Q>
    kv = torch.einsum("btjhd,btjh->bthd", v_states, scores[:, :, :r])
    norm = scores[:, :, r].unsqueeze(-1)
    out = kv / (2 * r * norm + eps)

    # Copies, so that a returned state never pins the (B, T, ...) buffer of every step.
    last_k = k_states[:, -1]
    final = (last_k[:, :r].contiguous(), v_states[:, -1].contiguous(), last_k[:, r].contiguous())
    return out.to(out_dtype), final
