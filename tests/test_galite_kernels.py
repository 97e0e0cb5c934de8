"""GaLiTe's Triton kernels against its eager reference: outputs, final memory and every gradient, with
dones, non-zero initial memory, restarts and slots, on odd sizes (D not a power of two, nu = 1 and 3,
T = 1 and T not a multiple of the checkpoint interval), the value rows split over several programs.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest). Every kernel output is allocated
NaN-filled (``launch.POISON_OUTPUTS``), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import galite_recurrence, kernels
from agalite_triton.kernels import config, galite_step_
from agalite_triton.kernels.config import SIZE_CLASSES, LaunchConfig

from .test_kernels import KERNEL_DEVICE, TOL, make_case, rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.usefixtures("poison_outputs"),
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
]
DEV = KERNEL_DEVICE
GALITE_KERNELS = ("galite_forward", "galite_backward", "galite_step")


def galite_table(chunk: int = 16, rows: int = 16, bwd_rows: int | None = None) -> config.Table:
    """Every GaLiTe entry at these values (the backward's rows may differ from the forward's)."""
    table = {k: {c: LaunchConfig(2, chunk=chunk, rows=rows) for c in SIZE_CLASSES} for k in GALITE_KERNELS}
    if bwd_rows is not None:
        table["galite_backward"] = {c: LaunchConfig(2, chunk=chunk, rows=bwd_rows) for c in SIZE_CLASSES}
    return table


# Chunks of 3 and value rows split 2 (forward, step) and 4 (backward) at a time: several row blocks, a
# partial last chunk, and a backward whose blocks differ from the forward's.
SPLIT = galite_table(chunk=3, rows=2, bwd_rows=4)


def galite_case(batch, steps, heads, dim, nu, *, dtype=torch.float32, dones="mixed", gates="normal", init="rand",
                seed=0):  # fmt: skip
    """AGaLiTe's test projections (``make_case``: strided views of one fused projection, as the module makes
    them, eta = nu) and dones, and a GaLiTe memory (C ~ N(0, 1), s ~ U(0, 1) as the fixtures, or zero)."""
    with torch.random.fork_rng(devices=[]):  # make_dones draws its "mixed" rows from the global generator
        torch.manual_seed(seed)
        proj, done_flags, _, _ = make_case(batch, steps, heads, dim, nu, 1, dtype=dtype, device=DEV, gates=gates,
                                           dones=dones, seed=seed)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.randn(batch, heads, dim, nu * dim, generator=g, dtype=torch.float64)
    s = torch.rand(batch, heads, nu * dim, generator=g, dtype=torch.float64)
    if init == "zero":
        c, s = torch.zeros_like(c), torch.zeros_like(s)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return proj, done_flags, [x.to(device=DEV, dtype=sdt) for x in (c, s)]


def run_backend(case, backend, dtype, *, use_out=True, use_state=True, restart=None, seed=1):
    """Forward and backward of ``<out, W> + <final, W_f>`` on fresh leaves cast to ``dtype``."""
    proj, dones, memory = case
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.detach().to(dtype).requires_grad_() for x in proj]
    leaves += [x.detach().to(sdt).requires_grad_() for x in memory]
    if restart is not None:
        leaves += [x.detach().to(sdt).requires_grad_() for x in restart[1:]]
        restart = (restart[0], *leaves[10:])
    out, final = galite_recurrence(*leaves[:8], dones, *leaves[8:10], backend=backend, restart=restart)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device) for t in (out, *final)]
    loss = out.new_zeros((), dtype=torch.float64)
    if use_out:
        loss = loss + (out.double() * weights[0]).sum()
    if use_state:
        loss = loss + sum((f.double() * w).sum() for f, w in zip(final, weights[1:]))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return [out, *final, *grads]


NAMES = ["out", "final c", "final s"] + [f"d{n}" for n in ("k", "q", "v", "beta", "gamma", "p1", "p2", "p3", "c", "s")]


def check_against_reference(case, dtype=torch.float32, table=None, **kw) -> list[torch.Tensor]:
    """The kernel within the tolerance of the float64 reference, or no worse than 4x the same-dtype
    reference where that misses it (an ill-conditioned quantity); returns the kernel's tensors."""
    with config.use_table(table or {}):
        kernel = run_backend(case, "triton", dtype, **kw)
    ref = run_backend(case, "reference", dtype, **kw)
    oracle = run_backend(case, "reference", torch.float64, **kw)
    names = NAMES + ["dc_r", "ds_r"]
    tol_val, tol_grad = TOL[dtype]
    # As test_kernels, a tensor far smaller than the largest is measured against a floor: in float32 below
    # 1e-20 of it (underflow noise); in float64 below 1e-4 of it, since there the oracle is the same maths in
    # the same dtype (its own error is 0), and a gradient that vanishes mathematically (that of p2 where one
    # factor of Q is positive: the read-out is invariant to its scale) is left as cancellation noise of
    # 1e-15 of the terms, in either implementation.
    floor = (1e-4 if dtype == torch.float64 else 1e-20) * max(w.norm().item() for w in oracle)
    bad = {}
    for i, (name, got, mine, want) in enumerate(zip(names, kernel, ref, oracle)):
        assert got.dtype == mine.dtype and got.shape == mine.shape, (name, got.dtype, mine.dtype, got.shape)
        err_kernel, err_ref = rel_err(got, want, floor), rel_err(mine, want, floor)
        if err_kernel > max(tol_val if i < 3 else tol_grad, 4 * err_ref):
            bad[name] = f"{err_kernel:.2e} (reference in {dtype}: {err_ref:.2e})"
    assert not bad, f"relative errors against the float64 reference above tolerance: {bad}"
    return kernel


