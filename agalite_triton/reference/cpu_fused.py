"""The fused CPU recurrence: ``cpu_fused.cpp`` built at first use and called through ctypes.

The eager reference makes a dozen passes over (B, T, R, H, E) temporaries per layer and call. The
fused form walks each (environment, head) once per call, keeping its few KiB of state in L1 across the
steps, for inference (any T, in place, with ``slots``, with ``restart``) and for training (an autograd
Function whose backward recomputes the states from a checkpoint per chunk of steps and walks them
backwards). Same maths as the reference; the rounding differences are listed in the C++ source.

Why a small C++ library and not Inductor or a torch extension (bench/NOTES.md has the measurements): it
needs no torch headers, so it builds in 4-12 s on two cores, once per machine, and loads in milliseconds
in every later process; it has no shape specialisation (nothing is recompiled per batch size, step count
or tick; Inductor recompiles per batch size unless dynamic, and its dynamic code was slower than eager
here); and its OpenMP runtime is the one torch already loaded (same soname), so its threads are torch's.

Switches (``cpp_library``, shared with GaLiTe's ``galite_cpu_fused``): ``AGALITE_CPU_FUSED=0`` (read at
every call) turns it off; ``AGALITE_CPU_CACHE`` sets the
build directory (default ``$XDG_CACHE_HOME/agalite_triton`` or ``~/.cache/agalite_triton``); ``CXX``
picks the compiler (default ``c++``, then ``g++``). Where no compiler works it warns once and every call
takes the eager reference.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from ..oscillator import oscillator_period, oscillator_table, step_residues
from .cpp_library import CppLibrary, FusedUnavailableWarning, enabled, forced

__all__ = [
    "FusedUnavailableWarning",
    "build_info",
    "enabled",
    "forced",
    "fresh_build_seconds",
    "fused_recurrence",
    "usable",
]

SOURCE = Path(__file__).with_name("cpu_fused.cpp")
HEADER = Path(__file__).with_name("cpu_fused_common.h")  # what it shares with galite_cpu_fused.cpp
ABI_VERSION = 4
# The backward recomputes a chunk of steps into a buffer of this size per thread (it should stay in L2).
BACKWARD_BUFFER_BYTES = 512 * 1024

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Args(ctypes.Structure):
    # Mirrors ``struct Args`` in cpu_fused.cpp field for field.
    _fields_ = [
        ("proj", ctypes.c_void_p * 8),
        ("proj_stride", ctypes.c_int64 * 24),  # [8][3] in C, flat here: one slice assignment fills it
        ("dones", ctypes.c_void_p),
        ("dones_stride", ctypes.c_int64 * 2),
        ("dones_bool", ctypes.c_int64),
        ("tick", ctypes.c_void_p),
        ("tick_stride", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("period", ctypes.c_int64),
        ("state_in", ctypes.c_void_p * 3),
        ("state_in_stride", ctypes.c_int64 * 3),
        ("state_out", ctypes.c_void_p * 3),
        ("state_out_stride", ctypes.c_int64 * 3),
        ("out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64 * 3),
        ("ckpt", ctypes.c_void_p),
        ("chunk", ctypes.c_int64),
        ("grad_out", ctypes.c_void_p),
        ("grad_final", ctypes.c_void_p * 3),
        ("grad_proj", ctypes.c_void_p * 8),
        ("grad_proj_stride", ctypes.c_int64 * 24),
        ("grad_state", ctypes.c_void_p * 3),
        ("restart_index", ctypes.c_void_p),
        ("residues", ctypes.c_void_p),
        ("restart_state", ctypes.c_void_p * 3),
        ("restart_state_stride", ctypes.c_int64 * 3),
        ("grad_restart", ctypes.c_void_p * 3),
        ("n", ctypes.c_int64),
        ("t", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("d", ctypes.c_int64),
        ("eta", ctypes.c_int64),
        ("r", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("threads", ctypes.c_int64),
    ]


# ---------------------------------------------------------------------------------- building, dispatch
_library = CppLibrary(
    SOURCE, "agalite_abi_version", ABI_VERSION,
    ("agalite_forward_f32", "agalite_forward_f64", "agalite_backward_f32", "agalite_backward_f64"), _Args,
    headers=(HEADER,),
)  # fmt: skip
build_info = _library.build_info
fresh_build_seconds = _library.fresh_build_seconds
_reset_for_tests = _library.reset_for_tests


usable = _library.usable


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _row_major_inner(t: torch.Tensor) -> bool:
    """Every dim after the first is contiguous (the batch stride is free)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _proj_ready(t: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    if t.dtype != compute:
        t = t.to(compute)
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# Where each projection lies: (element offset from a base pointer, (n, t, h) strides, last-dim size).
Layout = list[tuple[int, tuple[int, int, int], int]]


def _layout(proj: list[torch.Tensor], base: torch.Tensor | None = None) -> Layout:
    ref = 0 if base is None else base.storage_offset()
    return [(p.storage_offset() - ref if base is not None else 0, tuple(p.stride()[:3]), p.shape[-1]) for p in proj]


def _attention_base(proj: list[torch.Tensor]) -> torch.Tensor | None:
    """The (B, T, 5 H D + 3 H eta) tensor of which the eight projections are the attention layer's views
    (``AGaLiTeAttention``: keys..gamma interleaved per head, then p1..p3), or None.

    Training through it lets the backward write one gradient for the whole projection, instead of eight
    that autograd then stacks, pads and adds back together (a few passes over it per layer)."""
    base = proj[0]._base
    if base is None or base.dim() != 3 or not base.is_contiguous():
        return None
    batch, steps, heads, dim = proj[0].shape
    eta = proj[5].shape[-1]
    width = 5 * heads * dim + 3 * heads * eta
    if tuple(base.shape) != (batch, steps, width) or base.dtype != proj[0].dtype:
        return None
    origin = base.storage_offset()
    for i, p in enumerate(proj):
        if i < 5:
            offset, stride = i * dim, (steps * width, width, 5 * dim, 1)
        else:
            offset, stride = 5 * heads * dim + (i - 5) * eta, (steps * width, width, 3 * eta, 1)
        if p._base is not base or p.storage_offset() - origin != offset or tuple(p.stride()) != stride:
            return None
    return base


def _fill_common(
    a: _Args,
    ptrs: list[int],
    strides: list[int],
    sizes: tuple[int, int, int, int, int, int],
    dones: torch.Tensor | None,
    tick: torch.Tensor,
    eps: float,
) -> None:
    """``ptrs``: the eight projections' addresses; ``strides``: their (n, t, h) strides, flat (24,)."""
    a.proj[:] = ptrs
    a.proj_stride[:] = strides
    if dones is not None:
        a.dones = dones.data_ptr()
        a.dones_stride[:] = dones.stride()
        a.dones_bool = dones.dtype == torch.bool
    a.tick, a.tick_stride = tick.data_ptr(), tick.stride(0)
    r = sizes[5]
    a.table, a.period = oscillator_table(r).data_ptr(), oscillator_period(r)
    a.n, a.t, a.h, a.d, a.eta, a.r = sizes
    a.eps = eps
    a.threads = torch.get_num_threads()


def _flat_strides(layout: Layout) -> list[int]:
    return [s for _, stride, _ in layout for s in stride]


def _offset_ptrs(base: int, layout: Layout, itemsize: int) -> list[int]:
    return [base + offset * itemsize for offset, _, _ in layout]


def _set_state(a: _Args, field: str, tensors: State) -> None:
    ptrs, strides = getattr(a, field), getattr(a, field + "_stride")
    for i, x in enumerate(tensors):
        ptrs[i], strides[i] = x.data_ptr(), x.stride(0)


def _call(kind: str, compute: torch.dtype, a: _Args) -> None:
    suffix = "f64" if compute == torch.float64 else "f32"
    _library.call(f"agalite_{kind}_{suffix}", a, f"cpu_fused_{kind}")


def _chunk(steps: int, width: int, itemsize: int) -> int:
    return max(1, min(steps, BACKWARD_BUFFER_BYTES // (width * itemsize) - 1))


Restart = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _restart_ready(restart: Restart, tick: torch.Tensor, steps: int, r: int, compute: torch.dtype) -> tuple:
    """(index, residues) as contiguous int64 (B, T), and the three restart memories, row-major inside."""
    index, tk_r, tv_r, s_r, tick_r = restart
    residues = step_residues(tick, steps, r, index, tick_r).contiguous()
    memories = tuple(
        (x if x.dtype == compute else x.to(compute)) if _row_major_inner(x) else x.to(compute).contiguous()
        for x in (tk_r, tv_r, s_r)
    )
    return index.contiguous(), residues, memories


def _set_restart(a: _Args, index: torch.Tensor, residues: torch.Tensor, memories: State) -> None:
    a.restart_index, a.residues = index.data_ptr(), residues.data_ptr()
    _set_state(a, "restart_state", memories)


def _forward_args(
    ptrs: list[int],
    strides: list[int],
    sizes: tuple[int, int, int, int, int, int],
    dones: torch.Tensor | None,
    tick: torch.Tensor,
    eps: float,
    state_in: State,
    state_out: State,
    out: torch.Tensor,
    index: torch.Tensor | None,
    residues: torch.Tensor | None,
    memories: State | tuple[()],
) -> _Args:
    """The arguments of a forward call (no checkpoints: ``chunk`` 1; restarts where ``index`` is given)."""
    a = _Args()
    _fill_common(a, ptrs, strides, sizes, dones, tick, eps)
    _set_state(a, "state_in", state_in)
    _set_state(a, "state_out", state_out)
    a.out = out.data_ptr()
    a.out_stride[:] = out.stride()[:3]
    a.chunk = 1
    if index is not None:
        assert residues is not None and len(memories) == 3
        _set_restart(a, index, residues, memories)
    return a


def fused_recurrence(
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
    """The reference recurrence, fused; arguments validated by the caller (see ``agalite_recurrence``)
    and ``usable`` checked. ``slots`` (with ``final_out``): projection row n steps state row ``slots[n]``,
    read and written in place through the index (no gather or scatter copy). ``restart``: where
    ``index[b, t] = m >= 0``, step t starts from restart row m (memory and tick) instead of the carried
    memory; gradients reach the restart memories and stop there."""
    out_dtype = keys.dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    proj = [_proj_ready(x, compute) for x in (keys, queries, values, beta, gamma, p1, p2, p3)]
    # Bool dones are read as bytes; floating ones in the compute dtype (1 - done, as the reference).
    dones_c = dones if dones is None or dones.dtype == torch.bool else dones.to(compute)
    batch, steps, heads, dim = keys.shape
    sizes = (batch, steps, heads, dim, p1.shape[-1], tilde_k.shape[1])
    state_in = tuple(x if _row_major_inner(x) else x.contiguous() for x in (tilde_k, tilde_v, s))
    index = residues = None
    memories: State | tuple[()] = ()
    if restart is not None:
        index, residues, memories = _restart_ready(restart, tick, steps, sizes[5], compute)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*proj, *state_in, *memories)):
        base = _attention_base(proj)
        if base is not None:
            inputs, layout = (base,), _layout(proj, base)
        else:
            inputs, layout = tuple(proj), _layout(proj)
        out, *final = _FusedRecurrence.apply(
            eps, dones_c, tick, index, residues, sizes, layout, len(inputs), *inputs, *state_in, *memories
        )
        return out.to(out_dtype), tuple(final)

    if final_out is not None:
        dest = tuple(
            x if _row_major_inner(x) else torch.empty_like(x, memory_format=torch.contiguous_format) for x in final_out
        )
    else:
        dest = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in state_in)
    out = torch.empty(batch, steps, heads, dim, dtype=compute)
    a = _forward_args([p.data_ptr() for p in proj], _flat_strides(_layout(proj)), sizes, dones_c, tick, eps,
                      state_in, dest, out, index, residues, memories)  # fmt: skip
    if slots is not None:
        slots = slots.contiguous()
        a.slots = slots.data_ptr()
    _call("forward", compute, a)
    if final_out is not None:
        for want, got in zip(final_out, dest):
            if want is not got:
                want.copy_(got)
        dest = final_out
    return out.to(out_dtype), dest


class _FusedRecurrence(torch.autograd.Function):
    """Forward stores the state at the start of every chunk of steps; backward recomputes each chunk
    from it (in a per-thread buffer) and walks it backwards: nothing of size (B, T) x state is saved.

    The projections come either as the eight tensors or as the one tensor they are views of (with
    ``layout``, their offsets and strides in it); the gradients come back the same way. With restarts
    (``index`` not None) the three restart memories follow the state and receive gradients too."""

    @staticmethod
    def forward(ctx, eps, dones, tick, index, residues, sizes, layout, n_inputs, *tensors):
        inputs, state_in, memories = tensors[:n_inputs], tensors[n_inputs : n_inputs + 3], tensors[n_inputs + 3 :]
        batch, steps, heads, dim, eta, r = sizes
        compute = inputs[0].dtype
        ptrs = (
            _offset_ptrs(inputs[0].data_ptr(), layout, compute.itemsize)
            if n_inputs == 1
            else [x.data_ptr() for x in inputs]
        )
        width = r * eta * dim + r * dim + eta * dim
        chunk = _chunk(steps, width, compute.itemsize)
        ckpt = torch.empty(batch, -(-steps // chunk), heads, width, dtype=compute)
        dest = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in state_in)
        out = torch.empty(batch, steps, heads, dim, dtype=compute)
        a = _forward_args(ptrs, _flat_strides(layout), sizes, dones, tick, eps, state_in, dest, out, index, residues,
                          memories)  # fmt: skip
        a.ckpt, a.chunk = ckpt.data_ptr(), chunk
        _call("forward", compute, a)
        ctx.eps, ctx.chunk, ctx.sizes, ctx.layout, ctx.n_inputs = eps, chunk, sizes, layout, n_inputs
        ctx.has_dones, ctx.has_restart = dones is not None, index is not None
        extra = (() if dones is None else (dones,)) + (() if index is None else (index, residues, *memories))
        ctx.save_for_backward(tick, ckpt, *inputs, *extra)
        return out, *dest

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_k, grad_v, grad_s):
        tick, ckpt, *rest = ctx.saved_tensors
        inputs, rest = rest[: ctx.n_inputs], rest[ctx.n_inputs :]
        dones = rest.pop(0) if ctx.has_dones else None
        batch, steps, heads, dim, eta, r = ctx.sizes
        compute = inputs[0].dtype
        a = _Args()
        size = compute.itemsize
        if ctx.n_inputs == 1:
            ptrs = _offset_ptrs(inputs[0].data_ptr(), ctx.layout, size)
            grads = [torch.empty_like(inputs[0])]
            grad_layout, grad_ptrs = ctx.layout, _offset_ptrs(grads[0].data_ptr(), ctx.layout, size)
        else:
            ptrs = [x.data_ptr() for x in inputs]
            grads = [torch.empty(batch, steps, heads, dim if i < 5 else eta, dtype=compute) for i in range(8)]
            grad_layout, grad_ptrs = _layout(grads), [g.data_ptr() for g in grads]
        _fill_common(a, ptrs, _flat_strides(ctx.layout), ctx.sizes, dones, tick, ctx.eps)
        a.grad_proj[:] = grad_ptrs
        a.grad_proj_stride[:] = _flat_strides(grad_layout)
        grad_out = torch.zeros(batch, steps, heads, dim, dtype=compute) if grad_out is None else grad_out
        grad_out = grad_out.to(compute).contiguous()
        finals = [None if g is None else g.to(compute).contiguous() for g in (grad_k, grad_v, grad_s)]
        E = eta * dim
        grad_state = (
            torch.empty(batch, r, heads, E, dtype=compute),
            torch.empty(batch, r, heads, dim, dtype=compute),
            torch.empty(batch, heads, E, dtype=compute),
        )
        grad_memories: tuple[torch.Tensor, ...] = ()
        if ctx.has_restart:
            index, residues, *memories = rest
            _set_restart(a, index, residues, tuple(memories))
            grad_memories = tuple(torch.zeros(x.shape, dtype=compute) for x in memories)
            for i, g in enumerate(grad_memories):
                a.grad_restart[i] = g.data_ptr()
        a.ckpt, a.chunk = ckpt.data_ptr(), ctx.chunk
        a.grad_out = grad_out.data_ptr()
        for i, g in enumerate(finals):
            a.grad_final[i] = _addr(g)
        for i, g in enumerate(grad_state):
            a.grad_state[i] = g.data_ptr()
        _call("backward", compute, a)
        needs = ctx.needs_input_grad[8:]
        every = [*grads, *grad_state, *grad_memories]
        return (None,) * 8 + tuple(g if need else None for g, need in zip(every, needs))
