"""Inputs, the float64 oracle and the comparison shared by the correctness stage, the sweep and the
compile workers.

Inputs are drawn on the device (drawing 100M values on the host and copying them would cost seconds
per case), random and non-zero, with dones inside T, a non-zero initial state, ticks far from 1 and
optionally gate logits pushed towards 0 or 1. Rows of the batch are independent in the recurrence,
so the kernel runs at the full batch while the float64 reference runs on a subset of rows (the
first, the last and some random ones): cheap, and the rows at the far end of the grid are covered.
Every kernel output is allocated NaN-filled while checking (``launch.POISON_OUTPUTS``) and the whole
output must be finite, so an element a kernel forgets to write fails at any row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from agalite_triton import agalite_recurrence

from .sizes import Case, Shape

__all__ = [
    "DTYPES",
    "GATE_OFFSETS",
    "Inputs",
    "check",
    "compare",
    "make_inputs",
    "poisoned",
    "recurrence_fn",
    "reference",
    "rel_error",
    "run_recurrence",
    "run_step",
    "tolerance",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Added to the beta, gamma and p3 logits: +9 gives gates near 1 (memory replaced at every step), -9
# gates near 0 (decays near 1: memory kept over the whole sequence, the numerically harder case).
GATE_OFFSETS = {"normal": 0.0, "near1": 9.0, "near0": -9.0}
PROJ_NAMES = ("keys", "queries", "values", "beta", "gamma", "p1", "p2", "p3")
STATE_NAMES = ("tilde_k", "tilde_v", "s")
GATE_INDICES = (3, 4, 7)  # beta, gamma, p3
# Relative error ||got - ref|| / ||ref|| against the float64 oracle: (outputs and state, gradients).
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 1e-2)}


def tolerance(dtype: str, gradient: bool) -> float:
    return TOLERANCES[dtype][1 if gradient else 0]


@dataclass
class Inputs:
    shape: Shape
    dtype: str
    proj: list[torch.Tensor]  # 8 tensors (B, T, H, D) / (B, T, H, eta) in dtype
    dones: torch.Tensor  # (B, T) bool
    state: list[torch.Tensor]  # tilde_k, tilde_v, s in float32
    tick: torch.Tensor  # (B,) int64
    grad_out: torch.Tensor  # (B, T, H, D) in dtype
    rows: torch.Tensor  # (n,) int64: the rows compared with the reference

    @property
    def batch(self) -> int:
        return self.proj[0].shape[0]


def _rows(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if batch <= n:
        return torch.arange(batch)
    third = max(1, n // 3)
    middle = torch.randperm(batch - 2 * third, generator=gen)[: n - 2 * third] + third
    return torch.cat([torch.arange(third), middle.sort().values, torch.arange(batch - third, batch)])


def make_inputs(
    shape: Shape, batch: int, seq_len: int, dtype: str, device: torch.device, gates: str = "normal",
    seed: int = 0, ref_rows: int = 48, done_prob: float = 0.05,
) -> Inputs:  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, H, D, eta, R = batch, seq_len, shape.heads, shape.head_dim, shape.eta, shape.r
    E = eta * D

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device)

    def uniform(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=gen, device=device)

    proj = [normal(B, T, H, D) for _ in range(5)] + [normal(B, T, H, eta) for _ in range(3)]
    for i in GATE_INDICES:
        proj[i] = proj[i] + GATE_OFFSETS[gates]
    dones = uniform(B, T) < done_prob
    dones[0, 0] = True  # a done at the very first step and one inside the sequence, whatever the draw
    dones[-1, T // 2] = True
    state = [uniform(B, R, H, E), normal(B, R, H, D), uniform(B, H, E)]
    tick = torch.randint(1, 10**6, (B,), generator=gen, device=device)
    grad_out = normal(B, T, H, D)
    cast = DTYPES[dtype]
    host_gen = torch.Generator().manual_seed(seed + 1)
    return Inputs(shape, dtype, [p.to(cast) for p in proj], dones, state, tick, grad_out.to(cast),
                  _rows(B, ref_rows, host_gen).to(device))  # fmt: skip


@contextlib.contextmanager
def poisoned(on: bool = True) -> Iterator[bool]:
    """Kernel outputs allocated NaN-filled inside the block; yields whether the hook exists."""
    try:
        from agalite_triton.kernels import launch
    except ImportError:
        yield False
        return
    if not hasattr(launch, "POISON_OUTPUTS"):
        yield False
        return
    saved = launch.POISON_OUTPUTS
    launch.POISON_OUTPUTS = on
    try:
        yield True
    finally:
        launch.POISON_OUTPUTS = saved


def run_recurrence(inp: Inputs, grad: bool, backend: str = "triton", rows: torch.Tensor | None = None,
                   upcast: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Output, final state and (with ``grad``) the gradients of all 8 projections and the 3 state
    tensors, on ``rows`` (all rows if None), in float64 if ``upcast``."""

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t if rows is None else t[rows]
        return t.double() if upcast else t

    proj = [take(p).detach() for p in inp.proj]
    state = [take(s).detach() for s in inp.state]
    dones, tick = take_rows(inp.dones, rows), take_rows(inp.tick, rows)
    if not grad:
        with torch.no_grad():
            out, final = agalite_recurrence(*proj, dones, *state, tick, backend=backend)
        return dict(zip(("out", *STATE_NAMES), (out, *final)))
    leaves = [t.requires_grad_(True) for t in (*proj, *state)]
    out, final = agalite_recurrence(*proj, dones, *state, tick, backend=backend)
    out.backward(take(inp.grad_out))
    got = dict(zip(("out", *STATE_NAMES), (out.detach(), *(f.detach() for f in final))))
    for name, leaf in zip((*PROJ_NAMES, *(f"{n}0" for n in STATE_NAMES)), leaves):
        got[f"d_{name}"] = leaf.grad
    return got


