"""Triton kernels against the PyTorch reference: outputs, final state and every gradient.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on small odd shapes in float32,
float64, bfloat16 and float16 (16-bit values are only loaded and stored; all arithmetic is fp32); with
CUDA the same checks run on larger shapes in float32 and bfloat16. Every kernel output is
allocated NaN-filled (``launch.POISON_OUTPUTS``), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import agalite_recurrence, kernels
from agalite_triton.kernels import config, launch
from agalite_triton.reference import cpu_fused

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.usefixtures("poison_outputs"),
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
]

CUDA = torch.cuda.is_available()
# Where the kernel tests run: natively on CUDA where there is a GPU, else under the interpreter on CPU
# (conftest sets TRITON_INTERPRET=1 then).
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Relative error bounds ||kernel - reference|| / ||reference||, per tensor.
TOL = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-2, 1e-2),
}  # (outputs and state, gradients)

GATE_LOGITS = {"normal": None, "near0": -9.0, "near1": 9.0, "saturated0": -40.0, "saturated1": 40.0}


def make_dones(pattern: str, batch: int, steps: int, device) -> torch.Tensor | None:
    if pattern == "none":
        return None
    d = torch.zeros(batch, steps, dtype=torch.bool)
    if pattern == "first":
        d[:, 0] = True
    elif pattern == "last":
        d[:, -1] = True
    elif pattern == "consecutive":
        d[:, min(2, steps - 1) : min(5, steps)] = True
    elif pattern == "all":
        d[:] = True
    elif pattern == "mixed":  # a different pattern per row, including none
        for b in range(batch):
            d[b, torch.randperm(steps)[: b % 3]] = True
    else:
        raise ValueError(pattern)
    return d.to(device)


def make_case(
    batch: int,
    steps: int,
    heads: int,
    dim: int,
    eta: int,
    r: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = KERNEL_DEVICE,
    gates: str = "normal",
    dones: str = "mixed",
    init: str = "rand",
    tick: int | list[int] = 5,
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """Projections as strided views of one fused (B, T, H*5D + H*3eta) tensor, as the module makes them."""
    g = torch.Generator().manual_seed(seed)
    n_d = heads * 5 * dim
    fused = torch.randn(batch, steps, n_d + heads * 3 * eta, generator=g, dtype=torch.float64)
    kqvbg = fused[..., :n_d].unflatten(-1, (heads, 5, dim))
    pp = fused[..., n_d:].unflatten(-1, (heads, 3, eta))
    offset = GATE_LOGITS[gates]
    if offset is not None:  # beta, gamma and p3 logits pushed towards a saturated sigmoid
        kqvbg[..., 3:, :] = offset + 0.5 * kqvbg[..., 3:, :]
        pp[..., 2, :] = offset + 0.5 * pp[..., 2, :]
    fused = fused.to(device=device, dtype=dtype)
    kqvbg = fused[..., :n_d].unflatten(-1, (heads, 5, dim))
    pp = fused[..., n_d:].unflatten(-1, (heads, 3, eta))
    proj = list(kqvbg.unbind(-2)) + list(pp.unbind(-2))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(batch, r, heads, eta * dim), (batch, r, heads, dim), (batch, heads, eta * dim)]
    if init == "zero":
        state = [torch.zeros(s, dtype=sdt) for s in shapes]
    else:
        state = [torch.rand(shapes[0], generator=g), torch.randn(shapes[1], generator=g)]
        state.append(torch.rand(shapes[2], generator=g))
    state = [x.to(device=device, dtype=sdt) for x in state]
    ticks = torch.as_tensor(tick if isinstance(tick, list) else [tick + 3 * b for b in range(batch)])
    return proj, make_dones(dones, batch, steps, device), state, ticks.to(device=device, dtype=torch.int64)


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """||got - want|| / max(||want||, floor)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    ref = max(want.norm().item(), floor)
    diff = (got - want).norm().item()
    return diff / ref if ref > 0 else diff


NAMES = ["keys", "queries", "values", "beta", "gamma", "p1", "p2", "p3", "tilde_k", "tilde_v", "s"]


def run_backend(case, backend: str, dtype: torch.dtype, use_out: bool, use_state: bool, seed: int):
    """Forward and backward of ``loss = <out, W> + <final, W_f>`` on fresh leaves cast to ``dtype``."""
    proj, dones, state, tick = case
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.detach().to(dtype).requires_grad_() for x in proj]
    leaves += [x.detach().to(sdt).requires_grad_() for x in state]
    out, final = agalite_recurrence(*leaves[:8], dones, *leaves[8:], tick, backend=backend)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device) for t in (out, *final)]
    loss = out.new_zeros((), dtype=torch.float64)
    if use_out:
        loss = loss + (out.double() * weights[0]).sum()
    if use_state:
        loss = loss + sum((f.double() * w).sum() for f, w in zip(final, weights[1:]))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return [out, *final, *grads]


