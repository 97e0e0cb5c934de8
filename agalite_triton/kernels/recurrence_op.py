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
from .forward import recurrence_forward, saved_length
from .launch import dims_of, into_buffers, needs_grad_of
from .step import step_forward

__all__ = ["triton_recurrence"]

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Restart = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _restart_of(index, tk_r, tv_r, s_r, tick_r) -> Restart | None:
    return None if index is None else (index, tk_r, tv_r, s_r, tick_r)


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
    chunk: int = 16,
    restart_index: torch.Tensor | None = None,
    tilde_k_r: torch.Tensor | None = None,
    tilde_v_r: torch.Tensor | None = None,
    s_r: torch.Tensor | None = None,
    tick_r: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return recurrence_forward(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, save_checkpoints,
        chunk, restart=_restart_of(restart_index, tilde_k_r, tilde_v_r, s_r, tick_r),
    )  # fmt: skip


@_recurrence_fwd.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, save_checkpoints,
      chunk=16, restart_index=None, tilde_k_r=None, tilde_v_r=None, s_r=None, tick_r=None):  # fmt: skip
    batch, steps, heads, dim = keys.shape
    sdt = tilde_k.dtype
    if save_checkpoints:
        dims = dims_of(keys, p1.shape[-1], tilde_k.shape[1])
        saved = tilde_k.new_empty(batch * heads, saved_length(dims, chunk))
    else:
        saved = tilde_k.new_empty(0)
    return (
        keys.new_empty(batch, steps, heads, dim),
        tilde_k.new_empty(tilde_k.shape, dtype=sdt),
        tilde_v.new_empty(tilde_v.shape, dtype=sdt),
        s.new_empty(s.shape, dtype=sdt),
        saved,
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
    saved: torch.Tensor,
    tick: torch.Tensor,
    r: int,
    eps: float,
    chunk: int = 16,
    restart_index: torch.Tensor | None = None,
    tilde_k_r: torch.Tensor | None = None,
    tilde_v_r: torch.Tensor | None = None,
    s_r: torch.Tensor | None = None,
    tick_r: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    return recurrence_backward(
        grad_out, grad_tilde_k, grad_tilde_v, grad_s,
        keys, queries, values, beta, gamma, p1, p2, p3, dones, saved, tick, r, eps, chunk,
        restart=_restart_of(restart_index, tilde_k_r, tilde_v_r, s_r, tick_r),
    )  # fmt: skip


@_recurrence_bwd.register_fake
def _(grad_out, grad_tilde_k, grad_tilde_v, grad_s, keys, queries, values, beta, gamma, p1, p2, p3, dones,
      saved, tick, r, eps, chunk=16, restart_index=None, tilde_k_r=None, tilde_v_r=None, s_r=None,
      tick_r=None):  # fmt: skip
    batch, steps, heads, dim = keys.shape
    eta = p1.shape[-1]
    sdt = saved.dtype
    grads = [keys.new_empty(batch, steps, heads, dim) for _ in range(5)]
    grads += [keys.new_empty(batch, steps, heads, eta) for _ in range(3)]
    grads += [
        keys.new_empty(batch, r, heads, eta * dim, dtype=sdt),
        keys.new_empty(batch, r, heads, dim, dtype=sdt),
        keys.new_empty(batch, heads, eta * dim, dtype=sdt),
    ]
    if restart_index is not None:
        grads += [x.new_empty(x.shape, dtype=sdt) for x in (tilde_k_r, tilde_v_r, s_r)]
    return grads


def _setup_context(ctx, inputs, output) -> None:
    (keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, _tv, _s, tick, eps, _save, chunk,
     index, tk_r, tv_r, s_r, tick_r) = inputs  # fmt: skip
    ctx.r = tilde_k.shape[1]
    ctx.eps = eps
    ctx.chunk = chunk  # the interval the checkpoints were taken at travels with them
    ctx.mark_non_differentiable(output[4])
    ctx.save_for_backward(keys, queries, values, beta, gamma, p1, p2, p3, dones, tick, output[4],
                          index, tk_r, tv_r, s_r, tick_r)  # fmt: skip


def _backward(ctx, grad_out, grad_tilde_k, grad_tilde_v, grad_s, _grad_saved):
    keys, queries, values, beta, gamma, p1, p2, p3, dones, tick, saved, index, tk_r, tv_r, s_r, tick_r = (
        ctx.saved_tensors
    )
    if grad_out is None:
        grad_out = torch.zeros_like(keys)
    grads = _recurrence_bwd(
        grad_out, grad_tilde_k, grad_tilde_v, grad_s,
        keys, queries, values, beta, gamma, p1, p2, p3, dones, saved, tick, ctx.r, ctx.eps, ctx.chunk,
        index, tk_r, tv_r, s_r, tick_r,
    )  # fmt: skip
    restart_grads = (None, None, None) if index is None else tuple(grads[11:14])
    # dones, tick, eps, save_checkpoints, chunk, the restart index and ticks are not differentiable.
    return (*grads[:8], None, *grads[8:11], None, None, None, None, None, *restart_grads, None)


_recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("agalite_triton::recurrence_into", mutates_args=("tk_out", "tv_out", "s_out"))
def _recurrence_into_op(
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
    slots: torch.Tensor | None = None,
    restart_index: torch.Tensor | None = None,
    tilde_k_r: torch.Tensor | None = None,
    tilde_v_r: torch.Tensor | None = None,
    s_r: torch.Tensor | None = None,
    tick_r: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference over T steps writing the final state straight into (tk_out, tv_out, s_out), which may
    be the state itself; with ``slots`` only rows ``slots`` of them."""
    return recurrence_forward(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, False, 1,
        restart=_restart_of(restart_index, tilde_k_r, tilde_v_r, s_r, tick_r), slots=slots,
        state_out=(tk_out, tv_out, s_out),
    )[0]  # fmt: skip


@_recurrence_into_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, tk_out, tv_out, s_out,
      slots=None, restart_index=None, tilde_k_r=None, tilde_v_r=None, s_r=None, tick_r=None):  # fmt: skip
    return keys.new_empty(keys.shape)


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
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    return step_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps,
                        in_place=False, state_out=(tk_out, tv_out, s_out), slots=slots)[0]  # fmt: skip


@_step_into_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, tk_out, tv_out, s_out,
      slots=None):  # fmt: skip
    return keys.new_empty(keys.shape)


def forward_chunk(keys: torch.Tensor, eta: int, r: int) -> int:
    """The checkpoint interval a forward at these sizes takes now (from the launch table)."""
    return dims_of(keys, eta, r).config("forward").chunk


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
    slots: torch.Tensor | None = None,
    restart: Restart | None = None,
) -> tuple[torch.Tensor, State]:
    """The kernel backend of ``agalite_recurrence``: same arguments (validated there), same results.

    Returns out (B, T, H, D) in the input dtype and the final (tilde_k, tilde_v, s) in the state dtype.
    Without gradients a T = 1 call takes the one-step kernel; otherwise the sequence kernels run,
    keeping backward checkpoints only when autograd will need them. ``final_out`` (inference only,
    buffers shaped like the state; they may be the state itself, since every program reads its whole
    (b, h) slice before writing it) receives and is returned as the final state: the kernels write
    straight into it when its last dimension has unit stride. ``slots`` (N,) (needs ``final_out``):
    projection row n steps state row ``slots[n]``, read and written through the index in-kernel.
    ``restart``: see ``agalite_recurrence``; gradients reach the restart memories.
    """
    differentiable = (keys, queries, values, beta, gamma, p1, p2, p3, tilde_k, tilde_v, s)
    if restart is not None:
        differentiable += tuple(restart[1:4])
    needs_grad = needs_grad_of(differentiable, final_out, slots)
    restart_args = (None,) * 5 if restart is None else tuple(restart)
    steps = keys.shape[1]
    if final_out is not None:
        if steps == 0:
            rows = slice(None) if slots is None else slots
            for dst, src in zip(final_out, (tilde_k, tilde_v, s)):
                dst[rows] = src[rows]
            return keys.new_empty(keys.shape), final_out

        def run(bufs):
            if steps == 1 and restart is None:
                return _step_into_op(
                    keys[:, 0], queries[:, 0], values[:, 0], beta[:, 0], gamma[:, 0], p1[:, 0], p2[:, 0], p3[:, 0],
                    None if dones is None else dones[:, 0], tilde_k, tilde_v, s, tick, eps, *bufs, slots,
                ).unsqueeze(1)  # fmt: skip
            return _recurrence_into_op(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s,
                                       tick, eps, *bufs, slots, *restart_args)  # fmt: skip

        return into_buffers(final_out, run)  # type: ignore[return-value]
    if steps == 1 and not needs_grad and restart is None:
        out, tk, tv, st = _step_op(
            keys[:, 0], queries[:, 0], values[:, 0], beta[:, 0], gamma[:, 0], p1[:, 0], p2[:, 0], p3[:, 0],
            None if dones is None else dones[:, 0], tilde_k, tilde_v, s, tick, eps,
        )  # fmt: skip
        return out.unsqueeze(1), (tk, tv, st)
    chunk = forward_chunk(keys, p1.shape[-1], tilde_k.shape[1])
    out, tk, tv, st, _saved = _recurrence_fwd(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps, needs_grad, chunk,
        *restart_args,
    )  # fmt: skip
    return out, (tk, tv, st)
