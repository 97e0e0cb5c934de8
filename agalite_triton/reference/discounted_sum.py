"""The discounted sum ``h_t = a_t * h_{t-1} + x_t`` over time, with a hand-written backward.

This is the scan the original runs with ``jax.lax.associative_scan``. On CPU a time loop of one fused
``addcmul`` per step over a (B, *S) slice touches every element exactly once, which beats a log-depth
scan (log2 T passes over the whole (B, T, *S) tensor) and needs no ``log`` of the decays, so decays of
exactly 0 (done-resets, saturated gates) are handled exactly. Recording the loop with autograd would
cost one graph node per step and per input; the custom backward instead runs the same loop in reverse
and forms the decay gradient in one vectorised product.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["discounted_sum"]


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class _DiscountedSum(torch.autograd.Function):
    # States live time-major, (T, B, *S), so that every step writes one contiguous slice: cheaper, and
    # the only ``out=`` form that torch.compile traces without a graph break.
    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        steps = x.shape[1]
        states = x.new_empty((steps, *x.shape[:1], *x.shape[2:])) if out is None else out
        prev = h0
        for t in range(steps):
            prev = torch.addcmul(x[:, t], a[:, t], prev, out=states[t])
        ctx.save_for_backward(a, h0, states)
        return states.transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states: torch.Tensor):
        a, h0, states = ctx.saved_tensors
        steps = states.shape[0]
        # g~_t = g_t + a_{t+1} g~_{t+1}: the gradient reaching h_t from every later step.
        acc = torch.empty_like(states)
        nxt = acc[steps - 1]
        nxt.copy_(grad_states[:, steps - 1])
        for t in range(steps - 2, -1, -1):
            nxt = torch.addcmul(grad_states[:, t], a[:, t + 1], nxt, out=acc[t])
        grad_x = acc.transpose(0, 1)
        grad_a = grad_h0 = None
        if ctx.needs_input_grad[1]:
            # d a_t = g~_t * h_{t-1}, written in two pieces rather than concatenating h0 with the states.
            prod = torch.empty_like(acc)
            torch.mul(acc[1:], states[:-1], out=prod[1:])
            torch.mul(acc[0], h0, out=prod[0])
            grad_a = _reduce_to(prod.transpose(0, 1), a.shape)
        if ctx.needs_input_grad[2]:
            grad_h0 = _reduce_to(a[:, 0] * acc[0], h0.shape)
        return grad_x, grad_a, grad_h0, None


def discounted_sum(
    x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + x_t`` for t = 0..T-1.

    x: (B, T, *S); a: (B, T, *S') broadcastable to x; h0: (B, *S). Returns (B, T, *S), the state after
    every step (the final state is ``[:, -1]``), a view of a time-major (T, B, *S) buffer. All three
    must share one floating dtype. ``out``, a (T, B, *S) buffer to write the states into, is for
    inference only (no autograd through it).
    """
    if out is not None and torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or h0.requires_grad):
        raise RuntimeError("out: a preallocated output cannot be used while gradients are recorded")
    return _DiscountedSum.apply(x, a, h0, out)
