"""GaLiTe's fused CPU recurrence (``agalite_triton.reference.galite_cpu_fused``) against the eager reference.

Criterion, per tensor: ``max|fused - eager| <= tol * max(1, max|eager|)``: 1e-6 for float32 outputs and
memories, 2e-5 for float32 gradients (the backward's recompute and longer reductions), 1e-12 in float64.
Projections are strided views of one fused tensor, as the attention layer makes them, unless a test says
otherwise; sizes are odd (D not a power of two, nu 1 and 3) and the initial memory is not zero.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import galite_recurrence
from agalite_triton.reference import cpu_fused, galite_cpu_fused
from agalite_triton.reference.galite_recurrence import galite_reference_recurrence

from .test_cpu_fused import assert_falls_back, assert_same_at_one_and_two_threads, err, views_of

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}

needs_library = pytest.mark.skipif(
    galite_cpu_fused.build_info()["state"] != "ready",
    reason=f"GaLiTe's fused CPU recurrence unavailable: {galite_cpu_fused.build_info()}",
)


def case(B, T, H, D, nu, *, dtype=torch.float32, seed=0, views=True, rows=None):
    """(z, projections, dones, [c, s]); ``rows``: the memory's batch (B unless given)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, H * 5 * D + H * 3 * nu, generator=g, dtype=torch.float64).to(dtype)
    if views:
        proj = views_of(z, H, D, nu)
    else:
        proj = [torch.randn(B, T, H, D if i < 5 else nu, generator=g, dtype=torch.float64).to(dtype) for i in range(8)]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    K, rows = nu * D, rows or B
    memory = [torch.randn(rows, H, D, K, generator=g, dtype=torch.float64).to(sdt),
              (torch.rand(rows, H, K, generator=g, dtype=torch.float64) + 0.1).to(sdt)]  # fmt: skip
    dones = torch.rand(B, T, generator=g) < 0.3
    return z, proj, dones, memory


def run(fused: bool, proj, dones, memory, **kw):
    """[out, c, s] of the reference entry point on fresh copies of the memory (and ``final_out``)."""
    with cpu_fused.forced(fused):
        if "final_out" in kw:
            kw = dict(kw, final_out=tuple(x.clone() for x in kw["final_out"]))
        out, final = galite_reference_recurrence(*proj, dones, *[x.clone() for x in memory], **kw)
    return [out, *final]


def assert_close_all(got, want, tol):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert err(g, w) <= tol, err(g, w)


@needs_library
@pytest.mark.parametrize(
    "B,T,H,D,nu,dtype",
    [(3, 1, 2, 5, 3, torch.float32), (2, 7, 3, 9, 1, torch.float32), (2, 5, 2, 6, 2, torch.float64),
     (1, 4, 1, 64, 2, torch.float32)],
)  # fmt: skip
def test_inference_matches_eager(B, T, H, D, nu, dtype):
    _, proj, dones, memory = case(B, T, H, D, nu, dtype=dtype, seed=B * 10 + T)
    with torch.no_grad():
        assert_close_all(run(True, proj, dones, memory), run(False, proj, dones, memory), TOL[dtype])


