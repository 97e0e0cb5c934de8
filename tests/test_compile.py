"""torch.compile: the kernel ops trace without graph breaks and compiled models match eager.

On CPU the kernel ops run under the Triton interpreter, so their checks use the ``aot_eager`` compile
backend (full Dynamo + AOTAutograd tracing through the fake implementations and the registered
backward, without Inductor code generation). With CUDA the kernel model is compiled with Inductor.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import AGaLiTe, agalite_recurrence, kernels

from .test_kernels import make_case, rel_err

CUDA = torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(backend: str, device: str = "cpu") -> AGaLiTe:
    torch.manual_seed(0)
    model = AGaLiTe(5, d_model=16, n_layers=1, n_heads=2, d_head=6, d_ffc=16, eta=2, r=3, backend=backend)
    return model.to(device)


def run_model(model, x, dones):
    state = model.initial_state(x.shape[0], device=x.device)
    y, new_state = model(x, state, dones)
    loss = y.square().sum() + new_state.tilde_v.sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return [y, *new_state[:3], *grads]


def assert_close_lists(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= tol, f"tensor {i}: {rel_err(a, b):.2e}"


def test_compiled_reference_model_matches_eager():
    """Inductor for the forward (its C++ build of forward and backward would take over a minute on
    two cores); the gradients through AOTAutograd with the ``aot_eager`` backend."""
    model = tiny_model("reference")
    x = torch.randn(2, 2, 5)
    dones = torch.tensor([[False, True], [False, False]])
    eager = run_model(model, x, dones)
    with torch.no_grad():
        y, state = torch.compile(model, fullgraph=True)(x, model.initial_state(2), dones)
    assert_close_lists([y, *state[:3]], eager[:4], 1e-5)
    torch._dynamo.reset()
    # fullgraph=True: the reference recurrence, its custom autograd Function included, traces whole.
    compiled = run_model(torch.compile(model, backend="aot_eager", fullgraph=True), x, dones)
    assert_close_lists(compiled, eager, 1e-5)


@needs_kernels
@pytest.mark.interpret
def test_kernel_recurrence_traces_in_one_graph():
    """fullgraph=True fails on any graph break; outputs and every gradient match eager."""
    proj, dones, state, tick = make_case(2, 5, 2, 5, 3, 2, dones="mixed")

    def f(*leaves):
        out, final = agalite_recurrence(*leaves[:8], dones, *leaves[8:], tick, backend="triton")
        return (out * out).sum() + sum(x.sum() for x in final[:2]) + final[2].square().sum(), out

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [x.detach().clone().requires_grad_() for x in proj + state]
        loss, out = fn(*leaves)
        results.append([out, *torch.autograd.grad(loss, leaves)])
    assert_close_lists(results[1], results[0], 1e-6)


@needs_kernels
@pytest.mark.interpret
def test_kernel_model_has_no_graph_break():
    model = tiny_model("triton")
    x = torch.randn(2, 3, 5)
    explanation = torch._dynamo.explain(model)(x, model.initial_state(2), None)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    single = torch._dynamo.explain(model)(x[:, 0], model.initial_state(2), None)  # T = 1: the step op
    assert single.graph_break_count == 0, single.break_reasons


@needs_kernels
@pytest.mark.interpret
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of every op."""
    proj, dones, state, tick = make_case(1, 3, 2, 3, 2, 2, dones="first")
    leaves = [x.detach().clone().requires_grad_() for x in proj + state]
    ops = torch.ops.agalite_triton
    torch.library.opcheck(ops.recurrence_fwd, (*leaves[:8], dones, *leaves[8:], tick, 1e-5, True))
    step = [p[:, 0].detach() for p in proj]
    torch.library.opcheck(ops.step, (*step, dones[:, 0], *state, tick, 1e-5))
    torch.library.opcheck(ops.step_, (*step, None, *[x.clone() for x in state], tick, 1e-5))
    buffers = [torch.empty_like(x) for x in state]
    torch.library.opcheck(ops.step_into, (*step, dones[:, 0], *state, tick, 1e-5, *buffers))


@needs_kernels
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compiled_kernel_model_matches_eager_on_cuda():
    model = tiny_model("triton", "cuda")
    x = torch.randn(2, 17, 5, device="cuda")
    dones = torch.zeros(2, 17, dtype=torch.bool, device="cuda")
    dones[0, 5] = True
    eager = run_model(model, x, dones)
    compiled = run_model(torch.compile(model, fullgraph=True), x, dones)
    assert_close_lists(compiled, eager, 1e-5)
