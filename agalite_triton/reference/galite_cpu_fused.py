"""GaLiTe's fused CPU recurrence: ``galite_cpu_fused.cpp`` built at first use and called through ctypes.

The eager reference scans (B, T, H, D, K) temporaries: several passes over D x K values per head and step.
The fused form walks each (environment, head) once per call, keeping its (D, K) memory in L1/L2 across the
steps, for inference (any T, in place, with ``slots``, with ``restart``) and for training (an autograd
Function whose backward recomputes each chunk of steps from its checkpoint and walks it backwards). Same
maths as the reference; the rounding differences are listed in the C++ source. Built, cached and switched
(``AGALITE_CPU_FUSED``, ``forced``) as AGaLiTe's ``cpu_fused``, by ``cpp_library``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .cpp_library import CppLibrary
from .cpu_fused import HEADER, _addr, _chunk, _flat_strides, _layout, _proj_ready, _row_major_inner

__all__ = ["build_info", "fresh_build_seconds", "galite_fused_recurrence", "usable"]

SOURCE = Path(__file__).with_name("galite_cpu_fused.cpp")
ABI_VERSION = 2

Memory = tuple[torch.Tensor, torch.Tensor]


class _Args(ctypes.Structure):
    # Mirrors ``struct Args`` in galite_cpu_fused.cpp field for field.
    _fields_ = [
        ("proj", ctypes.c_void_p * 8),
        ("proj_stride", ctypes.c_int64 * 24),  # [8][3] in C, flat here
        ("dones", ctypes.c_void_p),
        ("dones_stride", ctypes.c_int64 * 2),
        ("dones_bool", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("state_in", ctypes.c_void_p * 2),
        ("state_in_stride", ctypes.c_int64 * 2),
        ("state_out", ctypes.c_void_p * 2),
        ("state_out_stride", ctypes.c_int64 * 2),
        ("out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64 * 3),
        ("ckpt", ctypes.c_void_p),
        ("chunk", ctypes.c_int64),
        ("readout", ctypes.c_void_p),
        ("grad_out", ctypes.c_void_p),
        ("grad_final", ctypes.c_void_p * 2),
        ("grad_proj", ctypes.c_void_p * 8),
        ("grad_proj_stride", ctypes.c_int64 * 24),
        ("grad_state", ctypes.c_void_p * 2),
        ("restart_index", ctypes.c_void_p),
        ("restart_state", ctypes.c_void_p * 2),
        ("restart_state_stride", ctypes.c_int64 * 2),
        ("grad_restart", ctypes.c_void_p * 2),
        ("n", ctypes.c_int64),
        ("t", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("d", ctypes.c_int64),
        ("nu", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("threads", ctypes.c_int64),
    ]


_library = CppLibrary(
    SOURCE, "galite_abi_version", ABI_VERSION,
    ("galite_forward_f32", "galite_forward_f64", "galite_backward_f32", "galite_backward_f64"), _Args,
    headers=(HEADER,),
)  # fmt: skip
build_info = _library.build_info
fresh_build_seconds = _library.fresh_build_seconds
_reset_for_tests = _library.reset_for_tests


usable = _library.usable


def _call(kind: str, compute: torch.dtype, a: _Args) -> None:
    suffix = "f64" if compute == torch.float64 else "f32"
    _library.call(f"galite_{kind}_{suffix}", a, f"galite_cpu_fused_{kind}")


def _set_memory(a: _Args, field: str, tensors: tuple[torch.Tensor, ...]) -> None:
    ptrs, strides = getattr(a, field), getattr(a, field + "_stride")
    for i, x in enumerate(tensors):
        ptrs[i], strides[i] = x.data_ptr(), x.stride(0)


def _forward_args(
    proj: list[torch.Tensor],
    dones: torch.Tensor | None,
    eps: float,
    memory_in: Memory,
    memory_out: Memory,
    out: torch.Tensor,
    index: torch.Tensor | None,
    memories: Memory | tuple[()],
) -> _Args:
    """The arguments every call shares (no checkpoints: ``chunk`` 1; restarts where ``index`` is given)."""
    a = _Args()
    a.proj[:] = [p.data_ptr() for p in proj]
    a.proj_stride[:] = _flat_strides(_layout(proj))
    if dones is not None:
        a.dones = dones.data_ptr()
        a.dones_stride[:] = dones.stride()
        a.dones_bool = dones.dtype == torch.bool
    _set_memory(a, "state_in", memory_in)
    _set_memory(a, "state_out", memory_out)
    a.out = out.data_ptr()
    a.out_stride[:] = out.stride()[:3]
    a.chunk = 1
    if index is not None:
        a.restart_index = index.data_ptr()
        _set_memory(a, "restart_state", memories)  # type: ignore[arg-type]
    batch, steps, heads, dim = proj[0].shape
    a.n, a.t, a.h, a.d, a.nu = batch, steps, heads, dim, proj[5].shape[-1]
    a.eps = eps
    a.threads = torch.get_num_threads()
    return a


def galite_fused_recurrence(
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
    restart: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Memory]:
    """The GaLiTe reference recurrence, fused; arguments validated by the caller (see ``galite_recurrence``)
    and ``usable`` checked. ``slots`` (with ``final_out``): projection row n steps memory row ``slots[n]``
    in place through the index. ``restart``: where ``index[b, t] = m >= 0`` step t starts from restart
    row m instead of the carried memory; gradients reach the restart memories and stop there."""
    out_dtype = keys.dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    proj = [_proj_ready(x, compute) for x in (keys, queries, values, beta, gamma, p1, p2, p3)]
    # Bool dones are read as bytes; floating ones in the compute dtype (1 - done, as the reference).
    dones_c = dones if dones is None or dones.dtype == torch.bool else dones.to(compute)
    memory_in = tuple(
        (x if x.dtype == compute else x.to(compute)) if _row_major_inner(x) else x.to(compute).contiguous()
        for x in (c, s)
    )
    index = None
    memories: Memory | tuple[()] = ()
    if restart is not None:
        index = restart[0].contiguous()
        memories = tuple(x.to(compute) if _row_major_inner(x) else x.to(compute).contiguous() for x in restart[1:])
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*proj, *memory_in, *memories)):
        out, *final = _GaLiTeFused.apply(eps, dones_c, index, *proj, *memory_in, *memories)
        return out.to(out_dtype), tuple(final)

    if final_out is not None:
        dest = tuple(
            x if _row_major_inner(x) else torch.empty_like(x, memory_format=torch.contiguous_format) for x in final_out
        )
    else:
        dest = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in memory_in)
    batch, steps, heads, dim = keys.shape
    out = torch.empty(batch, steps, heads, dim, dtype=compute)
    a = _forward_args(proj, dones_c, eps, memory_in, dest, out, index, memories)  # type: ignore[arg-type]
    if slots is not None:
        slots = slots.contiguous()
        a.slots = slots.data_ptr()
    _call("forward", compute, a)
    if final_out is not None:
        for want, got in zip(final_out, dest):
            if want is not got:
                want.copy_(got)
        dest = final_out
    return out.to(out_dtype), dest  # type: ignore[return-value]


class _GaLiTeFused(torch.autograd.Function):
    """Forward stores the memory at the start of every chunk of steps, and each step's read-out dots (the
    size of the output); backward recomputes each chunk's memories from its checkpoint (in a per-thread
    buffer) and walks it backwards: nothing of size (B, T) x memory is saved.
    With restarts (``index`` not None) the two restart memories follow the memory and receive gradients."""

    @staticmethod
    def forward(ctx, eps, dones, index, *tensors):
        proj, memory_in, memories = tensors[:8], tensors[8:10], tensors[10:]
        batch, steps, heads, dim = proj[0].shape
        compute = proj[0].dtype
        width = dim * proj[5].shape[-1] * (dim + 1)
        chunk = _chunk(steps, width, compute.itemsize)
        ckpt = torch.empty(batch, -(-steps // chunk), heads, width, dtype=compute)
        dest = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in memory_in)
        out = torch.empty(batch, steps, heads, dim, dtype=compute)
        a = _forward_args(list(proj), dones, eps, memory_in, dest, out, index, memories)
        # Each step's <C_j, Q> and <s, Q> + eps: the backward reads them instead of recomputing the dots.
        readout = torch.empty(batch, steps, heads, dim + 1, dtype=compute)
        a.ckpt, a.chunk, a.readout = ckpt.data_ptr(), chunk, readout.data_ptr()
        _call("forward", compute, a)
        ctx.eps, ctx.chunk = eps, chunk
        ctx.has_dones, ctx.has_restart = dones is not None, index is not None
        extra = (() if dones is None else (dones,)) + (() if index is None else (index, *memories))
        ctx.save_for_backward(ckpt, readout, *proj, *memory_in, *extra)
        return out, *dest

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_c, grad_s):
        ckpt, readout, *rest = ctx.saved_tensors
        proj, memory_in, rest = rest[:8], rest[8:10], rest[10:]
        dones = rest.pop(0) if ctx.has_dones else None
        index, memories = (rest[0], tuple(rest[1:])) if ctx.has_restart else (None, ())
        compute = proj[0].dtype
        batch, steps, heads, dim = proj[0].shape
        grad_out = torch.zeros(batch, steps, heads, dim, dtype=compute) if grad_out is None else grad_out
        grad_out = grad_out.to(compute).contiguous()
        finals = [None if g is None else g.to(compute).contiguous() for g in (grad_c, grad_s)]
        a = _forward_args(list(proj), dones, ctx.eps, memory_in, memory_in, grad_out, index, memories)
        grads = [torch.empty(p.shape, dtype=compute) for p in proj]
        a.grad_proj[:] = [g.data_ptr() for g in grads]
        a.grad_proj_stride[:] = _flat_strides(_layout(grads))
        a.ckpt, a.chunk, a.readout = ckpt.data_ptr(), ctx.chunk, readout.data_ptr()
        a.grad_out = grad_out.data_ptr()
        for i, g in enumerate(finals):
            a.grad_final[i] = _addr(g)
        grad_memory = tuple(torch.empty((batch, *x.shape[1:]), dtype=compute) for x in memory_in)
        for i, g in enumerate(grad_memory):
            a.grad_state[i] = g.data_ptr()
        grad_memories = tuple(torch.zeros(x.shape, dtype=compute) for x in memories)
        for i, g in enumerate(grad_memories):
            a.grad_restart[i] = g.data_ptr()
        _call("backward", compute, a)
        every = [*grads, *grad_memory, *grad_memories]
        return (None,) * 3 + tuple(g if need else None for g, need in zip(every, ctx.needs_input_grad[3:]))
