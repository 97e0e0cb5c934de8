"""Compile every kernel for sm_90 exactly as the JIT compiles it at launch, on a machine without a GPU,
and report registers, spills, shared memory and resident blocks per SM.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python semantics but never lowers them, so a
construct that only fails in code generation would first show on a GPU, and occupancy is invisible.
Here the real launchers run on CPU tensors laid out as the model lays them out (projections as views
of one fused projection, dones as bool, state rows of a stacked state) at each preset's sizes, with the
launch table's configuration; each kernel launch is intercepted and compiled through the JIT's own
path (its argument specialisation, so 16-byte-aligned pointers and strides divisible by 16 get the
same divisibility hints as on a GPU) against a stand-in driver reporting an sm_90 target, with the
ptxas that Triton itself picks for that target (Triton 3.9 takes its bundled ``ptxas-blackwell`` for
sm_90 and later, 3.6 the plain ``ptxas``), whose log gives registers and spills. Nothing is launched.

It must run in a process where TRITON_INTERPRET is unset before Triton is imported:

    env -u TRITON_INTERPRET python -m agalite_triton.kernels.codegen_check [--json] [--presets paper ...]

``compile_report()`` returns the same figures as records (dicts), for bench scripts. GaLiTe's kernels
(cases ``galite_*``) are compiled at the sizes of ``GALITE_SIZES``: the ``galite-tmaze`` preset and the
conformance fixtures' ``gA`` and ``gC``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget

from ..presets import GALITE_PRESETS, PRESETS
from . import backward, config, forward, galite_backward, galite_forward, galite_step, step
from .launch import dims_of, galite_dims_of
from .occupancy import blocks_per_sm

__all__ = ["GALITE_CASES", "GALITE_SIZES", "KERNEL_CASES", "blocks_per_sm", "compile_report", "format_report"]


# What each report line compiles: the training forward (checkpoints), the inference forward writing
# into the state, the backward, the in-place step, and the slot / restart variants.
KERNEL_CASES = (
    "forward",
    "forward_infer",
    "backward",
    "step",
    "forward_restart",
    "backward_restart",
    "forward_slots",
    "step_slots",
)
# GaLiTe's counterparts, compiled at GaLiTe sizes only.
GALITE_CASES = tuple(f"galite_{case}" for case in KERNEL_CASES)
# (H, D, nu) of the GaLiTe preset and of the conformance fixtures (../shared/golden/galite).
GALITE_SIZES = {
    **{name: (p["n_heads"], p["d_head"], p["nu"]) for name, p in GALITE_PRESETS.items()},
    "gA": (2, 8, 2),
    "gC": (4, 16, 3),
}
DEFAULT_CASES = ("forward", "forward_infer", "backward", "step") + tuple(
    f"galite_{case}" for case in ("forward", "forward_infer", "backward", "step")
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class _Sm90Driver:
    """Just enough of a Triton driver for the JIT to specialise and compile (never to launch)."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