def check_against_reference(case, dtype, *, use_out: bool = True, use_state: bool = True, seed: int = 1) -> None:
    """Kernel and same-dtype reference, both measured against a float64 reference on the same inputs.

    The kernel must be within the tolerance of the float64 oracle, or, for quantities that are
    ill-conditioned in the case at hand (where the same-dtype reference itself misses the
    tolerance), no worse than 4x the reference's own error. On CPU the reference has two same-dtype
    evaluations (the fused C++ path and the eager one, whose order of operations the kernels share);
    the bound takes the larger of their errors, since either rounding is as valid as the other.
    """
    kernel = run_backend(case, "triton", dtype, use_out, use_state, seed)
    ref = run_backend(case, "reference", dtype, use_out, use_state, seed)
    refs = [ref]
    if case[0][0].device.type == "cpu":
        with cpu_fused.forced(False):
            refs.append(run_backend(case, "reference", dtype, use_out, use_state, seed))
    oracle = run_backend(case, "reference", torch.float64, use_out, use_state, seed)
    names = ["out", "final tilde_k", "final tilde_v", "final s"] + [f"d{n}" for n in NAMES]
    tol_val, tol_grad = TOL[dtype]
    # A tensor 1e-20 times smaller than the largest one (the gradient of a logit near -40 goes through
    # two sigmoids of ~1e-18) is float32 underflow noise in any implementation and moves nothing: it is
    # measured against that scale, not against its own vanishing norm.
    floor = 1e-20 * max(w.norm().item() for w in oracle)
    bad = {}
    for i, (name, got, mine, want) in enumerate(zip(names, kernel, ref, oracle)):
        assert got.dtype == mine.dtype and got.shape == mine.shape, (name, got.dtype, mine.dtype, got.shape)
        err_kernel = rel_err(got.double(), want, floor)
        err_ref = max(rel_err(r[i].double(), want, floor) for r in refs)
        bound = max(tol_val if i < 4 else tol_grad, 4 * err_ref)
        if err_kernel > bound:
            bad[name] = f"{err_kernel:.2e} (reference in {dtype}: {err_ref:.2e})"
    assert not bad, f"relative errors against the float64 reference above tolerance: {bad}"


# (B, T, H, D, eta, R): odd sizes, D never a power of two, T = 33 spans three backward chunks.
SHAPES_CPU = [(2, 1, 2, 3, 1, 1), (2, 7, 2, 5, 3, 2), (1, 33, 2, 6, 4, 3), (2, 7, 1, 12, 3, 8)]
SHAPES_GPU = [(4, 1, 4, 64, 4, 2), (8, 100, 4, 64, 4, 2), (3, 257, 3, 48, 3, 7), (2, 64, 2, 96, 1, 8)]
# "small": the small shapes, on the kernel device (the interpreter on CPU; CUDA where there is one);
# "large": the GPU shapes, on CUDA only.
DEVICES_DTYPES = [
    pytest.param("small", torch.float32, id="small-fp32"),
    # The interpreter cannot do bf16 arithmetic, but the kernels only load and store 16-bit values.
    pytest.param("small", torch.bfloat16, id="small-bf16"),
    pytest.param("small", torch.float16, id="small-fp16"),
    pytest.param("large", torch.float32, id="large-fp32", marks=[requires_cuda, pytest.mark.gpu]),
    pytest.param("large", torch.bfloat16, id="large-bf16", marks=[requires_cuda, pytest.mark.gpu]),
]


def _shapes(size: str) -> list[tuple[int, ...]]:
    return SHAPES_CPU if size == "small" else SHAPES_GPU


def _device(size: str) -> str:
    return KERNEL_DEVICE if size == "small" else "cuda"


