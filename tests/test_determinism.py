"""Determinism: the same inputs give bitwise the same outputs, states and gradients, run after run.

The reference runs on the CPU; the kernels under the interpreter here and natively on a GPU (where
determinism is a real property: the kernels' reductions must not use atomics, whose order of arrival
varies, so every program owns the rows it writes). A static check keeps atomics out of the kernels.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from agalite_triton import AGaLiTe, agalite_recurrence, kernels

kernel_marks = [pytest.mark.interpret,
                pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}")]
BACKENDS = ["reference", pytest.param("triton", marks=kernel_marks)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def recurrence_case(device: str, batch: int = 3, steps: int = 5, heads: int = 2, dim: int = 5, eta: int = 3,
                    r: int = 4):  # fmt: skip
    g = torch.Generator().manual_seed(11)
    proj = [torch.randn(batch, steps, heads, dim, generator=g) for _ in range(5)]
    proj += [torch.randn(batch, steps, heads, eta, generator=g) for _ in range(3)]
    state = [torch.randn(batch, r, heads, eta * dim, generator=g), torch.randn(batch, r, heads, dim, generator=g),
             torch.rand(batch, heads, eta * dim, generator=g)]  # fmt: skip
    dones = torch.rand(batch, steps, generator=g) < 0.2
    tick = torch.arange(batch, dtype=torch.int64) * 7 + 2**33
    return [t.to(device) for t in proj], dones.to(device), [t.to(device) for t in state], tick.to(device)


def run_recurrence(case, backend: str) -> list[torch.Tensor]:
    proj, dones, state, tick = case
    leaves = [t.clone().requires_grad_() for t in (*proj, *state)]
    out, final = agalite_recurrence(*leaves[:8], dones, *leaves[8:], tick, backend=backend)
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in (out, *final))
    return [out.detach(), *(f.detach() for f in final), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrence_forward_and_backward_are_bitwise_repeatable(backend):
    device = DEVICE if backend == "triton" else "cpu"
    case = recurrence_case(device, steps=4)
    first, again = run_recurrence(case, backend), run_recurrence(case, backend)
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"tensor {i} differs between identical runs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_inference_is_bitwise_repeatable(backend):
    """T = 1 without gradients: the acting path (the kernels' one-step kernel)."""
    device = DEVICE if backend == "triton" else "cpu"
    proj, dones, state, tick = recurrence_case(device, steps=1)
    with torch.no_grad():
        results = [agalite_recurrence(*proj, dones, *state, tick, backend=backend) for _ in range(3)]
    for out, final in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(final, results[0][1]))


def run_model(model: AGaLiTe, x: torch.Tensor, dones: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, state = model(x, None, dones)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return [y.detach(), *state, x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_training_step_is_bitwise_repeatable(backend):
    device = DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(0)
    model = AGaLiTe(6, 16, 2, 2, 4, 16, 2, 3, backend=backend).to(device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 6, generator=g).to(device)
    dones = (torch.rand(3, 3, generator=g) < 0.3).to(device)
    first = run_model(model, x, dones)
    again = run_model(model, x, dones)
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"tensor {i} differs between identical runs"


def test_kernels_use_no_atomics():
    """Atomic adds make a reduction's result depend on the order in which programs arrive."""
    sources = sorted((Path(kernels.__file__).parent).glob("*.py"))
    assert sources
    for path in sources:
        code = re.sub(r"#.*", "", path.read_text())
        assert not re.search(r"\batomic_\w+\s*\(", code), f"{path.name} uses an atomic operation"
