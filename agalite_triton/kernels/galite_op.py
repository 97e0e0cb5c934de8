"""The GaLiTe kernels as torch.library custom ops with fake implementations and autograd, and
``triton_galite_recurrence``, the entry point ``galite_recurrence`` dispatches to.

Registered as AGaLiTe's (``recurrence_op.py`` says why custom ops): torch.compile traces a model through
the recurrence as one opaque node, AOTAutograd uses the registered backward, and no autocast rule is
registered, so the ops run on the projections' dtype and return it (memory in fp32).
"""

from __future__ import annotations

import torch

from .galite_backward import galite_backward
from .galite_forward import galite_forward, galite_saved_length
from .galite_step import galite_step_forward
from .launch import galite_dims_of, into_buffers, needs_grad_of

__all__ = ["galite_forward_chunk", "triton_galite_recurrence"]

Memory = tuple[torch.Tensor, torch.Tensor]
Restart = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _restart_of(index, c_r, s_r) -> Restart | None:
    return None if index is None else (index, c_r, s_r)


@torch.library.custom_op("agalite_triton::galite_fwd", mutates_args=())
def _galite_fwd(
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
    eps: float,
    save_checkpoints: bool,
    chunk: int = 16,
    restart_index: torch.Tensor | None = None,
    c_r: torch.Tensor | None = None,
    s_r: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return galite_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, save_checkpoints, chunk,
                          restart=_restart_of(restart_index, c_r, s_r))  # fmt: skip


@_galite_fwd.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, save_checkpoints, chunk=16,
      restart_index=None, c_r=None, s_r=None):  # fmt: skip
    batch, _, heads, _ = keys.shape
    if save_checkpoints:
        saved = c.new_empty(batch * heads, galite_saved_length(galite_dims_of(keys, p1.shape[-1]), chunk))
    else:
        saved = c.new_empty(0)
    return keys.new_empty(keys.shape), c.new_empty(c.shape), s.new_empty(s.shape), saved