@pytest.mark.parametrize("size,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("shape_idx", range(4))
def test_shapes(size, dtype, shape_idx):
    shape = _shapes(size)[shape_idx]
    check_against_reference(make_case(*shape, dtype=dtype, device=_device(size), seed=shape_idx), dtype)


@pytest.mark.parametrize("size,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("dones", ["none", "first", "last", "consecutive", "all"])
def test_done_patterns(size, dtype, dones):
    shape = _shapes(size)[1]
    check_against_reference(make_case(*shape, dtype=dtype, device=_device(size), dones=dones), dtype)


@pytest.mark.parametrize("size,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("gates", ["near0", "near1", "saturated0", "saturated1"])
def test_gate_extremes(size, dtype, gates):
    shape = _shapes(size)[1]
    check_against_reference(make_case(*shape, dtype=dtype, device=_device(size), gates=gates), dtype)


@pytest.mark.parametrize("size,dtype", DEVICES_DTYPES)
def test_zero_initial_state(size, dtype):
    shape = _shapes(size)[1]
    check_against_reference(make_case(*shape, dtype=dtype, device=_device(size), init="zero"), dtype)


@pytest.mark.parametrize("size,dtype", DEVICES_DTYPES)
def test_huge_ticks(size, dtype):
    shape = _shapes(size)[3]  # R = 8: period 14, every residue matters
    ticks = [2**62 + 11, -(2**62) - 5][: shape[0]]
    check_against_reference(make_case(*shape, dtype=dtype, device=_device(size), tick=ticks), dtype)


@pytest.mark.parametrize("size,dtype", DEVICES_DTYPES)
@pytest.mark.parametrize("use", ["out_only", "state_only"])
def test_partial_losses(size, dtype, use):
    """Unused outputs reach the backward as absent gradients, not zeros: both paths must work."""
    shape = _shapes(size)[1]
    case = make_case(*shape, dtype=dtype, device=_device(size))
    check_against_reference(case, dtype, use_out=use == "out_only", use_state=use == "state_only")


def test_float64_oracle():
    check_against_reference(make_case(2, 19, 2, 5, 3, 3, dtype=torch.float64, dones="mixed"), torch.float64)


def test_chunk_boundaries_exact_multiple():
    """T a multiple of the checkpoint interval: no partial chunk, dones on the chunk boundaries."""
    chunk = config.get_config("forward", 2, 2, 4).chunk
    steps = 2 * chunk
    case = make_case(1, steps, 1, 3, 2, 2, dones="none", seed=3)
    proj, _, state, tick = case
    dones = torch.zeros(1, steps, dtype=torch.bool)
    dones[0, [chunk - 1, chunk]] = True
    check_against_reference((proj, dones, state, tick), torch.float32)


def test_float_dones_and_contiguous_inputs():
    """Dones given as 0/1 floats, projections as separate contiguous tensors (other strides)."""
    proj, dones, state, tick = make_case(2, 7, 2, 5, 3, 2, dones="consecutive")
    proj = [p.contiguous() for p in proj]
    check_against_reference((proj, dones.float(), state, tick), torch.float32)


def test_no_grad_keeps_no_checkpoints_and_matches():
    proj, dones, state, tick = make_case(2, 7, 2, 5, 3, 2)
    with torch.no_grad():
        out_k, fin_k = agalite_recurrence(*proj, dones, *state, tick, backend="triton")
        out_r, fin_r = agalite_recurrence(*proj, dones, *state, tick, backend="reference")
    assert rel_err(out_k, out_r) <= 1e-5
    for a, b in zip(fin_k, fin_r):
        assert rel_err(a, b) <= 1e-5
    assert out_k.dtype == proj[0].dtype and all(f.dtype == torch.float32 for f in fin_k)


def test_inputs_are_not_modified():
    proj, dones, state, tick = make_case(2, 7, 2, 5, 3, 2)
    before = [x.clone() for x in proj + state + [tick]]
    agalite_recurrence(*proj, dones, *state, tick, backend="triton")
    for a, b in zip(before, proj + state + [tick]):
        assert torch.equal(a, b)


def test_poisoned_outputs_are_nan():
    """The NaN fill is real, so the comparisons above would see an unwritten element."""
    buf = launch.new_output((3, 2), torch.float32, torch.device("cpu"))
    assert torch.isnan(buf).all()


def test_autocast_bf16_model_matches_reference():
    """Under a bf16 autocast region the projections reach the recurrence in bf16: the kernel backend
    accepts them and returns bf16 like the reference. Against the float32 model, the kernel backend's
    outputs and gradients must be about as accurate as the reference backend's under the same autocast."""
    from agalite_triton import AGaLiTe

    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)
    results = {}
    for backend, autocast in (("triton", True), ("reference", True), ("reference", False)):
        torch.manual_seed(0)
        model = AGaLiTe(5, d_model=16, n_layers=1, n_heads=2, d_head=6, d_ffc=16, eta=2, r=3, backend=backend)
        model = model.to(KERNEL_DEVICE)
        with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y, state = model(x, model.initial_state(2))
        assert state.tilde_k.dtype == torch.float32
        grads = torch.autograd.grad(y.float().square().sum(), list(model.parameters()))
        results[backend, autocast] = [y, *state[:3], *grads]
    kernel, ref, oracle = results["triton", True], results["reference", True], results["reference", False]
    for i, (got, mine, want) in enumerate(zip(kernel, ref, oracle)):
        assert got.dtype == mine.dtype
        err_kernel, err_ref = rel_err(got, want), rel_err(mine, want)
        assert err_kernel <= max(1e-2, 1.5 * err_ref), (i, err_kernel, err_ref)
