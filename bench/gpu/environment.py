"""Stage ``environment``: what the device is, and the ceilings every figure is compared with.

Measured here (METHOD.md of the device notes: measure the two ceilings once rather than trust a
datasheet): device-to-device copy bandwidth (bytes read plus bytes written), the bf16 and float32
(TF32 off) matrix-product rates on random data, and the cost of one tiny kernel launch. Clocks are
read with nvidia-smi before and after the products (they ramp up under load). On CPU (the dry run)
each measurement runs a small CPU stand-in, marked as such.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import torch

from ..environment import describe_device, load_average, versions
from .stage import Session, Stage, launch_config

__all__ = ["run"]

_SMI_FIELDS = ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,"
               "temperature.gpu,utilization.gpu,memory.used,memory.total")  # fmt: skip
_SMI_BASIC = "name,driver_version,clocks.sm,clocks.mem"


def nvidia_smi(fields: str = _SMI_FIELDS) -> dict[str, Any]:
    """The queried fields of the first GPU; a driver that refuses one field gets the basic set."""
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return dict(error=f"{type(exc).__name__}: {exc}")
    if res.returncode != 0 or not res.stdout.strip():
        if fields != _SMI_BASIC:
            return dict(nvidia_smi(_SMI_BASIC), full_query_error=(res.stderr or res.stdout).strip()[:300])
        return dict(error=(res.stderr or res.stdout).strip()[:500])
    values = [v.strip() for v in res.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values))


def _properties(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    names = ("multi_processor_count", "L2_cache_size", "regs_per_multiprocessor", "max_threads_per_multi_processor",
             "shared_memory_per_block", "shared_memory_per_block_optin", "shared_memory_per_multiprocessor",
             "warp_size", "total_memory", "major", "minor", "clock_rate", "memory_clock_rate", "memory_bus_width")
    return {n: getattr(props, n) for n in names if hasattr(props, n)}  # fmt: skip


def _time_cuda(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return sorted(times)


def _time_host(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return sorted(times)


def _summary(times: list[float]) -> dict[str, float]:
    n = len(times)
    return dict(median_s=times[n // 2], p20_s=times[int(0.2 * (n - 1))], p80_s=times[int(0.8 * (n - 1))], reps=n)


def copy_bandwidth(device: torch.device, dry: bool) -> dict[str, Any]:
    n = (1 << 16) if dry else (1 << 29)  # float32 elements: 2 GiB per buffer on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)
    fn()
    times = _time_cuda(fn, 10) if device.type == "cuda" else _time_host(fn, 3)
    moved = 2 * src.nbytes  # read + write
    stats = _summary(times)
    return dict(bytes_moved=moved, bytes_per_s=moved / stats["median_s"], stand_in=device.type != "cuda",
                detail=f"dst.copy_(src) of {src.nbytes / 2**30:.3f} GiB, read + write counted", **stats)  # fmt: skip


def matmul_rate(device: torch.device, dtype: torch.dtype, dry: bool) -> dict[str, Any]:
    n = 128 if dry else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    fn = lambda: torch.mm(a, b)
    for _ in range(3):
        fn()
    reps = 3 if device.type != "cuda" else (20 if dtype == torch.bfloat16 else 6)
    times = _time_cuda(fn, reps) if device.type == "cuda" else _time_host(fn, reps)
    flops = 2 * n**3
    stats = _summary(times)
    return dict(n=n, flops=flops, flops_per_s=flops / stats["median_s"], stand_in=device.type != "cuda",
                tf32=torch.backends.cuda.matmul.allow_tf32, detail=f"torch.mm {n}x{n}x{n} {dtype}, random data",
                **stats)  # fmt: skip


def launch_overhead(device: torch.device) -> dict[str, Any]:
    """Host time per launch of a one-element in-place add, 2000 in a row then one sync."""
    x = torch.zeros(1, device=device)
    x.add_(1)
    launches = 2000 if device.type == "cuda" else 200
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per = (time.perf_counter() - begin) / launches
    return dict(per_launch_s=per, launches=launches, stand_in=device.type != "cuda")


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run(session: Session, stage: Stage) -> None:
    device, dry = session.device, session.dry_run

    def describe() -> dict[str, Any]:
        info = describe_device(device)
        env = {k: v for k, v in os.environ.items() if k.startswith(("TRITON", "CUDA", "AGALITE", "PYTORCH"))}
        table = None
        try:
            from agalite_triton.kernels import config

            table = config.table_to_json(config.active_table())
        except ImportError:
            pass
        return dict(info=info, properties=_properties(device), nvidia_smi=nvidia_smi() if device.type == "cuda"
                    else None, versions_full=versions(), load_average=load_average(), git_commit=_git_commit(),
                    tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32),
                    env=env, launch_table=table, paper_launch=launch_config((2, 4, 64)))  # fmt: skip

    stage.case("device", 5.0, describe)

    def bandwidth() -> dict[str, Any]:
        result = copy_bandwidth(device, dry)
        session.ceilings["copy_bytes_per_s"] = result["bytes_per_s"]
        return result

    stage.case("copy_bandwidth", 5.0, bandwidth)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):

        def rate(dtype: torch.dtype = dtype, name: str = name) -> dict[str, Any]:
            result = matmul_rate(device, dtype, dry)
            session.ceilings[f"matmul_{name}_flops_per_s"] = result["flops_per_s"]
            return result

        stage.case(f"matmul_{name}", 5.0, rate, dtype=name)
    stage.case("launch_overhead", 2.0, lambda: launch_overhead(device))
    if device.type == "cuda":
        stage.case("clocks_after", 5.0, lambda: dict(nvidia_smi=nvidia_smi()))
    else:
        stage.skip("clocks_after", "no CUDA: nvidia-smi clocks are read on a GPU only")
