"""Correctness gate: a backend (or a GTrXL inference mode) is timed only if it agrees with the reference.

Each check runs a small input in float32 and compares every output with
``max|got - ref| <= tol * max(1, max|ref|)`` per tensor (the conformance tolerance of
/work/shared/golden/README.md for AGaLiTe; 1e-5 for GTrXL's two modes, which compute the same maths).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from agalite_triton import AGaLiTe, agalite_recurrence

from .baselines import GTrXL
from .recurrence import RecurrenceShape, recurrence_inputs
from .systems import training_state

__all__ = ["AGALITE_TOL", "GTRXL_TOL", "GateResult", "gate_gtrxl", "gate_model", "gate_recurrence"]

AGALITE_TOL = 1e-4
GTRXL_TOL = 1e-5


@dataclass(frozen=True)
class GateResult:
    check: str  # "recurrence" | "model" | "gtrxl-modes"
    backend: str  # the backend (or GTrXL mode) under test
    passed: bool
    max_error: float | None  # the largest max|got - ref| / max(1, max|ref|) over the compared tensors
    tolerance: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _worst(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            raise ValueError(f"shape {tuple(g.shape)} differs from the reference's {tuple(r.shape)}")
        g, r = g.detach().double(), r.detach().double()
        err = (g - r).abs().max().item() / max(1.0, r.abs().max().item()) if r.numel() else 0.0
        worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
    return worst


def _judge(check: str, backend: str, tol: float, compare: Callable[[], float]) -> GateResult:
    try:
        err = compare()
    except Exception as exc:  # a backend that cannot run is refused with the reason
        return GateResult(check, backend, False, None, tol, f"{type(exc).__name__}: {exc}")
    ok = err <= tol
    return GateResult(check, backend, ok, err, tol, "agrees with the reference" if ok else "disagrees")


def _run_recurrence(
    impl: Callable[..., Any], proj: list[torch.Tensor], dones: torch.Tensor, state: list[torch.Tensor],
    grad_out: torch.Tensor,
) -> list[torch.Tensor]:  # fmt: skip
    leaves = [p.detach().clone().requires_grad_(True) for p in proj]
    out, final = impl(*leaves, dones, *state)
    out.backward(grad_out)
    return [out, *final, *(p.grad for p in leaves)]


def gate_recurrence(backend: str, device: torch.device, impl: Callable[..., Any] | None = None) -> GateResult:
    """``agalite_recurrence`` on ``backend`` (or ``impl``, same signature without ``backend``) against the
    reference: output, final state and the gradients of all eight projections, with dones inside T."""
    if impl is None:
        if backend == "reference":
            return GateResult("recurrence", backend, True, 0.0, AGALITE_TOL, "the reference itself")
        impl = functools.partial(agalite_recurrence, backend=backend)
    reference = functools.partial(agalite_recurrence, backend="reference")

    def compare() -> float:
        proj, dones, state = recurrence_inputs(RecurrenceShape("gate", 2, 8, 3, 3), 3, 11, device,
                                               done_prob=0.2, seed=123)  # fmt: skip
        dones[1, 4] = True
        grad_out = torch.randn(proj[0].shape, generator=torch.Generator().manual_seed(5)).to(device)
        return _worst(_run_recurrence(impl, proj, dones, state, grad_out),
                      _run_recurrence(reference, proj, dones, state, grad_out))  # fmt: skip

    return _judge("recurrence", backend, AGALITE_TOL, compare)


def gate_model(backend: str, device: torch.device) -> GateResult:
    """A small AGaLiTe on ``backend`` against the same weights on the reference: outputs and new state."""
    if backend == "reference":
        return GateResult("model", backend, True, 0.0, AGALITE_TOL, "the reference itself")

    def compare() -> float:
        torch.manual_seed(7)
        sizes = dict(input_dim=6, d_model=32, n_layers=2, n_heads=2, d_head=8, d_ffc=24, eta=3, r=3)
        ref = AGaLiTe(**sizes, backend="reference").to(device)
        test = AGaLiTe(**sizes, backend=backend).to(device)
        test.load_state_dict(ref.state_dict())
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(3, 9, 6, generator=gen).to(device)
        dones = (torch.rand(3, 9, generator=gen) < 0.2).to(device)
        state = training_state(ref, 3, device, seed=3)
        with torch.no_grad():
            y_ref, s_ref = ref(x, state, dones)
            y, s = test(x, state, dones)
        return _worst([y, *s.memories()], [y_ref, *s_ref.memories()])

    return _judge("model", backend, AGALITE_TOL, compare)


def gate_gtrxl(device: torch.device, steps: int = 12, memory: int = 5) -> GateResult:
    """GTrXL's kv_cache steps against recompute steps, across dones and after the ring wraps."""

    def compare() -> float:
        torch.manual_seed(7)
        model = GTrXL(6, d_model=32, n_layers=2, n_heads=2, d_head=8, d_ff=24, memory=memory).to(device)
        gen = torch.Generator().manual_seed(13)
        x = torch.randn(3, steps, 6, generator=gen).to(device)
        dones = (torch.rand(3, steps, generator=gen) < 0.2).to(device)
        got, ref = [], []
        with torch.no_grad():
            cache, memory_state = model.cache_state(3, device), model.memory_state(3, device)
            for t in range(steps):
                y, cache = model(x[:, t], cache, dones[:, t])
                y_ref, memory_state = model(x[:, t], memory_state, dones[:, t])
                got.append(y)
                ref.append(y_ref)
        return _worst(got, ref)

    return _judge("gtrxl-modes", "kv_cache", GTRXL_TOL, compare)
