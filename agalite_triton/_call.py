"""What both models' functional entry points check and do before dispatching to an implementation:
``final_out``, ``slots`` and ``restart`` arguments, and the call with no steps."""

from __future__ import annotations

import torch

from ._validation import check_restart_args, check_slot_rows, check_tensor

__all__ = ["check_call_options", "no_steps"]


def check_call_options(
    state: tuple[torch.Tensor, ...],
    names: tuple[str, ...],
    batch: int,
    steps: int,
    device: torch.device,
    final_out: tuple[torch.Tensor, ...] | None,
    slots: torch.Tensor | None,
    restart: tuple[torch.Tensor, ...] | None,
    check_slots: bool | None,
    restart_tick: bool,
) -> None:
    """``state`` is the memory (named ``names``); ``restart_tick``: the restart tuple ends with a tick."""
    check_values = device.type == "cpu" if check_slots is None else bool(check_slots)
    if final_out is not None:
        if torch.is_grad_enabled():
            raise RuntimeError("final_out: only for inference; call under torch.no_grad() or torch.inference_mode()")
        if not isinstance(final_out, tuple) or len(final_out) != len(state):
            raise TypeError(f"final_out: expected a tuple ({', '.join(names)}), got {type(final_out).__name__}")
        for name, buf, like in zip(names, final_out, state):
            check_tensor(f"final_out.{name}", buf, shape=tuple(like.shape), dtype=like.dtype, device=device)
    if slots is not None:
        if restart is not None:
            raise ValueError("slots and restart: expected at most one of them, got both")
        if final_out is None:
            raise ValueError("slots: needs final_out (the state to step in place, or another of its size), got None")
        check_slot_rows(slots, batch, state[0].shape[0], device, check_values)
    if restart is not None:
        check_restart_args(restart, batch, steps, state, names, device, check_values, with_tick=restart_tick)


def no_steps(
    keys: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    final_out: tuple[torch.Tensor, ...] | None,
    slots: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A call of T = 0: an empty read-out and the incoming state (its ``slots`` rows), copied so that
    callers may mutate it."""
    batch, _, heads, dim = keys.shape
    out = keys.new_empty(batch, 0, heads, dim)
    if final_out is None:
        return out, tuple(t.clone() for t in state)
    for dst, src in zip(final_out, state):
        if slots is None:
            dst.copy_(src)
        else:
            dst.index_copy_(0, slots, src.index_select(0, slots))
    return out, final_out
