"""The one functional entry point for an AGaLiTe attention layer's recurrence.

Letters used everywhere in this package:
    B batch (environments), T time steps of one call, H heads, D head dim, eta feature multiplier,
    E = eta * D feature dim, R approximation terms (the paper's r, one oscillator each), L layers.

Per step t (0-based inside the call), head h, with sigma = sigmoid and keep_t = 1 - done_t:
    K_t = relu(p1_t) (x) relu(k_t),  Q_t = relu(p2_t) (x) relu(q_t),  G_t = sigma(p3_t) (x) sigma(gamma_t)
        -- (H, E) outer products, eta-major: index n*D + i
    b_t = sigma(beta_t)                                     (H, D); values have no activation
    c_t[j] = cos(theta_t * omega_j), theta_t = tick + t + 1, omega = linspace(-pi, pi, R)
    tilde_k_t[j] = (1 - G_t) keep_t tilde_k_{t-1}[j] + c_t[j] G_t K_t
    tilde_v_t[j] = (1 - b_t) keep_t tilde_v_{t-1}[j] + c_t[j] b_t v_t
    s_t          = (1 - G_t) keep_t s_{t-1}          +        G_t K_t
    out_t = sum_j tilde_v_t[j] <tilde_k_t[j], Q_t> / (2 R <s_t, Q_t> + eps)
"""

from __future__ import annotations

import torch

from ._call import check_call_options, no_steps
from ._validation import check_recurrence_args
from .backend import resolve_backend
from .reference import reference_recurrence

__all__ = ["agalite_recurrence"]

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def agalite_recurrence(
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
    *,
    eps: float = 1e-5,
    backend: str | None = None,
    final_out: State | None = None,
    slots: torch.Tensor | None = None,
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    check_slots: bool | None = None,
) -> tuple[torch.Tensor, State]:
    """Run one attention layer's recurrence over T steps.

    Args:
        keys, queries, values, beta, gamma: (B, T, H, D) raw projections (before any activation), one
            floating dtype. Any strides are accepted (views into the fused projection are the norm).
        p1, p2, p3: (B, T, H, eta) raw projections for the key, query and gamma feature maps.
        dones: (B, T) bool or 0/1 floating, or None. ``dones[b, t]`` means step t starts a new episode:
            the memory is zeroed before step t's contribution. None: no resets.
        tilde_k: (B, R, H, E), tilde_v: (B, R, H, D), s: (B, H, E): float32 (float64 for float64 inputs).
        tick: (B,) int64, the tick before the call; step t uses ``tick + t + 1``. The caller advances
            it by T; dones do not reset it.
        eps: added to ``2 R <s, Q>`` after the factor 2R, as the original.
        backend: ``None`` (``AGALITE_BACKEND``, default ``auto``), ``auto``, ``reference`` or ``triton``.
        final_out: optional ``(tilde_k, tilde_v, s)`` buffers, shaped like the state, that receive the
            final state (and are returned), for inference without autograd: a rollout then writes each
            layer's new state straight into its slot of the stacked state. They may be the input state
            tensors themselves (an in-place step).
        slots: (N,) int64 or None, for stepping a subset of a larger state (async environments). The
            projections and dones then have batch N, while tilde_k, tilde_v, s, tick and final_out have
            the state's batch B_s >= N: row n reads state row ``slots[n]`` and ``final_out`` receives
            the new memories in rows ``slots[n]`` only (every other row is left as it is). Inference
            only; needs ``final_out`` (usually the state itself). Slots must be distinct and in
            [0, B_s); see ``check_slots``.
        restart: ``(index, tilde_k_r, tilde_v_r, s_r, tick_r)`` or None: restart chosen steps from given
            memories (TorchRL's recurrent-mode replay). ``index`` (B, T) int64 is -1 for no restart or n
            in [0, N): the memory before step t is replaced by row n of ``tilde_k_r`` (N, R, H, E),
            ``tilde_v_r`` (N, R, H, D), ``s_r`` (N, H, E) (state dtype) and the tick before step t by
            ``tick_r[n]`` ((N,) int64), instead of what was carried; step t's done, if any, then applies
            as usual. Several steps of one batch row may restart from the same row n, two batch rows may
            not. Gradients reach the restart memories, and nothing from before a restart point reaches
            past it. The caller advances its tick (last restart tick + steps after it).
        check_slots: check the values of ``slots`` (distinct, in range) and of ``restart``'s index (in
            range, each restart row used by one batch row). The check needs a host sync: None (default)
            checks CPU tensors and skips CUDA ones; True always checks, False never does (bad values are
            then undefined behaviour).

    Returns:
        out (B, T, H, D) (N rows with slots) in the input dtype, and the final state
        ``(tilde_k, tilde_v, s)`` in float32 (``final_out`` where given).
    """
    has_state_rows = slots is not None and isinstance(tilde_k, torch.Tensor) and tilde_k.dim() >= 1
    state_batch = tilde_k.shape[0] if has_state_rows else None
    check_recurrence_args(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, has_time=True,
        state_batch=state_batch,
    )  # fmt: skip
    batch, steps = keys.shape[:2]
    state = (tilde_k, tilde_v, s)
    check_call_options(
        state, ("tilde_k", "tilde_v", "s"), batch, steps, keys.device, final_out, slots, restart, check_slots,
        restart_tick=True,
    )  # fmt: skip
    chosen = resolve_backend(backend, keys.device)
    if steps == 0:
        return no_steps(keys, state, final_out, slots)  # type: ignore[return-value]
    if chosen == "triton":
        from .kernels import triton_recurrence

        return triton_recurrence(
            keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick,
            eps=eps, final_out=final_out, slots=slots, restart=restart,
        )  # fmt: skip
    # With slots the reference reads and writes the slot rows itself (fused on CPU; gathered otherwise).
    return reference_recurrence(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick,
        eps=eps, final_out=final_out, slots=slots, restart=restart,
    )  # fmt: skip
