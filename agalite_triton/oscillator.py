"""Exact oscillator coefficients ``cos(tick * omega_j)`` from integer ticks.

The original computes ``cos(float32(tick) * linspace(-pi, pi, r))`` in float32, so its phase degrades
past ~1e5 steps and its tick stops advancing past 2**24. Every omega is a rational multiple of pi,
``omega_j = pi * m_j / den`` with ``m_j = 2j - (r - 1)`` and ``den = r - 1`` (``m = -1, den = 1`` for
``r = 1``), so ``cos(tick * omega_j)`` depends only on ``tick * m_j mod 2 * den``. Reducing in integer
arithmetic gives the exact phase for any int64 tick; the cosine of the reduced phase is evaluated in
float64 and rounded once to float32. For small ticks this equals the original to float32 rounding.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["oscillator_period", "oscillator_table", "oscillator_coefficients", "step_residues", "tick_residue"]


def _numerators(r: int) -> tuple[list[int], int]:
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if r == 1:
        return [-1], 1
    return [2 * j - (r - 1) for j in range(r)], r - 1


def oscillator_period(r: int) -> int:
    """Period P in ticks of all r oscillators together: ``cos(t * omega_j)`` depends on ``t mod P`` only."""
    return 2 * _numerators(r)[1]


@lru_cache(maxsize=64)
def _table_f64(r: int) -> tuple[tuple[float, ...], ...]:
    ms, den = _numerators(r)
    period = 2 * den
    return tuple(
        tuple(math.cos(math.pi * ((n * m) % period) / den) for n in range(period)) for m in ms
    )


_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def oscillator_table(r: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(r, P) float32 table: ``table[j, n] = cos(n * omega_j)`` for the residue ``n = tick mod P``.

    Cached per (r, device) and shared: read it, never write it. After the first call no host-to-device
    copy happens, which keeps a rollout step free of them (a copy from pageable memory would also break
    CUDA-graph capture).

    Building the table is a host-to-device copy, which must not happen while a CUDA graph is being
    captured (it would fail, or cache a tensor from the graph's private pool that is only filled when
    the graph replays): such a first call raises. Call this function (or run one eager step, which also
    compiles the kernels) for each r and device before capturing."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # one key per physical device
    key = (r, dev)
    table = _TABLES.get(key)
    if table is None:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"oscillator_table(r={r}, device={dev}): the table is not built yet and a CUDA graph is being "
                "captured; build it before capturing (call agalite_triton.oscillator.oscillator_table(r, device) "
                "or run one eager step first)"
            )
        # A normal tensor even when first asked for under inference_mode, so autograd may use it later.
        with torch.inference_mode(False):
            table = torch.tensor(_table_f64(r), dtype=torch.float32, device=key[1])
        _TABLES[key] = table
    return table


def tick_residue(tick: torch.Tensor, r: int) -> torch.Tensor:
    """``tick mod P`` as int64 in ``[0, P)``; exact for every int64 tick, negative ones included."""
    return torch.remainder(tick, oscillator_period(r))


def oscillator_coefficients(tick: torch.Tensor, steps: int, r: int) -> torch.Tensor:
    """(B, T, r) float32 coefficients for the steps of one call.

    ``tick`` (B,) int64 is the tick *before* the call; step t (0-based) uses ``tick + t + 1``, as the
    original's ``tick + arange(1, T + 1)``.
    """
    return oscillator_table(r, device=tick.device).t()[step_residues(tick, steps, r)]


def step_residues(
    tick: torch.Tensor,
    steps: int,
    r: int,
    restart_index: torch.Tensor | None = None,
    restart_tick: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) int64 in ``[0, P)``: ``(tick used by step t) mod P`` for every step of one call.

    ``tick`` (B,) int64 is the tick before the call. Without restarts step t uses ``tick + t + 1``.
    ``restart_index`` (B, T) int64 (-1: none; n >= 0: row n of the restart memories) and
    ``restart_tick`` (N,) int64: where ``restart_index[b, t] = n``, the tick before step t is
    ``restart_tick[n]``, so step t uses ``restart_tick[n] + 1`` and the steps after it count on from there.
    Shared by the reference (which builds its coefficients from it) and the kernel launcher.
    """
    period = oscillator_period(r)
    device = tick.device
    t_idx = torch.arange(steps, device=device, dtype=torch.int64)
    base = tick_residue(tick, r).unsqueeze(-1)  # (B, 1); reduced before adding, so nothing overflows int64
    if restart_index is None:
        return torch.remainder(base + (t_idx + 1), period).expand(tick.shape[0], steps)
    # The last restart at or before each step, by a running maximum of restart positions (-1: none).
    marked = torch.where(restart_index >= 0, t_idx, -1)
    last = torch.cummax(marked, dim=1).values  # (B, T)
    has = last >= 0
    row = restart_index.gather(1, last.clamp(min=0))
    # One zero appended, so that rows without a restart gather something valid even when N = 0.
    start = torch.cat([tick_residue(restart_tick, r), restart_tick.new_zeros(1)])
    start = torch.where(has, start[torch.where(has, row, start.shape[0] - 1)], base)
    offset = torch.where(has, t_idx - last, t_idx) + 1
    return torch.remainder(start + offset, period)