@needs_library
def test_odd_inputs_match_eager():
    """No dones, 0/1 floating dones, bfloat16 projections (float32 memory), and a memory that is not
    row-major (a transposed view) stepped into a destination that is not either."""
    _, proj, dones, memory = case(3, 4, 2, 6, 2, seed=7)
    c_t = memory[0].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major (D, K)
    with torch.no_grad():
        for d in (None, dones.float()):
            assert_close_all(run(True, proj, d, memory), run(False, proj, d, memory), TOL[torch.float32])
        half = [p.bfloat16() for p in proj]
        # The same float32 maths on the same inputs; the outputs may round to neighbouring bfloat16 values.
        assert_close_all(run(True, half, dones, memory), run(False, half, dones, memory), 1e-2)
        dest = (torch.empty_like(c_t), memory[1].clone())
        fused = run(True, proj, dones, [c_t, memory[1]], final_out=dest)
        assert_close_all(fused, run(False, proj, dones, memory), TOL[torch.float32])


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,nu,views", [(1, 3, True), (23, 1, False), (23, 3, True)])
def test_gradients_match_eager(T, nu, views, dtype, monkeypatch):
    """Every gradient (eight projections, the initial memory) through outputs and final memory, with
    dones; the backward buffer is shrunk so that T spans several chunks, the last one short."""
    H, D = 2, 7
    width = D * nu * (D + 1)
    monkeypatch.setattr(cpu_fused, "BACKWARD_BUFFER_BYTES", 6 * width * dtype.itemsize)  # chunks of 5 steps
    z, proj, dones, memory = case(3, T, H, D, nu, dtype=dtype, seed=21 + T, views=views)
    results = []
    for fused in (True, False):
        with cpu_fused.forced(fused):
            if views:
                leaves = [z.clone().requires_grad_()]
                p = views_of(leaves[0], H, D, nu)
            else:
                p = [x.clone().requires_grad_() for x in proj]
                leaves = list(p)
            mem = [x.clone().requires_grad_() for x in memory]
            out, final = galite_reference_recurrence(*p, dones, *mem)
            g = torch.Generator().manual_seed(22)
            loss = sum((torch.randn(x.shape, generator=g, dtype=x.dtype) * x).sum() for x in [out, *final])
            results.append([out, *final, *torch.autograd.grad(loss, leaves + mem)])
            if fused:
                assert "GaLiTeFused" in type(out.grad_fn).__name__
    assert_close_all(results[0][:3], results[1][:3], TOL[dtype])
    assert_close_all(results[0][3:], results[1][3:], GRAD_TOL[dtype])


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restart_matches_eager_with_gradients(dtype):
    """Restarts: at t = 0, consecutive, a row used at two steps of its batch row, a done at a restart
    point; outputs, final memory and the gradients of projections, memory and restart memories; and the
    inference path in place."""
    z, _, dones, memory = case(3, 7, 2, 5, 3, dtype=dtype, seed=41)
    *_, rmem = case(4, 1, 2, 5, 3, dtype=dtype, seed=42)
    index = torch.full((3, 7), -1)
    index[0, 0], index[0, 4], index[1, 2], index[1, 3], index[1, 6] = 1, 0, 2, 3, 2
    dones[0, 4] = True
    results = []
    for fused in (True, False):
        with cpu_fused.forced(fused):
            zz = z.clone().requires_grad_()
            proj = views_of(zz, 2, 5, 3)
            mem, rm = [x.clone().requires_grad_() for x in memory], [x.clone().requires_grad_() for x in rmem]
            out, final = galite_reference_recurrence(*proj, dones, *mem, restart=(index, *rm))
            g = torch.Generator().manual_seed(44)
            loss = sum((torch.randn(x.shape, generator=g, dtype=x.dtype) * x).sum() for x in [out, *final])
            grads = torch.autograd.grad(loss, [zz, *mem, *rm])
            with torch.no_grad():
                buf = [x.clone() for x in memory]
                out_i, _ = galite_reference_recurrence(*proj, dones, *buf, restart=(index, *rmem), final_out=tuple(buf))
            results.append(([out, *final, out_i, *buf], grads))
    assert_close_all(results[0][0], results[1][0], TOL[dtype])
    assert_close_all(results[0][1], results[1][1], GRAD_TOL[dtype])


