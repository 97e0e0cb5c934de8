"""The kernels as torch.library custom ops with fake (meta) implementations and autograd, and
``triton_recurrence``, the entry point ``agalite_recurrence`` dispatches to.

Custom ops rather than a bare ``autograd.Function``: torch.compile then traces a model through the
recurrence as one opaque node (no graph break, shapes from the fake implementations) and AOTAutograd
uses the registered backward. ``register_autograd`` wraps forward/backward in an autograd Function.

Autocast: the ops register no autocast rule, so they run on whatever dtype the projections have
(bf16 under a bf16 autocast region); the kernels accumulate in fp32 and return the input dtype, as
the reference does.
"""

from __future__ import annotations

import torch

from .backward import recurrence_backward
from .forward import recurrence_forward
from .launch import CHUNK
from .step import step_forward

__all__ = ["triton_recurrence"]

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("agalite_triton::recurrence_fwd", mutates_args=())
def _recurrence_fwd(
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
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return recurrence_forward(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, save_checkpoints
    )


def _state_pad(r: int, eta: int, dim: int) -> int:
    import triton

    rp, ep, dp = triton.next_power_of_2(r), triton.next_power_of_2(eta), triton.next_power_of_2(dim)
    return rp * ep * dp + rp * dp + ep * dp


@_recurrence_fwd.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, save_checkpoints):
    batch, steps, heads, dim = keys.shape
    sdt = tilde_k.dtype
    if save_checkpoints:
        chunks = (steps + CHUNK - 1) // CHUNK
        ckpt = tilde_k.new_empty(batch * heads, chunks, _state_pad(tilde_k.shape[1], p1.shape[-1], dim))
    else:
        ckpt = tilde_k.new_empty(0)
    return (
        keys.new_empty(batch, steps, heads, dim),
        tilde_k.new_empty(tilde_k.shape, dtype=sdt),
        tilde_v.new_empty(tilde_v.shape, dtype=sdt),
        s.new_empty(s.shape, dtype=sdt),
        ckpt,
    )


@torch.library.custom_op("agalite_triton::recurrence_bwd", mutates_args=())
def _recurrence_bwd(
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
    return recurrence_backward(
        grad_out, grad_tilde_k, grad_tilde_v, grad_s,
        keys, queries, values, beta, gamma, p1, p2, p3, dones, checkpoints, tick, r, eps,
    )  # fmt: skip


@_recurrence_bwd.register_fake
def _(grad_out, grad_tilde_k, grad_tilde_v, grad_s, keys, queries, values, beta, gamma, p1, p2, p3, dones,
      checkpoints, tick, r, eps):  # fmt: skip
    batch, steps, heads, dim = keys.shape
    eta = p1.shape[-1]
    sdt = checkpoints.dtype
    grads = [keys.new_empty(batch, steps, heads, dim) for _ in range(5)]
    grads += [keys.new_empty(batch, steps, heads, eta) for _ in range(3)]
    grads += [
        keys.new_empty(batch, r, heads, eta * dim, dtype=sdt),
        keys.new_empty(batch, r, heads, dim, dtype=sdt),
        keys.new_empty(batch, heads, eta * dim, dtype=sdt),
    ]
    return grads


def _setup_context(ctx, inputs, output) -> None:
    keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, _tv, _s, tick, eps, _save = inputs
    ctx.r = tilde_k.shape[1]
    ctx.eps = eps
    ctx.mark_non_differentiable(output[4])
    ctx.save_for_backward(keys, queries, values, beta, gamma, p1, p2, p3, dones, tick, output[4])


def _backward(ctx, grad_out, grad_tilde_k, grad_tilde_v, grad_s, _grad_ckpt):
    keys, queries, values, beta, gamma, p1, p2, p3, dones, tick, ckpt = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(keys)
    grads = _recurrence_bwd(
        grad_out, grad_tilde_k, grad_tilde_v, grad_s,
        keys, queries, values, beta, gamma, p1, p2, p3, dones, ckpt, tick, ctx.r, ctx.eps,
    )  # fmt: skip
    # dones and tick are not differentiable; neither are eps and save_checkpoints.
    return (*grads[:8], None, *grads[8:], None, None, None)


_recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("agalite_triton::step", mutates_args=())
def _step_op(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return step_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps,
                        in_place=False)  # fmt: skip


@_step_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps):
    return keys.new_empty(keys.shape), tilde_k.new_empty(tilde_k.shape), tilde_v.new_empty(tilde_v.shape), \
        s.new_empty(s.shape)  # fmt: skip


@torch.library.custom_op("agalite_triton::step_into", mutates_args=("tk_out", "tv_out", "s_out"))
def _step_into_op(
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
    tk_out: torch.Tensor,
    tv_out: torch.Tensor,
    s_out: torch.Tensor,
) -> torch.Tensor:
    return step_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps,
                        in_place=False, state_out=(tk_out, tv_out, s_out))[0]  # fmt: skip


@_step_into_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, tk_out, tv_out, s_out):
    return keys.new_empty(keys.shape)


def triton_recurrence(
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
    final_out: State | None = None,
) -> tuple[torch.Tensor, State]:
    """The kernel backend of ``agalite_recurrence``: same arguments (validated there), same results.

    Returns out (B, T, H, D) in the input dtype and the final (tilde_k, tilde_v, s) in the state dtype.
    Without gradients a T = 1 call takes the one-step kernel; otherwise the sequence kernels run,
    keeping backward checkpoints only when autograd will need them. ``final_out`` (inference only,
    buffers shaped like the state; they may be the state itself, since every program reads its whole
    (b, h) slice before writing it) receives and is returned as the final state; the one-step kernel
    writes straight into it when its last dimension has unit stride.
    """
    differentiable = (keys, queries, values, beta, gamma, p1, p2, p3, tilde_k, tilde_v, s)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    if final_out is not None and needs_grad:
        raise RuntimeError("final_out: only for inference; call under torch.no_grad() or torch.inference_mode()")
    direct = final_out is not None and all(t.stride(-1) == 1 for t in final_out)
    if keys.shape[1] == 1 and direct:
        out = _step_into_op(
            keys[:, 0], queries[:, 0], values[:, 0], beta[:, 0], gamma[:, 0], p1[:, 0], p2[:, 0], p3[:, 0],
            None if dones is None else dones[:, 0], tilde_k, tilde_v, s, tick, eps, *final_out,
        )  # fmt: skip
        return out.unsqueeze(1), final_out
    if final_out is not None:
        out, final = triton_recurrence(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s,
                                       tick, eps)  # fmt: skip
        for dst, src in zip(final_out, final):
            dst.copy_(src)
        return out, final_out
    if keys.shape[1] == 1 and not needs_grad:
        out, tk, tv, st = _step_op(
            keys[:, 0], queries[:, 0], values[:, 0], beta[:, 0], gamma[:, 0], p1[:, 0], p2[:, 0], p3[:, 0],
            None if dones is None else dones[:, 0], tilde_k, tilde_v, s, tick, eps,
        )  # fmt: skip
        return out.unsqueeze(1), (tk, tv, st)
    out, tk, tv, st, _ckpt = _recurrence_fwd(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, needs_grad
    )
    return out, (tk, tv, st)