@contextlib.contextmanager
def _intercepted(arch: int, sink: list) -> Iterator[None]:
    """Route every launch of the kernels into a JIT compile for ``arch``; records go to ``sink``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("codegen_check needs TRITON_INTERPRET unset before triton is imported")
    from triton import knobs
    from triton.runtime.driver import driver

    kernels = (
        forward._forward_kernel, backward._backward_kernel, step._step_kernel,
        galite_forward._galite_forward_kernel, galite_backward._galite_backward_kernel, galite_step._galite_step_kernel,
    )  # fmt: skip
    previous_driver = driver._active
    previous_caches = [fn.device_caches for fn in kernels]
    previous_log = knobs.nvidia.dump_ptxas_log
    previous_always = knobs.compilation.always_compile

    def wrap(fn):
        def run(*args, grid, warmup, **kwargs):
            # A fresh binder cache: the JIT must specialise and compile this launch (and run ptxas).
            fn.device_caches = defaultdict(fn.create_binder)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                kernel = type(fn).run(fn, *args, grid=grid, warmup=True, **kwargs)
            text = log.getvalue()
            rec = {k: (int(m.group(1)) if (m := re.search(p, text)) else None) for k, p in _PTXAS_PATTERNS.items()}
            rec.update(
                kernel=fn.__name__, num_warps=kernel.metadata.num_warps, num_stages=kwargs.get("NUM_STAGES"),
                shared=kernel.metadata.shared, grid=tuple(grid), ttir=kernel.asm.get("ttir", ""),
                async_copies=kernel.asm.get("ptx", "").count("cp.async."),
                signature=dict(getattr(kernel.src, "signature", {})),
                attrs=str(getattr(kernel.src, "attrs", "")),
            )  # fmt: skip
            sink.append(rec)
            return kernel

        return run

    driver.set_active(_Sm90Driver(arch))
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # an on-disk cache hit would skip ptxas and its log
    for fn in kernels:
        fn.run = wrap(fn)
    try:
        yield
    finally:
        for fn, caches in zip(kernels, previous_caches):
            del fn.run
            fn.device_caches = caches
        knobs.nvidia.dump_ptxas_log = previous_log
        knobs.compilation.always_compile = previous_always
        driver._active = previous_driver


def _model_projections(batch: int, steps: int, heads: int, dim: int, eta: int, dtype: torch.dtype):
    """keys ... p3 as the attention layer makes them: strided views of one fused projection."""
    n_d = heads * 5 * dim
    z = torch.randn(batch, steps, n_d + heads * 3 * eta).to(dtype)
    kqvbg = z[..., :n_d].unflatten(-1, (heads, 5, dim)).unbind(-2)
    pp = z[..., n_d:].unflatten(-1, (heads, 3, eta)).unbind(-2)
    return list(kqvbg) + list(pp)


def _launch_case(case: str, r: int, heads: int, dim: int, eta: int, dtype: torch.dtype, steps: int) -> None:
    """Run the launcher that ``case`` names once, on CPU tensors (its kernel launch is intercepted)."""
    batch, layers = 3, 2
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    proj = _model_projections(batch, steps, heads, dim, eta, dtype)
    dones = torch.zeros(batch, steps, dtype=torch.bool)
    feat = eta * dim
    stacked = [torch.zeros(layers, batch, r, heads, feat, dtype=sdt), torch.zeros(layers, batch, r, heads, dim,
               dtype=sdt), torch.zeros(layers, batch, heads, feat, dtype=sdt)]  # fmt: skip
    state = [x[1] for x in stacked]
    tick = torch.ones(batch, dtype=torch.int64)
    dims = dims_of(proj[0], eta, r)
    chunk = config.get_config("forward", dims.r_pad, dims.eta_pad, dims.d_pad).chunk
    restart = None
    if case.endswith("_restart"):
        index = torch.full((batch, steps), -1, dtype=torch.int64)
        index[:, 0] = torch.arange(batch)
        restart = (index, *(torch.zeros((batch, *x.shape[1:]), dtype=sdt) for x in state), tick.clone())
    slots = torch.arange(batch, dtype=torch.int64) if case.endswith("_slots") else None
    if case in ("forward", "forward_restart"):
        forward.recurrence_forward(*proj, dones, *state, tick, 1e-5, True, chunk, restart=restart)
    elif case in ("forward_infer", "forward_slots"):
        forward.recurrence_forward(*proj, dones, *state, tick, 1e-5, False, chunk, slots=slots,
                                   state_out=tuple(state))  # fmt: skip
    elif case in ("backward", "backward_restart"):
        saved = forward.saved_buffer(dims, chunk, sdt, torch.device("cpu"), True)
        grad_out = torch.zeros(batch, steps, heads, dim, dtype=dtype)
        backward.recurrence_backward(grad_out, None, None, None, *proj, dones, saved, tick, r, 1e-5, chunk,
                                     restart=restart)  # fmt: skip
    elif case in ("step", "step_slots"):
        step.step_forward(*(p[:, 0] for p in proj), dones[:, 0], *state, tick, 1e-5, in_place=True, slots=slots)
    else:
        raise ValueError(f"case: expected one of {KERNEL_CASES}, got {case!r}")


def _launch_galite_case(case: str, heads: int, dim: int, nu: int, dtype: torch.dtype, steps: int) -> None:
    """As ``_launch_case`` for a GaLiTe case (``galite_`` + an AGaLiTe case's name)."""
    batch, layers = 3, 2
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    proj = _model_projections(batch, steps, heads, dim, nu, dtype)
    dones = torch.zeros(batch, steps, dtype=torch.bool)
    stacked = [torch.zeros(layers, batch, heads, dim, nu * dim, dtype=sdt),
               torch.zeros(layers, batch, heads, nu * dim, dtype=sdt)]  # fmt: skip
    memory = [x[1] for x in stacked]
    dims = galite_dims_of(proj[0], nu)
    chunk = dims.config("galite_forward").chunk
    restart = None
    if case.endswith("_restart"):
        index = torch.full((batch, steps), -1, dtype=torch.int64)
        index[:, 0] = torch.arange(batch)
        restart = (index, *(torch.zeros((batch, *x.shape[1:]), dtype=sdt) for x in memory))
    slots = torch.arange(batch, dtype=torch.int64) if case.endswith("_slots") else None
    kind = case.removeprefix("galite_")
    if kind in ("forward", "forward_restart"):
        galite_forward.galite_forward(*proj, dones, *memory, 1e-10, True, chunk, restart=restart)
    elif kind in ("forward_infer", "forward_slots"):
        galite_forward.galite_forward(*proj, dones, *memory, 1e-10, False, chunk, slots=slots,
                                      state_out=tuple(memory))  # fmt: skip
    elif kind in ("backward", "backward_restart"):
        saved = torch.empty(batch * heads, galite_forward.galite_saved_length(dims, chunk), dtype=sdt)
        grad_out = torch.zeros(batch, steps, heads, dim, dtype=dtype)
        galite_backward.galite_backward(grad_out, None, None, *proj, dones, saved, 1e-10, chunk, restart=restart)
    elif kind in ("step", "step_slots"):
        galite_step.galite_step_forward(*(p[:, 0] for p in proj), dones[:, 0], *memory, 1e-10, in_place=True,
                                        slots=slots)  # fmt: skip
    else:
        raise ValueError(f"case: expected one of {GALITE_CASES}, got {case!r}")


def _galite_record(rec: dict, case: str, preset: str, heads: int, dim: int, nu: int) -> dict:
    """A GaLiTe record's sizes and launch configuration (``split`` holds the rows per program)."""
    kernel = "galite_" + ("backward" if "backward" in case else "step" if "step" in case else "forward")
    dims = galite_dims_of(torch.empty(1, 1, heads, dim), nu)
    cfg = dims.config(kernel)
    loops = kernel != "galite_step"  # the step kernel has no time loop
    rec.update(
        case=case, preset=preset, r=None, eta=nu, d=dim, heads=heads,
        size_class=config.size_class(dims.d_pad, dims.nu_pad, dims.d_pad), chunk=cfg.chunk if loops else None,
        split=dims.rows(kernel), num_stages=cfg.num_stages if loops else None,
    )  # fmt: skip
    return rec


def _sizes_of(preset: str | tuple[int, int, int]) -> tuple[str, int, int, int, int]:
    """(label, R, H, D, eta) of a preset name or an (R, eta, D) triple (H = 4)."""
    if isinstance(preset, str):
        p = PRESETS[preset]
        return preset, p["r"], p["n_heads"], p["d_head"], p["eta"]
    r, eta, dim = preset
    return f"r{r}e{eta}d{dim}", r, 4, dim, eta


def _report_one(args: tuple) -> list[dict]:
    preset, dtype_name, cases, arch, table_json, steps = args
    if isinstance(preset, str) and preset in GALITE_SIZES:
        return _report_galite(preset, dtype_name, cases, arch, table_json, steps)
    cases = tuple(c for c in cases if not c.startswith("galite_"))
    preset, r, heads, dim, eta = _sizes_of(preset)
    dims = dims_of(torch.empty(1, 1, heads, dim), eta, r)
    table = config.table_from_json(table_json) if table_json is not None else config.active_table()
    records = []
    with config.use_table(table):
        for case in cases:
            sink: list = []
            with _intercepted(arch, sink):
                _launch_case(case, r, heads, dim, eta, DTYPES[dtype_name], steps)
            rec = sink[-1]
            kernel = "backward" if case.startswith("backward") else "step" if case.startswith("step") else "forward"
            cfg = config.get_config(kernel, dims.r_pad, dims.eta_pad, dims.d_pad)
            blocks, limiter = blocks_per_sm(rec["registers"] or 255, rec["num_warps"], rec["shared"])
            rec.update(
                case=case, preset=preset, dtype=dtype_name, r=r, eta=eta, d=dim, heads=heads,
                size_class=config.size_class(dims.r_pad, dims.eta_pad, dims.d_pad),
                chunk=cfg.chunk if kernel != "step" else None,
                split=min(cfg.split, dims.eta_pad) if kernel == "backward" else None,
                num_stages=cfg.num_stages if kernel != "step" else None,
                blocks_per_sm=blocks, occupancy_limiter=limiter, arch=f"sm_{arch}", triton=triton.__version__,
            )  # fmt: skip
            records.append(rec)
    return records


def _report_galite(preset: str, dtype_name: str, cases: tuple, arch: int, table_json: dict | None,
                   steps: int) -> list[dict]:  # fmt: skip
    heads, dim, nu = GALITE_SIZES[preset]
    table = config.table_from_json(table_json) if table_json is not None else config.active_table()
    records = []
    with config.use_table(table):
        for case in (c for c in cases if c.startswith("galite_")):
            sink: list = []
            with _intercepted(arch, sink):
                _launch_galite_case(case, heads, dim, nu, DTYPES[dtype_name], steps)
            rec = _galite_record(sink[-1], case, preset, heads, dim, nu)
            blocks, limiter = blocks_per_sm(rec["registers"] or 255, rec["num_warps"], rec["shared"])
            rec.update(dtype=dtype_name, blocks_per_sm=blocks, occupancy_limiter=limiter, arch=f"sm_{arch}",
                       triton=triton.__version__)  # fmt: skip
            records.append(rec)
    return records


def compile_report(
    presets: tuple[str | tuple[int, int, int], ...] = tuple(PRESETS) + tuple(GALITE_SIZES),
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    cases: tuple[str, ...] = DEFAULT_CASES,
    arch: int = 90,
    table: dict | None = None,
    jobs: int = 1,
    keep_ir: bool = False,
    steps: int = 128,
) -> list[dict]:
    """One record per (preset, dtype, kernel case) (a preset is a name from ``PRESETS`` or an
    (R, eta, D) triple, run with H = 4, for the AGaLiTe cases, or a name from ``GALITE_SIZES`` for the
    ``galite_*`` cases; each preset compiles the cases of its model): registers, spill_stores / spill_loads (bytes),
    stack, shared (bytes), num_warps / num_stages / chunk / split as launched, blocks_per_sm and
    occupancy_limiter, async_copies (``cp.async`` instructions in the PTX: software pipelining at
    work), the JIT signature and divisibility attributes, and with ``keep_ir`` the TTIR. ``table`` is a launch table
    (as for ``config.use_table``; default: the active one). ``jobs`` > 1 compiles in that many
    processes (each compile takes seconds)."""
    for name in presets:
        if isinstance(name, str) and name not in PRESETS and name not in GALITE_SIZES:
            raise ValueError(
                f"presets: unknown preset {name!r}, expected some of {tuple(PRESETS) + tuple(GALITE_SIZES)} or "
                "(R, eta, D)"
            )
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"dtypes: unknown dtype {name!r}, expected some of {tuple(DTYPES)}")
    for name in cases:
        if name not in KERNEL_CASES + GALITE_CASES:
            raise ValueError(f"cases: unknown case {name!r}, expected some of {KERNEL_CASES + GALITE_CASES}")
    table_json = config.table_to_json(table) if table is not None else None
    tasks = [(p, d, tuple(cases), arch, table_json, steps) for p in presets for d in dtypes]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
            results = list(pool.map(_report_one, tasks))
    else:
        results = [_report_one(t) for t in tasks]
    records = [rec for batch in results for rec in batch]
    if not keep_ir:
        for rec in records:
            rec.pop("ttir", None)
    return records


