"""Recurrence-only harness: ``agalite_recurrence`` alone, forward and forward + backward.

Shapes come from the presets: (B, T, H, D) projections, eta feature multiplier, R oscillators; the
kernels are measured where they are present (CUDA), always next to the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from agalite_triton import PRESETS, agalite_recurrence

from .workloads import autocast

__all__ = ["RecurrenceShape", "recurrence_inputs", "recurrence_shapes", "recurrence_step"]


@dataclass(frozen=True)
class RecurrenceShape:
    name: str  # "recurrence-<preset>"
    heads: int
    head_dim: int
    eta: int
    r: int

    @property
    def config(self) -> dict[str, int]:
        return dict(H=self.heads, D=self.head_dim, eta=self.eta, R=self.r)


def recurrence_shapes(presets: list[str]) -> list[RecurrenceShape]:
    """One shape per preset, ``paper`` first."""
    ordered = sorted(presets, key=lambda p: p != "paper")
    return [
        RecurrenceShape(
            f"recurrence-{p}", PRESETS[p]["n_heads"], PRESETS[p]["d_head"], PRESETS[p]["eta"], PRESETS[p]["r"]
        )
        for p in ordered
    ]


def recurrence_inputs(
    shape: RecurrenceShape,
    batch: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    done_prob: float = 0.01,
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """(projections [keys, queries, values, beta, gamma, p1, p2, p3], dones, state [tilde_k, tilde_v, s, tick])."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, D, eta, R = batch, seq_len, shape.heads, shape.head_dim, shape.eta, shape.r
    proj = [torch.randn(B, T, H, D, generator=gen) for _ in range(5)]
    proj += [torch.randn(B, T, H, eta, generator=gen) for _ in range(3)]
    dones = torch.rand(B, T, generator=gen) < done_prob
    state = [
        torch.rand(B, R, H, eta * D, generator=gen),
        torch.randn(B, R, H, D, generator=gen),
        torch.rand(B, H, eta * D, generator=gen),
    ]
    tick = torch.randint(1, 10**6, (B,), generator=gen)
    return (
        [p.to(device=device, dtype=dtype) for p in proj],
        dones.to(device),
        [s.to(device) for s in state] + [tick.to(device)],
    )


def recurrence_step(
    shape: RecurrenceShape,
    batch: int,
    seq_len: int,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    backward: bool,
    done_prob: float = 0.01,
    seed: int = 0,
) -> Callable[[], None]:
    """A callable running the recurrence once (and its backward into every projection if ``backward``).

    Under bf16 the projections are bf16 (as a bf16-autocast model hands them over); the state stays
    float32, as ``agalite_recurrence`` requires.
    """
    proj, dones, state = recurrence_inputs(shape, batch, seq_len, device, dtype, done_prob, seed)
    if not backward:

        def forward() -> None:
            with torch.no_grad(), autocast(device, dtype):
                agalite_recurrence(*proj, dones, *state, backend=backend)

        return forward

    for p in proj:
        p.requires_grad_(True)
    grad_out = torch.randn(proj[0].shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)

    def forward_backward() -> None:
        for p in proj:
            p.grad = None
        with autocast(device, dtype):
            out, _ = agalite_recurrence(*proj, dones, *state, backend=backend)
        out.backward(grad_out)

    return forward_backward
