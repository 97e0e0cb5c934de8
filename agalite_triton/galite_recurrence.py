"""The one functional entry point for a GaLiTe attention layer's recurrence.

GaLiTe is the exact gated linear transformer that AGaLiTe approximates. Letters as everywhere in this
package (B batch, T steps of one call, H heads, D head dim), and nu the feature multiplier, K = nu * D
the key feature dim. Per step t, head h, with sigma = sigmoid and keep_t = 1 - done_t:
    K_t = relu(k_t) (x) relu(p1_t),  Q_t = relu(q_t) (x) relu(p2_t),  G_t = sigma(gamma_t) (x) sigma(p3_t)
        -- (K,) outer products, dim-major: index i*nu + n (the original's layout)
    b_t = sigma(beta_t)                                        (D); values have no activation
    C_t[j, k] = keep_t C_{t-1}[j, k] (1 - b_t[j] G_t[k]) + v_t[j] b_t[j] K_t[k] G_t[k]     (D, K)
    s_t[k]    = keep_t s_{t-1}[k] (1 - G_t[k]) + K_t[k] G_t[k]                             (K)
    out_t     = C_t Q_t / (<s_t, Q_t> + eps)                                                (D)
A done zeroes the memory before the step's contribution. There is no tick: nothing but the memory
depends on time.
"""

from __future__ import annotations

import torch

from ._call import check_call_options, no_steps
from ._validation import check_galite_args
from .backend import resolve_backend
from .reference.galite_recurrence import galite_reference_recurrence

__all__ = ["galite_recurrence"]

Memory = tuple[torch.Tensor, torch.Tensor]


def galite_recurrence(
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
    *,
    eps: float = 1e-10,
    backend: str | None = None,
    final_out: Memory | None = None,
    slots: torch.Tensor | None = None,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    check_slots: bool | None = None,
) -> tuple[torch.Tensor, Memory]:
    """Run one GaLiTe attention layer's recurrence over T steps.

    Args:
        keys, queries, values, beta, gamma: (B, T, H, D) raw projections (before any activation), one
            floating dtype, any strides. ``queries`` is the second of the original's two stacked query
            projections (the one applied to the first's output).
        p1, p2, p3: (B, T, H, nu) raw projections of the key, query and gamma feature maps' nu factor.
        dones: (B, T) bool or 0/1 floating, or None. ``dones[b, t]``: step t starts a new episode, the
            memory is zeroed before step t's contribution.
        c: (B, H, D, K) and s: (B, H, K), K = nu * D: the memory before the call, float32 (float64 for
            float64 inputs); ``c[..., j, k]`` is value row j, key feature k = i * nu + n.
        eps: added to ``<s, Q>``, with no factor in front (1e-10, as the original).
        backend: ``None`` (``AGALITE_BACKEND``, default ``auto``), ``auto``, ``reference`` or ``triton``.
        final_out: optional ``(c, s)`` buffers shaped like the memory that receive the final memory (and
            are returned), for inference without autograd; they may be ``c`` and ``s`` themselves.
        slots: (N,) int64 or None: step the state rows ``slots`` of a larger memory in place (async
            environments). The projections and dones have batch N, ``c``, ``s`` and ``final_out`` the
            state's batch B_s >= N; rows other than ``slots`` are left as they are. Inference only, needs
            ``final_out``; slots distinct and in [0, B_s).
        restart: ``(index, c_r, s_r)`` or None: ``index`` (B, T) int64 is -1 or n in [0, N): the memory
            before step t is row n of ``c_r`` (N, H, D, K) and ``s_r`` (N, H, K) instead of what was
            carried (step t's done still applies). Each restart row belongs to one batch row. Gradients
            reach the restart memories and nothing from before a restart point reaches past it.
        check_slots: check the values of ``slots`` and ``restart``'s index (a host sync): None checks CPU
            tensors only, True always, False never.

    Returns:
        out (B, T, H, D) (N rows with slots) in the input dtype, and the final memory ``(c, s)`` in the
        state dtype (``final_out`` where given).
    """
    has_state_rows = slots is not None and isinstance(c, torch.Tensor) and c.dim() >= 1
    check_galite_args(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, has_time=True,
        state_batch=c.shape[0] if has_state_rows else None,
    )  # fmt: skip
    batch, steps = keys.shape[:2]
    check_call_options(
        (c, s), ("c", "s"), batch, steps, keys.device, final_out, slots, restart, check_slots, restart_tick=False
    )
    chosen = resolve_backend(backend, keys.device)
    if steps == 0:
        return no_steps(keys, (c, s), final_out, slots)  # type: ignore[return-value]
    if chosen == "triton":
        from .kernels import triton_galite_recurrence

        return triton_galite_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s,
            eps=eps, final_out=final_out, slots=slots, restart=restart,
        )  # fmt: skip
    return galite_reference_recurrence(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s,
        eps=eps, final_out=final_out, slots=slots, restart=restart,
    )  # fmt: skip