@needs_library
def test_in_place_and_slots():
    B_s, N, T = 7, 3, 2
    _, proj, dones, memory = case(N, T, 2, 6, 3, seed=4)
    *_, big = case(B_s, 1, 2, 6, 3, seed=5)
    slots = torch.tensor([5, 0, 3])
    tol = TOL[torch.float32]
    with torch.no_grad():
        # In place: final_out is the memory itself, and receives what a fresh destination would.
        fresh = run(True, proj, dones, memory)
        assert_close_all(run(True, proj, dones, memory, final_out=memory), run(False, proj, dones, memory), tol)
        mem = [x.clone() for x in memory]
        out, final = galite_reference_recurrence(*proj, dones, *mem, final_out=tuple(mem))
        assert all(a is b for a, b in zip(final, mem))
        assert all(torch.equal(a, b) for a, b in zip([out, *mem], fresh))
        # Slots: rows slots[n] of a bigger memory step in place; the other rows are untouched, bitwise.
        results = []
        for fused in (True, False):
            with cpu_fused.forced(fused):
                mem = [x.clone() for x in big]
                out, _ = galite_reference_recurrence(*proj, dones, *mem, final_out=tuple(mem), slots=slots)
                results.append([out, *mem])
        assert_close_all(results[0], results[1], tol)
        rest = torch.tensor([i for i in range(B_s) if i not in slots.tolist()])
        assert all(torch.equal(f[rest], orig[rest]) for f, orig in zip(results[0][1:], big))
        alone = run(True, proj, dones, [x[slots] for x in big])
        assert all(torch.equal(a, b) for a, b in zip(alone, [results[0][0], *(x[slots] for x in results[0][1:])]))
        # Through the functional entry point (backend auto takes the fused reference on CPU).
        mem = [x.clone() for x in big]
        out, _ = galite_recurrence(*proj, dones, *mem, final_out=tuple(mem), slots=slots)
        assert all(torch.equal(a, b) for a, b in zip([out, *mem], results[0]))


@needs_library
def test_thousand_steps_with_dones_agree_and_repeat_bitwise():
    """1,000 one-step calls stepping their memory in place, with dones: fused within 1e-6 of eager on every
    step's output and on the final memory, and bitwise the same from run to run."""
    B, H, D, nu, steps = 4, 2, 16, 2, 1000
    _, proj, _, memory = case(B, steps, H, D, nu, seed=11)
    dones = torch.rand(B, steps, generator=torch.Generator().manual_seed(12)) < 0.01

    def rollout(fused: bool) -> list[torch.Tensor]:
        mem, outs = [x.clone() for x in memory], []
        with torch.inference_mode(), cpu_fused.forced(fused):
            for t in range(steps):
                out, _ = galite_reference_recurrence(
                    *(v[:, t : t + 1] for v in proj), dones[:, t : t + 1], *mem, final_out=tuple(mem)
                )
                outs.append(out)
        return [torch.cat(outs, 1), *mem]

    fused = rollout(True)
    assert_close_all(fused, rollout(False), TOL[torch.float32])
    assert all(torch.equal(a, b) for a, b in zip(rollout(True), fused))


@needs_library
def test_bitwise_the_same_whatever_the_thread_count():
    """Each (env, head) is one thread's work in a fixed order: outputs, memories and gradients do not
    depend on how many threads share the call (the shapes are large enough to run in parallel)."""
    z, _, dones, memory = case(8, 5, 2, 16, 2, seed=31)

    def run() -> list[torch.Tensor]:
        zz = z.clone().requires_grad_()
        out, final = galite_reference_recurrence(*views_of(zz, 2, 16, 2), dones, *memory)
        (grad,) = torch.autograd.grad(out.square().sum() + final[0].sum(), zz)
        return [out, *final, grad]

    assert_same_at_one_and_two_threads(run)


@needs_library
def test_no_compile_per_shape():
    """One library serves every batch size, step count, size and dtype: nothing is compiled after first use."""
    compiles = galite_cpu_fused.build_info()["compiles"]
    with torch.no_grad():
        for B, T, D, nu, dtype in [(1, 1, 4, 1, torch.float32), (17, 1, 8, 2, torch.float32),
                                   (5, 3, 3, 3, torch.float64), (64, 2, 4, 2, torch.float32)]:  # fmt: skip
            _, proj, dones, memory = case(B, T, 2, D, nu, dtype=dtype)
            out, _ = galite_reference_recurrence(*proj, dones, *memory)
            assert out.shape == (B, T, 2, D)
    assert galite_cpu_fused.build_info()["compiles"] == compiles


def test_switched_off_and_unavailable_fall_back_to_eager(monkeypatch, tmp_path):
    _, proj, dones, memory = case(2, 3, 2, 4, 2)
    assert_falls_back(galite_cpu_fused, "galite_fused_recurrence",
                      lambda: galite_reference_recurrence(*proj, dones, *memory)[0], monkeypatch, tmp_path)  # fmt: skip