# (B, T, H, D, nu), table: T = 1 through the sequence kernels (gradients); D = 5, nu = 3 over three row
# blocks and chunks of 3 (T = 7: a partial last chunk); D = 12, nu = 1 over two blocks of the default 8.
CASES = [
    pytest.param((2, 1, 2, 3, 1), None, id="T1-D3-nu1"),
    pytest.param((2, 7, 2, 5, 3), SPLIT, id="T7-D5-nu3-split"),
    pytest.param((3, 5, 1, 12, 1), None, id="T5-D12-nu1"),
]


@pytest.mark.parametrize("shape,table", CASES)
def test_matches_reference(shape, table):
    check_against_reference(galite_case(*shape, seed=sum(shape)), table=table)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    """float64 keeps a float64 memory and accumulation; bfloat16 values are only loaded and stored."""
    check_against_reference(galite_case(2, 4, 1, 5, 3, dtype=dtype, seed=5), dtype, table=SPLIT)


@pytest.mark.parametrize("gates,dones", [("saturated1", "all"), ("near1", "consecutive"), ("saturated0", "none")])
def test_gate_extremes_and_done_patterns(gates, dones):
    check_against_reference(galite_case(2, 6, 1, 5, 2, gates=gates, dones=dones, seed=3), table=SPLIT)


@pytest.mark.parametrize("use", ["out_only", "state_only"])
def test_partial_losses(use):
    """Unused outputs reach the backward as absent gradients, not zeros: both paths must work."""
    case = galite_case(2, 5, 2, 5, 3, init="zero", seed=4)
    check_against_reference(case, table=SPLIT, use_out=use == "out_only", use_state=use == "state_only")


def test_restart_gradients_reach_the_restart_memories():
    case = galite_case(3, 7, 1, 5, 3, seed=6)
    _, _, rmem = galite_case(4, 1, 1, 5, 3, seed=7)
    index = torch.full((3, 7), -1, device=DEV)
    index[0, 0], index[0, 3] = 1, 0  # t = 0 overrides the initial memory; a restart on a chunk boundary
    index[1, 4], index[1, 5], index[1, 6] = 2, 3, 2  # consecutive restarts inside a chunk; a row used twice
    got = check_against_reference(case, table=SPLIT, restart=(index, *rmem))
    assert all(float(g[0].abs().max()) == 0 for g in got[11:13])  # row 0 restarts at t = 0
    assert all(float(g.abs().max()) > 0 for g in got[13:])


