"""Resident blocks per SM of a compiled kernel, from its registers, warps and shared memory.

Shared by the offline compile report (``codegen_check``) and the report of what a GPU run launched
(``bench.gpu.compiled``); plain arithmetic, no Triton, so either may import it anywhere.
"""

from __future__ import annotations

__all__ = ["SM90", "blocks_per_sm", "limits_by"]

# sm_90 (H100 / H200) per-SM limits.
SM90 = dict(registers=65536, reg_unit=256, max_threads=2048, max_blocks=32, shared=233472, shared_reserved=1024)


def limits_by(registers: int, num_warps: int, shared: int, limits: dict[str, int] | None = None) -> dict[str, int]:
    """Blocks per SM that each resource allows. Registers are allocated per warp in units of 256 (a
    thread's count rounded up to a multiple of 8); each block also reserves 1 KiB of shared memory;
    at most 2048 threads and 32 blocks. ``limits`` overrides entries of :data:`SM90`."""
    lim = dict(SM90, **(limits or {}))
    unit = lim["reg_unit"]
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    return {
        "registers": lim["registers"] // (regs_per_warp * num_warps),
        "threads": lim["max_threads"] // (32 * num_warps),
        "shared": lim["shared"] // (shared + lim["shared_reserved"]),
        "blocks": lim["max_blocks"],
    }


def blocks_per_sm(
    registers: int, num_warps: int, shared: int, limits: dict[str, int] | None = None
) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them (the first of registers, threads,
    shared, blocks on a tie)."""
    by = limits_by(registers, num_warps, shared, limits)
    limiter = min(by, key=lambda k: by[k])
    return by[limiter], limiter
