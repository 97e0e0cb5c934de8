"""The tuning sweep's candidate launch configurations, per kernel and size class.

Every knob of the launch table is varied: warps (1 to 8: the defaults use 2 to 4, and a split
backward program holds only a fraction of the tile), ``num_stages`` of the time loops (forward and
backward; the step kernel has no loop), the backward's ``split`` of the feature map across programs
(at most ETA_PAD), and CHUNK (the forward's checkpoint interval, which the backward recomputes from).
On the GPU the primary knobs form a full grid; CHUNK is then tried on the best few backward
configurations (``chunk_candidates``), since it changes the forward too. The dry run moves every knob
at once in a single extra candidate, which keeps every path at the least interpreted work. The
default configuration is always a candidate, so the file says what tuning gains over it.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

__all__ = ["candidates", "chunk_candidates", "config_id"]


def config_id(cfg: Any) -> str:
    return f"w{cfg.num_warps}-s{cfg.num_stages}-c{cfg.chunk}-x{cfg.split}"


def _axes(kernel: str, eta_pad: int, grid: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    warps = tuple(grid["warps"])
    if kernel == "forward":
        return dict(num_warps=warps, num_stages=tuple(grid["stages"]))
    if kernel == "backward":
        splits = tuple(s for s in grid["splits"] if s <= eta_pad) or (1,)
        return dict(num_warps=warps, num_stages=tuple(grid["stages"]), split=splits)
    if kernel == "step":
        return dict(num_warps=warps)
    raise ValueError(f"kernel: expected 'forward', 'backward' or 'step', got {kernel!r}")


def candidates(kernel: str, default: Any, pads: tuple[int, int, int], grid: dict[str, Any],
               full_grid: bool) -> list[Any]:  # fmt: skip
    """Configurations to try for ``kernel`` at padded sizes ``pads``, the default first."""
    axes = _axes(kernel, pads[1], grid)
    found = [default]
    if full_grid:
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            found.append(replace(default, **dict(zip(names, values))))
    else:  # one candidate with every knob moved off its default: each path runs, at the least cost
        moved = {n: next((v for v in vs if v != getattr(default, n)), getattr(default, n)) for n, vs in axes.items()}
        found.append(replace(default, **moved))
    unique: list[Any] = []
    for cfg in found:
        if cfg not in unique:
            unique.append(cfg)
    return unique


def chunk_candidates(forward: Any, backward_best: list[Any], chunks: tuple[int, ...]) -> list[tuple[Any, Any]]:
    """(forward, backward) pairs with CHUNK varied: the forward's entry decides it (the backward
    entry's copy is set alike for readability)."""
    pairs = []
    for cfg in backward_best:
        for c in chunks:
            if c != forward.chunk:
                pairs.append((replace(forward, chunk=c), replace(cfg, chunk=c)))
    return pairs
