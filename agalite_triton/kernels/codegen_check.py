"""Compile every kernel for an NVIDIA target on a machine without a GPU, and report ptxas's register
and spill counts.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python semantics but never lowers them, so a
construct that only fails in code generation would first show on a GPU. This compiles the real
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) at the launchers' warp
counts. It must run in a process where TRITON_INTERPRET is unset before Triton is imported:

    env -u TRITON_INTERPRET python -m agalite_triton.kernels.codegen_check
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import _backward_kernel
from .forward import _forward_kernel
from .launch import CHUNK, Dims
from .step import _step_kernel

__all__ = ["CompileReport", "compile_all"]

# Pointer arguments holding projections, read-outs and their gradients: these take the input dtype.
_IO_POINTERS = {
    "k_ptr", "q_ptr", "v_ptr", "beta_ptr", "gamma_ptr", "p1_ptr", "p2_ptr", "p3_ptr", "out_ptr", "do_ptr",
    "dk_ptr", "dq_ptr", "dv_ptr", "dbeta_ptr", "dgamma_ptr", "dp1_ptr", "dp2_ptr", "dp3_ptr",
}  # fmt: skip
_STATE_POINTERS = {"tk_in", "tv_in", "s_in", "tk_out", "tv_out", "s_out"}


@dataclass(frozen=True)
class CompileReport:
    kernel: str
    sizes: tuple[int, int, int]
    dtype: str
    num_warps: int
    registers: int | None
    spill_bytes: int | None


def _signature(fn, io_dtype: str, state_dtype: str, consts: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _IO_POINTERS:
            sig[name] = io_dtype
        elif name == "res_ptr":
            sig[name] = "*i64"
        elif name == "table_ptr":
            sig[name] = "*fp32"
        elif name.endswith("_ptr") or name in _STATE_POINTERS:
            sig[name] = state_dtype
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith(("sd_", "se_", "sdo_")) else "i32"
    return sig


def _ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr + res.stdout)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr + res.stdout)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_all(
    sizes: tuple[tuple[int, int, int], ...] = ((2, 4, 64), (4, 4, 8), (1, 1, 4)),
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32", "fp64"),
    arch: int = 90,
) -> list[CompileReport]:
    """Compile forward, backward and step kernels for each padded (R, eta, D) size and input dtype."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("codegen_check needs TRITON_INTERPRET unset before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    reports = []
    for r_pad, eta_pad, d_pad in sizes:
        dims = Dims(1, 1, 1, d_pad, eta_pad, r_pad, 2, d_pad, eta_pad, r_pad)
        for dtype in dtypes:
            acc = tl.float64 if dtype == "fp64" else tl.float32
            state_dtype = "*fp64" if dtype == "fp64" else "*fp32"
            common = dict(R_PAD=r_pad, ETA_PAD=eta_pad, D_PAD=d_pad, ACC=acc, HAS_DONES=True)
            kernels = [
                (_forward_kernel, dict(common, SAVE_CKPT=True, CHUNK_=CHUNK), dims.num_warps()),
                (_backward_kernel, dict(common, CHUNK_=CHUNK, HAS_DTK=True, HAS_DTV=True, HAS_DS=True),
                 dims.num_warps(backward=True)),
                (_step_kernel, common, dims.num_warps()),
            ]  # fmt: skip
            for fn, consts, warps in kernels:
                src = ASTSource(
                    fn=fn,
                    signature=_signature(fn, f"*{dtype}", state_dtype, consts),
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                )
                compiled = triton.compile(src, target=target, options={"num_warps": warps})
                regs, spill = _ptxas_report(compiled.asm["ptx"], arch)
                reports.append(CompileReport(fn.__name__, (r_pad, eta_pad, d_pad), dtype, warps, regs, spill))
    return reports


if __name__ == "__main__":
    for rep in compile_all():
        print(f"{rep.kernel:18s} (R,eta,D)_pad={rep.sizes} {rep.dtype:5s} warps={rep.num_warps:2d} "
              f"registers={rep.registers} spill_bytes={rep.spill_bytes}")  # fmt: skip