@torch.library.custom_op("agalite_triton::galite_bwd", mutates_args=())
def _galite_bwd(
    grad_out: torch.Tensor,
    grad_c: torch.Tensor | None,
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
    eps: float,
    chunk: int = 16,
    restart_index: torch.Tensor | None = None,
    c_r: torch.Tensor | None = None,
    s_r: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    return galite_backward(grad_out, grad_c, grad_s, keys, queries, values, beta, gamma, p1, p2, p3, dones, saved,
                           eps, chunk, restart=_restart_of(restart_index, c_r, s_r))  # fmt: skip


@_galite_bwd.register_fake
def _(grad_out, grad_c, grad_s, keys, queries, values, beta, gamma, p1, p2, p3, dones, saved, eps, chunk=16,
      restart_index=None, c_r=None, s_r=None):  # fmt: skip
    batch, steps, heads, dim = keys.shape
    nu = p1.shape[-1]
    sdt = saved.dtype
    grads = [keys.new_empty(batch, steps, heads, dim) for _ in range(5)]
    grads += [keys.new_empty(batch, steps, heads, nu) for _ in range(3)]
    grads += [keys.new_empty(batch, heads, dim, nu * dim, dtype=sdt), keys.new_empty(batch, heads, nu * dim, dtype=sdt)]
    if restart_index is not None:
        grads += [x.new_empty(x.shape, dtype=sdt) for x in (c_r, s_r)]
    return grads


def _setup_context(ctx, inputs, output) -> None:
    keys, queries, values, beta, gamma, p1, p2, p3, dones, _c, _s, eps, _save, chunk, index, c_r, s_r = inputs
    ctx.eps = eps
    ctx.chunk = chunk  # the interval the checkpoints were taken at travels with them
    ctx.mark_non_differentiable(output[3])
    ctx.save_for_backward(keys, queries, values, beta, gamma, p1, p2, p3, dones, output[3], index, c_r, s_r)


def _backward(ctx, grad_out, grad_c, grad_s, _grad_saved):
    keys, queries, values, beta, gamma, p1, p2, p3, dones, saved, index, c_r, s_r = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(keys)
    grads = _galite_bwd(grad_out, grad_c, grad_s, keys, queries, values, beta, gamma, p1, p2, p3, dones, saved,
                        ctx.eps, ctx.chunk, index, c_r, s_r)  # fmt: skip
    restart_grads = (None, None) if index is None else tuple(grads[10:12])
    # dones, eps, save_checkpoints, chunk and the restart index are not differentiable.
    return (*grads[:8], None, *grads[8:10], None, None, None, None, *restart_grads)


_galite_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("agalite_triton::galite_into", mutates_args=("c_out", "s_out"))
def _galite_into_op(
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
    eps: float,
    c_out: torch.Tensor,
    s_out: torch.Tensor,
    slots: torch.Tensor | None = None,
    restart_index: torch.Tensor | None = None,
    c_r: torch.Tensor | None = None,
    s_r: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference over T steps writing the final memory straight into (c_out, s_out), which may be the
    memory itself; with ``slots`` only rows ``slots`` of them."""
    return galite_forward(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, False, 1,
        restart=_restart_of(restart_index, c_r, s_r), slots=slots, state_out=(c_out, s_out),
    )[0]  # fmt: skip


@_galite_into_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, c_out, s_out, slots=None,
      restart_index=None, c_r=None, s_r=None):  # fmt: skip
    return keys.new_empty(keys.shape)


@torch.library.custom_op("agalite_triton::galite_step", mutates_args=())
def _galite_step_op(
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
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return galite_step_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, in_place=False)


@_galite_step_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps):
    return keys.new_empty(keys.shape), c.new_empty(c.shape), s.new_empty(s.shape)


@torch.library.custom_op("agalite_triton::galite_step_into", mutates_args=("c_out", "s_out"))
def _galite_step_into_op(
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
    eps: float,
    c_out: torch.Tensor,
    s_out: torch.Tensor,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    return galite_step_forward(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, in_place=False,
                               state_out=(c_out, s_out), slots=slots)[0]  # fmt: skip


@_galite_step_into_op.register_fake
def _(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, c_out, s_out, slots=None):
    return keys.new_empty(keys.shape)


def galite_forward_chunk(keys: torch.Tensor, nu: int) -> int:
    """The checkpoint interval a forward at these sizes takes now (from the launch table)."""
    return galite_dims_of(keys, nu).config("galite_forward").chunk


def triton_galite_recurrence(
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
    slots: torch.Tensor | None = None,
    restart: Restart | None = None,
) -> tuple[torch.Tensor, Memory]:
    """The kernel backend of ``galite_recurrence``: same arguments (validated there, T >= 1), same results.

    Without gradients a T = 1 call takes the one-step kernel (with ``restart``, the forward kernel
    without checkpoints, which reads the restart rows through the index); otherwise the sequence kernels run,
    keeping backward checkpoints only when autograd will need them. ``final_out`` (inference only)
    receives and is returned as the final memory, written straight into it where its last dimension has
    unit stride; with ``slots`` the kernels read and write memory rows ``slots`` through the index.
    """
    differentiable = (keys, queries, values, beta, gamma, p1, p2, p3, c, s)
    if restart is not None:
        differentiable += tuple(restart[1:3])
    needs_grad = needs_grad_of(differentiable, final_out, slots)
    restart_args = (None,) * 3 if restart is None else tuple(restart)
    steps = keys.shape[1]
    step_args = [x[:, 0] for x in (keys, queries, values, beta, gamma, p1, p2, p3)]
    step_dones = None if dones is None else dones[:, 0]
    if final_out is not None:

        def run(bufs):
            if steps == 1 and restart is None:
                return _galite_step_into_op(*step_args, step_dones, c, s, eps, *bufs, slots).unsqueeze(1)
            return _galite_into_op(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps, *bufs, slots,
                                   *restart_args)  # fmt: skip

        return into_buffers(final_out, run)  # type: ignore[return-value]
    if steps == 1 and not needs_grad and restart is None:
        out, c_new, s_new = _galite_step_op(*step_args, step_dones, c, s, eps)
        return out.unsqueeze(1), (c_new, s_new)
    chunk = galite_forward_chunk(keys, p1.shape[-1])
    out, c_new, s_new, _saved = _galite_fwd(keys, queries, values, beta, gamma, p1, p2, p3, dones, c, s, eps,
                                            needs_grad, chunk, *restart_args)  # fmt: skip
    return out, (c_new, s_new)