def format_report(records: list[dict]) -> str:
    # GaLiTe rows: (-, nu, D) sizes and the rows per program under "split".
    head = (f"{'case':24s} {'preset':12s} {'dtype':5s} {'(R,eta,D)':10s} {'warps':>5s} {'stg':>3s} {'chunk':>5s} "
            f"{'split':>5s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'blk/SM':>6s} limiter")  # fmt: skip
    lines = [f"Triton {triton.__version__}, {records[0]['arch'] if records else ''}", head]
    for r in records:
        dash = "-"
        lines.append(
            f"{r['case']:24s} {r['preset']:12s} {r['dtype']:5s} {str((r['r'] or dash, r['eta'], r['d'])):10s} "
            f"{r['num_warps']:5d} {r['num_stages'] or dash:>3} {r['chunk'] or dash:>5} {r['split'] or dash:>5} "
            f"{r['registers']:4d} {r['spill_stores']:5d} {r['shared']:6d} {r['blocks_per_sm']:6d} "
            f"{r['occupancy_limiter']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS) + list(GALITE_SIZES))
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON record per line instead of the table")
    args = parser.parse_args(argv)
    records = compile_report(tuple(args.presets), tuple(args.dtypes), tuple(args.cases), jobs=args.jobs)
    if args.json:
        for rec in records:
            print(json.dumps(rec))
    else:
        print(format_report(records))


if __name__ == "__main__":
    main()
