"""Stage ``compiled``: registers, spills, shared memory and blocks per SM of every kernel variant this
process has actually launched, read from Triton's compiled-kernel objects (``n_regs``, ``n_spills``,
``metadata.shared``), which is what the driver loaded, not a re-compilation.

Runs after the correctness stage, so it covers every preset, dtype and variant (checkpoints or not,
dones or not) at the default launch table. The sweep attaches the same figures to each of its
configurations (``new_kernels``). Under the interpreter nothing is compiled: the dry run records
instead the offline report (``env -u TRITON_INTERPRET python -m agalite_triton.kernels.codegen_check``)
of one kernel, compiled for sm_90 without a GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from typing import Any

import torch

from .stage import Session, Stage

__all__ = ["blocks_per_sm", "compiled_kernels", "describe", "jit_kernels", "new_kernels", "run", "snapshot"]

def blocks_per_sm(regs: int, warps: int, shared: int, limits: dict[str, int] | None = None) -> dict[str, int | None]:
    """Resident blocks per SM, what limits them, and what each resource allows (``max_by_shared`` None
    for a kernel without shared memory); sm_90 limits where the device properties do not say."""
    from agalite_triton.kernels.occupancy import blocks_per_sm as resident
    from agalite_triton.kernels.occupancy import limits_by

    blocks, limiter = resident(regs, warps, shared, limits)
    by: dict[str, int | None] = dict(limits_by(regs, warps, shared, limits))
    if not shared:
        by["shared"] = None
    return dict(blocks_per_sm=blocks, limited_by=limiter, **{f"max_by_{k}": v for k, v in by.items()})


def device_limits(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    pairs = (("registers", "regs_per_multiprocessor"), ("max_threads", "max_threads_per_multi_processor"),
             ("shared", "shared_memory_per_multiprocessor"))  # fmt: skip
    return {ours: int(getattr(props, theirs)) for ours, theirs in pairs if getattr(props, theirs, None)}


def jit_kernels() -> dict[str, Any]:
    """Every ``@triton.jit`` function of ``agalite_triton.kernels`` (launched kernels and helpers)."""
    try:
        from triton.runtime.jit import JITFunction

        import agalite_triton.kernels as pkg
    except ImportError:
        return {}
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "codegen_check":  # an offline tool, not a launcher
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and getattr(obj, "device_caches", None) is not None:
                found.setdefault(name, obj)
    return found


def compiled_kernels(fn: Any) -> list[tuple[Any, Any]]:
    """(cache key, compiled kernel) of every variant of ``fn`` compiled in this process."""
    out = []
    for entry in list(getattr(fn, "device_caches", {}).values()):
        cache = entry[0] if isinstance(entry, tuple) else entry
        for key, kernel in list(cache.items()):
            if hasattr(kernel, "result"):  # a future of an asynchronous compile
                kernel = kernel.result()
            out.append((key, kernel))
    return out


def snapshot() -> set[tuple[str, Any]]:
    return {(name, str(key)) for name, fn in jit_kernels().items() for key, _ in compiled_kernels(fn)}


def describe(name: str, fn: Any, kernel: Any, limits: dict[str, int]) -> dict[str, Any]:
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        kernel._init_handles()
    md = kernel.metadata
    src = getattr(kernel, "src", None)
    constants: dict[str, Any] = {}
    for key, value in (getattr(src, "constants", None) or {}).items():
        index = key[0] if isinstance(key, tuple) else key
        arg = fn.arg_names[index] if isinstance(index, int) and index < len(fn.arg_names) else str(key)
        constants[arg] = value if isinstance(value, (int, float, bool)) else str(value)
    signature = getattr(src, "signature", None) or {}
    pointers = sorted({str(v) for v in signature.values() if str(v).startswith("*")})
    regs, spills, shared = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None), md.shared
    # The time loops' pipelining depth is the NUM_STAGES constexpr (in ``constants``); the compile
    # option ``num_stages`` only affects tl.dot / tl.range loops that do not set their own.
    info = dict(kernel=name, num_warps=md.num_warps, option_num_stages=getattr(md, "num_stages", None), registers=regs,
                spills=spills, shared_bytes=shared, constants=constants, pointer_dtypes=pointers,
                io_dtype=str(signature.get("k_ptr", "")), hash=getattr(kernel, "hash", None))  # fmt: skip
    if regs is not None:
        info.update(blocks_per_sm(int(regs), int(md.num_warps), int(shared or 0), limits))
    return info


def new_kernels(before: set[tuple[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The kernels compiled (or loaded from Triton's disk cache) since ``before`` was taken."""
    limits = device_limits(device)
    out = []
    for name, fn in jit_kernels().items():
        for key, kernel in compiled_kernels(fn):
            if (name, str(key)) not in before:
                out.append(describe(name, fn, kernel, limits))
    return out


def offline_report(presets: str, dtypes: str, cases: str, timeout_s: float) -> list[dict[str, Any]]:
    """``codegen_check --json`` in a child process (it needs TRITON_INTERPRET unset before Triton is
    imported, which this process, interpreting, cannot have): sm_90 compiles without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "agalite_triton.kernels.codegen_check", "--json", "--presets", presets,
           "--dtypes", dtypes, "--cases", cases]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}: {res.stderr[-1500:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def run(session: Session, stage: Stage) -> None:
    kernels = jit_kernels()
    if session.device.type != "cuda" or not kernels:
        # The scan finds interpreted functions, which compile nothing. The stand-in is the offline
        # report of one kernel (compiled for sm_90 here, no GPU needed), so that path runs too.
        stage.skip("kernels", "no CUDA: the Triton interpreter compiles nothing; the offline report is "
                   "`env -u TRITON_INTERPRET python -m agalite_triton.kernels.codegen_check`",
                   example=blocks_per_sm(128, 4, 0))  # fmt: skip

        def offline() -> dict[str, Any]:
            rows = offline_report("paper", "fp32", "step", timeout_s=120)
            keep = ("kernel", "case", "preset", "dtype", "num_warps", "registers", "spill_stores", "shared",
                    "blocks_per_sm", "occupancy_limiter", "arch", "triton")  # fmt: skip
            return dict(stand_in=True, source="codegen_check", kernels=[{k: r.get(k) for k in keep} for r in rows])

        stage.case("offline/paper/fp32/step", 10.0, offline)
        return
    limits = device_limits(session.device)
    for name, fn in sorted(kernels.items()):
        for i, (_key, kernel) in enumerate(compiled_kernels(fn)):
            tag = str(getattr(kernel, "hash", None) or i)[:16]
            stage.case(f"{name}/{tag}", 0.5, lambda n=name, f=fn, k=kernel: describe(n, f, k, limits), limits=limits)