def test_restart_one_step_inference_writes_into_the_memory():
    """T = 1 with restart and final_out (a rollout step that restarts some rows): the forward kernel
    reads the restart rows through the index and writes the memory in place."""
    proj, dones, memory = galite_case(3, 1, 2, 5, 3, dones="mixed", seed=16)
    _, _, rmem = galite_case(2, 1, 2, 5, 3, seed=17)
    index = torch.tensor([[1], [-1], [0]], device=DEV)
    live = [x.clone() for x in memory]
    with torch.no_grad(), config.use_table(SPLIT):
        out, final = galite_recurrence(*proj, dones, *live, restart=(index, *rmem), final_out=tuple(live),
                                       backend="triton")  # fmt: skip
    with torch.no_grad():
        want_out, want = galite_recurrence(*proj, dones, *memory, restart=(index, *rmem), backend="reference")
    assert all(a is b for a, b in zip(final, live))
    assert rel_err(out, want_out) <= 1e-5
    for a, b in zip(live, want):
        assert rel_err(a, b) <= 1e-5


def test_backward_recomputes_at_the_chunk_its_forward_saved_at():
    """The checkpoint interval travels with the checkpoints: a table that changes between the forward
    (chunks of 3) and the backward (chunks of 32) gives bitwise the same gradients."""
    proj, dones, memory = galite_case(1, 5, 1, 5, 3, seed=18)
    results = []
    for bwd_chunk in (3, 32):
        leaves = [x.detach().clone().requires_grad_() for x in proj + memory]
        with config.use_table(galite_table(chunk=3, rows=2, bwd_rows=4)):
            out, final = galite_recurrence(*leaves[:8], dones, *leaves[8:], backend="triton")
        loss = (out.double() * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum() + final[0].sum()
        with config.use_table(galite_table(chunk=bwd_chunk, rows=2, bwd_rows=4)):
            results.append(torch.autograd.grad(loss, leaves))
    for name, a, b in zip(NAMES[3:], *results):
        assert torch.equal(a, b), name


def test_runs_are_bitwise_repeatable():
    """Partial sums over value-row blocks are reduced in a fixed order: no atomics."""
    case = galite_case(1, 4, 1, 5, 3, seed=8)
    with config.use_table(SPLIT):
        first, second = (run_backend(case, "triton", torch.float32) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("steps", [1, 4])
def test_slots_in_place_match_stepping_those_rows_alone(steps):
    """T = 1 takes the step kernel (its rows walked in blocks of 2), T = 4 the forward kernel writing
    into the memory (three row blocks, so the initial s is read from a copy)."""
    proj, dones, _ = galite_case(3, steps, 2, 5, 3, seed=9)
    _, _, memory = galite_case(6, 1, 2, 5, 3, seed=10)
    dones[1, 0] = True
    slots = torch.tensor([4, 0, 2], device=DEV)
    before = [x.clone() for x in memory]
    live = [x.clone() for x in memory]
    with torch.no_grad(), config.use_table(SPLIT):
        out, final = galite_recurrence(*proj, dones, *live, final_out=tuple(live), slots=slots, backend="triton")
        rows = [x.index_select(0, slots) for x in before]
        alone_out, alone = galite_recurrence(*proj, dones, *rows, backend="triton")
    with torch.no_grad():
        ref_out, ref = galite_recurrence(*proj, dones, *rows, backend="reference")
    assert all(a is b for a, b in zip(final, live))
    assert torch.equal(out, alone_out)
    others = torch.tensor([1, 3, 5], device=DEV)
    for got, lone, want, orig in zip(live, alone, ref, before):
        assert torch.equal(got.index_select(0, slots), lone)
        assert rel_err(got.index_select(0, slots), want) <= 1e-5
        assert torch.equal(got.index_select(0, others), orig.index_select(0, others))
    assert rel_err(out, ref_out) <= 1e-5


def test_in_place_steps_equal_one_sequence_call():
    """galite_step_ on a layer of a stacked memory, step by step, against one reference call."""
    steps = 5
    proj, dones, memory = galite_case(3, steps, 2, 5, 3, dones="mixed", seed=11)
    dones[0, 0] = dones[1, steps - 1] = True
    with torch.no_grad():
        out_seq, final_seq = galite_recurrence(*proj, dones, *memory, backend="reference")
    stacked = [torch.stack([torch.full_like(x, 7.0), x.clone(), torch.full_like(x, -7.0)]) for x in memory]
    live = [x[1] for x in stacked]
    with torch.no_grad(), config.use_table(SPLIT):
        outs = [galite_step_(*[p[:, t] for p in proj], dones[:, t], *live) for t in range(steps)]
    assert rel_err(torch.stack(outs, dim=1), out_seq) <= 1e-5
    for got, want in zip(live, final_seq):
        assert rel_err(got, want) <= 1e-5
    for x in stacked:
        assert (x[0] == 7.0).all() and (x[2] == -7.0).all()


def test_t1_call_without_grad_leaves_the_memory_and_matches_the_forward():
    """T = 1 without gradients takes the out-of-place step kernel: bitwise the forward kernel's result."""
    proj, dones, memory = galite_case(2, 1, 2, 6, 2, dones="first", seed=12)
    before = [x.clone() for x in memory]
    with torch.no_grad():
        out, final = galite_recurrence(*proj, dones, *memory, backend="triton")
    for a, b in zip(memory, before):
        assert torch.equal(a, b)
    leaves = [x.clone().requires_grad_() for x in memory]
    out_fwd, final_fwd = galite_recurrence(*proj, dones, *leaves, backend="triton")
    assert torch.equal(out, out_fwd)
    for a, b in zip(final, final_fwd):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    """Schema, fake implementations and autograd registration of every GaLiTe op."""
    ops = torch.ops.agalite_triton
    proj, dones, memory = galite_case(2, 3, 1, 3, 2, dones="first", seed=13)
    leaves = [x.detach().clone().requires_grad_() for x in proj + memory]
    torch.library.opcheck(ops.galite_fwd, (*leaves[:8], dones, *leaves[8:], 1e-10, True, 2))
    index = torch.tensor([[-1, 0, -1], [-1, -1, 1]], device=DEV)
    _, _, rmem = galite_case(2, 1, 1, 3, 2, seed=14)
    rleaves = [x.clone().requires_grad_() for x in rmem]
    torch.library.opcheck(ops.galite_fwd, (*leaves[:8], dones, *leaves[8:], 1e-10, True, 2, index, *rleaves))
    bufs = [x.clone() for x in memory]
    slots = torch.tensor([1, 0], device=DEV)
    torch.library.opcheck(ops.galite_into, (*proj, dones, *memory, 1e-10, *bufs, slots))
    step = [p[:, 0] for p in proj]
    torch.library.opcheck(ops.galite_step, (*step, dones[:, 0], *memory, 1e-10))
    torch.library.opcheck(ops.galite_step_into, (*step, dones[:, 0], *memory, 1e-10, *bufs, slots))
    torch.library.opcheck(ops.galite_step_, (*step, None, *[x.clone() for x in memory], 1e-10))


def test_model_has_no_graph_break():
    """A GaLiTe model on the kernel backend traces whole, over a sequence and for one step (the step op)."""
    from agalite_triton import GaLiTe

    torch._dynamo.reset()
    model = GaLiTe(5, 16, 1, 2, 6, 16, 2, backend="triton").to(DEV)
    x = torch.randn(2, 3, 5, device=DEV)
    for inputs in (x, x[:, 0]):
        explanation = torch._dynamo.explain(model)(inputs, model.initial_state(2), None)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_recurrence_traces_in_one_graph():
    """torch.compile(fullgraph=True) (aot_eager: the interpreter has no Inductor path) fails on any graph
    break; outputs and every gradient match eager."""
    torch._dynamo.reset()
    proj, dones, memory = galite_case(2, 4, 1, 3, 2, seed=15)

    def f(*leaves):
        out, final = galite_recurrence(*leaves[:8], dones, *leaves[8:], backend="triton")
        return (out * out).sum() + final[0].sum() + final[1].square().sum(), out

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [x.detach().clone().requires_grad_() for x in proj + memory]
        loss, out = fn(*leaves)
        results.append([out, *torch.autograd.grad(loss, leaves)])
    torch._dynamo.reset()
    for i, (a, b) in enumerate(zip(*results)):
        assert rel_err(a, b) <= 1e-6, i
