"""Numerical extremes: saturated gates, all-zero query features, huge inputs and low-precision dtypes.

Every case runs forward and backward through ``agalite_recurrence`` (reference, and the Triton kernels,
under the interpreter on CPU) and is compared with a float64 evaluation of the same (rounded) inputs by
the reference, which serves as the oracle. Criterion, per tensor (outputs, final state and all eleven
gradients): ``max|got - oracle| <= tol * max(1, max|oracle|)``, the golden fixtures' criterion, with
``tol`` 1e-4 for float32, 4e-3 for float16 and 3e-2 for bfloat16 inputs (their rounding, 2**-11 and
2**-8, times a small factor; the state is float32 whatever the input dtype). No clamping or other
stability measure is applied anywhere; none is needed for these cases to be finite.

Gate logits need no allowance: both paths form sigma'(x) as sigma(x) sigma(-x) and the decay
1 - sigma(p3) sigma(gamma) as sigma(-p3) + sigma(p3) sigma(-gamma). Computed as ``y (1 - y)`` and ``1 - G``
from a rounded y (as torch's sigmoid backward and the original do), they would carry an absolute error of
about 2**-24, a large relative error once y nears 1 (logits ~10 to ~17: 3% on one element of the 1e4 case).
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import AGaLiTe, agalite_recurrence, kernels

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NAMES = ["out", "tilde_k", "tilde_v", "s"] + [
    f"d{n}" for n in ("keys", "queries", "values", "beta", "gamma", "p1", "p2", "p3", "tilde_k", "tilde_v", "s")
]
B, T, H, D, ETA, R = 3, 4, 2, 3, 2, 3

kernel_marks = [pytest.mark.interpret,
                pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}")]
BACKENDS = ["reference", pytest.param("triton", marks=kernel_marks)]


def make_case(seed: int = 0, gate_logit: float | None = None, scale: float = 1.0):
    """float64 projections (B, T, H, *), a random float64 state, dones and ticks.

    ``gate_logit``: beta, gamma and p3 logits set to +-|gate_logit| with a random sign per element (both
    saturated regimes at once: decay exactly 0 and exactly 1 in float32).
    """
    g = torch.Generator().manual_seed(seed)
    proj = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * scale for _ in range(5)]
    proj += [torch.randn(B, T, H, ETA, generator=g, dtype=torch.float64) * scale for _ in range(3)]
    if gate_logit is not None:
        for i in (3, 4, 7):
            sign = torch.randint(0, 2, proj[i].shape, generator=g, dtype=torch.float64) * 2 - 1
            proj[i] = sign * gate_logit
    state = [torch.randn(B, R, H, ETA * D, generator=g, dtype=torch.float64),
             torch.randn(B, R, H, D, generator=g, dtype=torch.float64),
             torch.rand(B, H, ETA * D, generator=g, dtype=torch.float64)]  # fmt: skip
    dones = torch.zeros(B, T, dtype=torch.bool)
    dones[1, 2] = True
    tick = torch.tensor([1, 8, 2**40], dtype=torch.int64)
    return proj, state, dones, tick


def run(case, dtype: torch.dtype, backend: str, device: str = "cpu", seed: int = 1) -> list[torch.Tensor]:
    """Outputs, final state and gradients of ``<out, W> + sum <final, W_f>`` in ``dtype``, on the CPU."""
    proj, state, dones, tick = case
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [p.to(device=device, dtype=dtype).requires_grad_() for p in proj]
    leaves += [s.to(device=device, dtype=sdt).requires_grad_() for s in state]
    out, final = agalite_recurrence(*leaves[:8], dones.to(device), *leaves[8:], tick.to(device), backend=backend)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device) for t in (out, *final)]
    loss = sum((t.double() * w).sum() for t, w in zip((out, *final), weights))
    grads = torch.autograd.grad(loss, leaves)
    return [t.cpu() for t in (out, *final, *grads)]


def oracle(case) -> list[torch.Tensor]:
    return run(case, torch.float64, "reference")


def rounded(case, dtype: torch.dtype):
    """The case with its projections and state rounded to what a ``dtype`` run sees: the oracle then
    measures the error of the computation, not of rounding the inputs."""
    proj, state, dones, tick = case
    return [p.to(dtype).double() for p in proj], [s.float().double() for s in state], dones, tick


def assert_close_to_oracle(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    bad = {}
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double() - b).abs()
        bound = tol * max(1.0, b.abs().max().item())
        if err.max().item() > bound:
            bad[name] = f"{err.max().item():.2e} > {bound:.2e}"
    assert not bad, f"errors against the float64 oracle: {bad}"


EXTREMES = {
    "gates_saturated_30": dict(gate_logit=30.0),
    "gates_saturated_100": dict(gate_logit=100.0),
    "magnitude_1e4": dict(scale=1e4),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EXTREMES))
def test_extremes_are_finite_and_match_float64(name, backend):
    case = make_case(**EXTREMES[name])
    got = run(case, torch.float32, backend)
    exact = rounded(case, torch.float32)
    assert_close_to_oracle(got, oracle(exact), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_gates_give_exact_decays(backend):
    """Logit +100: G = 1 in float32, so the memory is replaced by this step's input exactly (decay 0), and
    logit -100: G ~ 4e-44, the memory is kept (decay 1): the final state is exact, not approximately so."""
    proj, state, dones, tick = make_case(seed=3)
    proj = [p.float() for p in proj]
    state = [s.float() for s in state]
    for i in (3, 4, 7):
        proj[i] = torch.full_like(proj[i], -100.0)
    with torch.no_grad():
        _, (tk, tv, s) = agalite_recurrence(*proj, None, *state, tick, backend=backend)
    # Decay exactly 1 and an input of at most 4e-44 * |K|: the memory comes back unchanged.
    assert torch.equal(tv, state[1])
    assert torch.allclose(tk, state[0], rtol=0, atol=1e-30) and torch.allclose(s, state[2], rtol=0, atol=1e-30)
    for i in (3, 4, 7):
        proj[i] = torch.full_like(proj[i], 100.0)
    with torch.no_grad():
        _, (tk, tv, s) = agalite_recurrence(*proj, None, *state, tick, backend=backend)
        _, (tk0, tv0, s0) = agalite_recurrence(*(p[:, -1:] for p in proj), None, *(torch.zeros_like(x) for x in state),
                                               tick + T - 1, backend=backend)  # fmt: skip
    # Decay exactly 0: only the last step's input remains, as if from zero memory.
    assert torch.equal(tk, tk0) and torch.equal(tv, tv0) and torch.equal(s, s0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("off", ["queries", "p2"])
def test_zero_query_features_give_exact_zero_output(backend, off):
    """relu(q) = 0 (or relu(p2) = 0) for a head: <s, Q> = 0 and kv = 0, so out = 0 / eps = 0 exactly, and
    no gradient flows to the switched-off factor; everything stays finite."""
    case = make_case(seed=5)
    proj = case[0]
    idx = 1 if off == "queries" else 6
    proj[idx] = proj[idx].clone()
    proj[idx][:, :, 0] = -proj[idx][:, :, 0].abs() - 0.1  # head 0 off at every step, head 1 normal
    got = run(case, torch.float32, backend)
    out, dq = got[0], got[4 + idx]
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert out[:, :, 1].abs().max() > 0
    assert torch.equal(dq[:, :, 0], torch.zeros_like(dq[:, :, 0]))
    assert_close_to_oracle(got, oracle(rounded(case, torch.float32)), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_keys_from_zero_memory_give_exact_zero_output(backend):
    """relu(k) = 0 at every step from zero memory: s = 0, so the normaliser is exactly eps and out = 0."""
    proj, state, dones, tick = make_case(seed=6)
    proj = [p.float() for p in proj]
    proj[0] = -proj[0].abs()
    zeros = [torch.zeros(s.shape) for s in state]
    with torch.no_grad():
        out, (tk, _, s) = agalite_recurrence(*proj, dones, *zeros, tick, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(s, zeros[2]) and torch.equal(tk, zeros[0])


LOW_PRECISION = [
    pytest.param(torch.bfloat16, "reference", id="bf16-reference"),
    pytest.param(torch.float16, "reference", id="fp16-reference"),
    pytest.param(torch.bfloat16, "triton", id="bf16-triton", marks=[
        *kernel_marks, pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter has no bf16 arithmetic")]),
    pytest.param(torch.float16, "triton", id="fp16-triton", marks=[
        *kernel_marks, pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="low-precision kernels are tested on a GPU")]),
]  # fmt: skip


@pytest.mark.parametrize("gates", [None, 30.0], ids=["normal", "saturated"])
@pytest.mark.parametrize("dtype,backend", LOW_PRECISION)
def test_low_precision_inputs_match_float64(dtype, backend, gates):
    case = make_case(seed=7, gate_logit=gates)
    got = run(case, dtype, backend, device="cuda" if backend == "triton" else "cpu")
    # Read-out and projection gradients in the input dtype; the state and its gradients in float32.
    for i, (name, t) in enumerate(zip(NAMES, got)):
        want_dtype = dtype if i == 0 or 4 <= i < 12 else torch.float32
        assert t.dtype == want_dtype, f"{name}: {t.dtype}, expected {want_dtype}"
    exact = rounded(case, dtype)
    assert_close_to_oracle(got, oracle(exact), TOL[dtype])


# ------------------------------------------------------------------------------------- whole model
def _model_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = AGaLiTe(6, 16, 2, 2, 4, 24, 2, 3, backend="reference")
    oracle_model = AGaLiTe(6, 16, 2, 2, 4, 24, 2, 3, backend="reference").double()
    oracle_model.load_state_dict(model.state_dict())
    return model, oracle_model


def _model_run(model: AGaLiTe, x: torch.Tensor, dones: torch.Tensor):
    x = x.clone().requires_grad_()
    y, state = model(x, None, dones)
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
    loss = (y.double() * w).sum()
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [y, *state.memories(), *grads]


# (dtype, input scale, tolerance on outputs and memories, on gradients). float32 at magnitude 1e4: the GRU
# gates saturate, and their sigmoid backward carries the rounding described in the module docstring
# (measured 3.4e-4 on one parameter gradient). bfloat16 parameters and activations throughout, with no
# float32 master copy: values to 2**-8 per operation (measured 2.4e-2); gradients are judged by
# direction (cosine similarity with the float64 gradient, measured >= 0.992) and must be finite.
MODEL_CASES = [
    pytest.param(torch.float32, 1e4, 3e-4, 1e-3, id="fp32-magnitude-1e4"),
    pytest.param(torch.bfloat16, 1.0, 5e-2, None, id="bf16"),
]


@pytest.mark.parametrize("dtype,scale,tol,grad_tol", MODEL_CASES)
def test_model_outputs_and_parameter_gradients_match_float64(dtype, scale, tol, grad_tol):
    """The whole stack (LayerNorm, gates, FFN) with inputs of magnitude 1e4, or in bfloat16 (reference path):
    every output, memory and parameter gradient is finite and close to a float64 copy of the model."""
    model, oracle_model = _model_pair()
    model = model.to(dtype)
    oracle_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})  # same rounded weights
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 9, 6, generator=g) * scale).to(dtype)
    dones = torch.zeros(3, 9, dtype=torch.bool)
    dones[0, 4] = True
    got = _model_run(model, x, dones)
    want = _model_run(oracle_model, x.double(), dones)
    bad = {}
    names = ["y", "tilde_k", "tilde_v", "s", "dx"] + [f"d{n}" for n, _ in model.named_parameters()]
    for i, (name, a, b) in enumerate(zip(names, got, want)):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        if i < 4 or grad_tol is not None:
            err, bound = (a.double() - b).abs().max().item(), (tol if i < 4 else grad_tol) * max(1.0, b.abs().max().item())
            if err > bound:
                bad[name] = f"{err:.2e} > {bound:.2e}"
        elif b.abs().max() > 0:
            cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.flatten(), dim=0).item()
            if cos < 0.98:
                bad[name] = f"cosine similarity {cos:.4f} < 0.98"
    assert not bad, bad