def take_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def reference(inp: Inputs, grad: bool) -> dict[str, torch.Tensor]:
    """The float64 oracle on ``inp.rows``: the reference backend on the same (rounded) inputs, upcast."""
    return run_recurrence(inp, grad, backend="reference", rows=inp.rows, upcast=True)


def recurrence_fn(inp: Inputs, backend: str, backward: bool) -> Callable[[], None]:
    """A timed call of ``agalite_recurrence`` on ``inp``: forward without grad, or forward + backward."""
    if not backward:

        def forward() -> None:
            with torch.no_grad():
                agalite_recurrence(*inp.proj, inp.dones, *inp.state, inp.tick, backend=backend)

        return forward
    leaves = [p.detach().requires_grad_(True) for p in inp.proj]

    def forward_backward() -> None:
        for p in leaves:
            p.grad = None
        out, _ = agalite_recurrence(*leaves, inp.dones, *inp.state, inp.tick, backend=backend)
        out.backward(inp.grad_out)

    return forward_backward


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| where b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    denominator = float(b.norm())
    return float((a - b).norm()) / (denominator if denominator > 0 else 1.0)


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rows: torch.Tensor,
            dtype: str) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """(passed, details): per tensor the relative error on ``rows`` and whether the whole tensor is
    finite (unwritten poisoned elements are NaN; the inputs are finite, so every output must be)."""
    errors: dict[str, float] = {}
    not_finite: list[str] = []
    failed: list[str] = []
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            failed.append(f"{name}: missing")
            continue
        if not bool(torch.isfinite(g).all()):
            not_finite.append(name)
        err = rel_error(g[rows] if g.shape[0] != r.shape[0] else g, r)
        errors[name] = err
        if not err <= tolerance(dtype, name.startswith("d_")):  # NaN fails too
            failed.append(name)
    passed = not failed and not not_finite
    return passed, dict(errors=errors, failed=failed, not_finite=not_finite,
                        max_error=max(errors.values(), default=0.0))  # fmt: skip


def check(inp: Inputs, ref: dict[str, torch.Tensor], grad: bool, backend: str = "triton") -> tuple[bool, dict]:
    """Run the kernels on all rows with poisoned outputs and compare with the oracle."""
    with poisoned() as poison:
        got = run_recurrence(inp, grad, backend=backend)
    passed, detail = compare(got, ref, inp.rows, inp.dtype)
    detail["poisoned"] = poison
    return passed, detail



def run_step(inp: Inputs, how: str) -> dict[str, torch.Tensor]:
    """One step of the kernels on all rows, on copies of the state, three ways: ``in_place`` (the
    public ``agalite_step_``), ``final_out`` (``agalite_recurrence`` writing into the state, as the
    model's rollout does) and ``out_of_place`` (fresh state tensors)."""
    state = [s.clone() for s in inp.state]
    proj = [p.detach() for p in inp.proj]
    with torch.no_grad():
        if how == "in_place":
            from agalite_triton.kernels import agalite_step_

            out = agalite_step_(*(p[:, 0] for p in proj), inp.dones[:, 0], *state, inp.tick).unsqueeze(1)
            final = state
        elif how == "final_out":
            out, final = agalite_recurrence(*proj, inp.dones, *state, inp.tick, backend="triton",
                                            final_out=tuple(state))  # fmt: skip
        elif how == "out_of_place":
            out, final = agalite_recurrence(*proj, inp.dones, *state, inp.tick, backend="triton")
        else:
            raise ValueError(f"how: expected 'in_place', 'final_out' or 'out_of_place', got {how!r}")
    return dict(zip(("out", *STATE_NAMES), (out, *final)))


def case_inputs(case: Case, device: torch.device, ref_rows: int, seed: int = 0) -> Inputs:
    return make_inputs(case.shape, case.batch, case.seq_len, case.dtype, device, case.gates, seed, ref_rows)
