"""The fused CPU recurrence (``agalite_triton.reference.cpu_fused``) against the eager reference.

Criterion, per tensor: ``max|fused - eager| <= tol * max(1, max|eager|)`` with tol = 1e-6 in float32 and
1e-12 in float64 (the fused path differs from the eager one only in rounding: its sigmoid is formed from
one exp and its read-out dot products are summed in double). Projections are the attention layer's
strided views of one fused tensor, as the model makes them, unless a test says otherwise.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from agalite_triton import agalite_recurrence
from agalite_triton.reference import cpu_fused, reference_recurrence

from .naive import naive_recurrence

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}

# Every test but the fallback one needs the library; without a compiler the fallback is what runs.
needs_library = pytest.mark.skipif(
    cpu_fused.build_info()["state"] != "ready", reason=f"fused CPU recurrence unavailable: {cpu_fused.build_info()}"
)


def err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1)).item() if ref.numel() else 0.0


def views_of(z: torch.Tensor, H: int, D: int, eta: int) -> list[torch.Tensor]:
    """keys, queries, values, beta, gamma, p1, p2, p3: strided views of the fused projection ``z``."""
    kqvbg = z[..., : H * 5 * D].unflatten(-1, (H, 5, D)).unbind(-2)
    return [*kqvbg, *z[..., H * 5 * D :].unflatten(-1, (H, 3, eta)).unbind(-2)]


def case(B, T, H, D, eta, R, *, dtype=torch.float32, gate_logit=None, tick=None, seed=0, views=True):
    g = torch.Generator().manual_seed(seed)
    width = H * 5 * D + H * 3 * eta
    z = torch.randn(B, T, width, generator=g, dtype=torch.float64)
    if gate_logit is not None:  # beta, gamma, p3 at +-gate_logit: decays of exactly 0 and 1
        gates = views_of(z, H, D, eta)
        for view in (gates[3], gates[4], gates[7]):
            view.copy_(torch.sign(view) * gate_logit)
    z = z.to(dtype)
    if views:
        proj = views_of(z, H, D, eta)
    else:
        proj = [torch.randn(B, T, H, D if i < 5 else eta, generator=g, dtype=torch.float64).to(dtype) for i in range(8)]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    E = eta * D
    state = [(torch.rand(B, R, H, E, generator=g, dtype=torch.float64) - 0.5).to(sdt),
             torch.randn(B, R, H, D, generator=g, dtype=torch.float64).to(sdt),
             torch.rand(B, H, E, generator=g, dtype=torch.float64).to(sdt)]  # fmt: skip
    dones = torch.rand(B, T, generator=g) < 0.3
    if tick is None:
        tick = torch.randint(-50, 10**6, (B,), generator=g)
    return z, proj, dones, state, tick


def both(proj, dones, state, tick, **kw):
    """(fused, eager) results of the reference entry point on the same arguments."""
    results = []
    for fused in (True, False):
        with cpu_fused.forced(fused):
            kw_ = dict(kw)
            if "final_out" in kw_:
                kw_["final_out"] = tuple(x.clone() for x in kw_["final_out"])
            out, final = reference_recurrence(*proj, dones, *[x.clone() for x in state], tick, **kw_)
            results.append([out, *final])
    return results


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "B,T,H,D,eta,R", [(3, 1, 2, 5, 3, 2), (2, 7, 3, 9, 2, 3), (1, 4, 1, 64, 4, 2), (2, 3, 2, 6, 1, 7)]
)
def test_inference_matches_eager(B, T, H, D, eta, R, dtype):
    _, proj, dones, state, tick = case(B, T, H, D, eta, R, dtype=dtype, seed=B * 10 + T)
    with torch.no_grad():
        fused, eager = both(proj, dones, state, tick)
    for f, e in zip(fused, eager):
        assert f.dtype == e.dtype and f.shape == e.shape
        assert err(f, e) <= TOL[dtype]


@needs_library
@pytest.mark.parametrize("gate_logit", [30.0, 100.0])
def test_saturated_gates_and_huge_ticks(gate_logit):
    ticks = torch.tensor([2**62, -(2**40) - 3, 2**63 - 2])
    _, proj, dones, state, tick = case(3, 5, 2, 7, 2, 4, gate_logit=gate_logit, tick=ticks)
    with torch.no_grad():
        fused, eager = both(proj, dones, state, tick)
        # A huge tick gives bitwise the result of a small tick congruent to it (period 2 (R - 1) = 6).
        small, _ = both(proj, dones, state, torch.remainder(ticks, 6))
    for f, e, s in zip(fused, eager, small):
        assert torch.isfinite(f).all() and err(f, e) <= TOL[torch.float32]
        assert torch.equal(f, s)


@needs_library
def test_in_place_and_slots():
    B_s, N, T = 7, 3, 2
    _, proj, dones, state, tick = case(N, T, 2, 6, 3, 2, seed=4)
    _, _, _, big, big_tick = case(B_s, 1, 2, 6, 3, 2, seed=5)
    slots = torch.tensor([5, 0, 3])
    with torch.no_grad():
        # In place: final_out is the state itself.
        fused, eager = both(proj, dones, state, tick, final_out=state)
        assert all(err(f, e) <= TOL[torch.float32] for f, e in zip(fused, eager))
        st = [x.clone() for x in state]
        out, final = reference_recurrence(*proj, dones, *st, tick, final_out=tuple(st))
        assert all(a is b for a, b in zip(final, st)) and torch.equal(out, fused[0])
        assert all(torch.equal(a, b) for a, b in zip(st, fused[1:]))
        # Slots: rows slots[n] of a bigger state step in place; the other rows are untouched, bitwise.
        results = []
        for fused_on in (True, False):
            with cpu_fused.forced(fused_on):
                st = [x.clone() for x in big]
                out, _ = reference_recurrence(*proj, dones, *st, big_tick, final_out=tuple(st), slots=slots)
                results.append((out, st))
        (f_out, f_st), (e_out, e_st) = results
        assert err(f_out, e_out) <= TOL[torch.float32]
        rest = torch.tensor([i for i in range(B_s) if i not in slots.tolist()])
        for f, e, orig in zip(f_st, e_st, big):
            assert err(f, e) <= TOL[torch.float32]
            assert torch.equal(f[rest], orig[rest])
        # The same as stepping the gathered rows on their own.
        alone, _ = both(proj, dones, [x[slots] for x in big], big_tick[slots])
        assert err(f_out, alone[0]) <= TOL[torch.float32]
        # Through the functional entry point with the reference backend.
        st = [x.clone() for x in big]
        out, _ = agalite_recurrence(*proj, dones, *st, big_tick, backend="reference", final_out=tuple(st), slots=slots)
        assert torch.equal(out, f_out) and all(torch.equal(a, b) for a, b in zip(st, f_st))


@needs_library
def test_thousand_steps_with_dones_agree_and_repeat_bitwise():
    """1,000 one-step calls stepping their state in place, with dones: fused within 1e-6 of eager on every
    step's output and on the final state, and bitwise the same from run to run."""
    B, H, D, eta, R, steps = 4, 2, 16, 3, 2, 1000
    _, proj, _, state, tick = case(B, steps, H, D, eta, R, seed=11)
    dones = torch.rand(B, steps, generator=torch.Generator().manual_seed(12)) < 0.01

    def rollout(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        st, tk, outs = [x.clone() for x in state], tick.clone(), []
        with torch.inference_mode(), cpu_fused.forced(fused):
            for t in range(steps):
                out, _ = reference_recurrence(*(v[:, t : t + 1] for v in proj), dones[:, t : t + 1], *st, tk,
                                              final_out=tuple(st))  # fmt: skip
                outs.append(out)
                tk += 1
        return torch.cat(outs, 1), st

    f_out, f_state = rollout(True)
    e_out, e_state = rollout(False)
    assert err(f_out, e_out) <= TOL[torch.float32]
    assert all(err(f, e) <= TOL[torch.float32] for f, e in zip(f_state, e_state))
    again_out, again_state = rollout(True)
    assert torch.equal(again_out, f_out) and all(torch.equal(a, b) for a, b in zip(again_state, f_state))


@needs_library
# float32 gradients: 2e-5, not the outputs' 1e-6 (they go through the backward's recompute and longer
# reductions; README "The CPU path" documents 2e-5)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("views", [True, False])
def test_gradients_match_eager(dtype, tol, views):
    """Every gradient (eight projections, three state tensors) through outputs and final state; with the
    projections as views of one tensor, the gradient reaches that tensor in one piece."""
    z, proj, dones, state, tick = case(3, 37, 2, 6, 3, 3, dtype=dtype, seed=21, views=views)
    g = torch.Generator().manual_seed(22)
    results = []
    for fused in (True, False):
        with cpu_fused.forced(fused):
            if views:
                zz = z.clone().requires_grad_()
                leaves = [zz]
                p = views_of(zz, 2, 6, 3)
            else:
                p = [x.clone().requires_grad_() for x in proj]
                leaves = list(p)
            st = [x.clone().requires_grad_() for x in state]
            out, final = reference_recurrence(*p, dones, *st, tick)
            weights = [torch.randn(x.shape, generator=g.manual_seed(22 + i), dtype=x.dtype)
                       for i, x in enumerate([out, *final])]  # fmt: skip
            loss = sum((w * x).sum() for w, x in zip(weights, [out, *final]))
            results.append([out, *final, *torch.autograd.grad(loss, leaves + st)])
            if fused:
                assert "Fused" in type(out.grad_fn).__name__
    for f, e in zip(*results):
        assert err(f, e) <= tol


@needs_library
# float32 gradients: 2e-5, not the outputs' 1e-6 (they go through the backward's recompute and longer
# reductions; README "The CPU path" documents 2e-5)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_restart_matches_eager_with_gradients(dtype, tol):
    """Restarts (TorchRL replay): at t = 0, consecutive, a row used at two steps, a done at a restart
    point, huge ticks; outputs, final state and the gradients of projections, state and restart memories."""
    z, _, dones, state, _ = case(3, 7, 2, 5, 3, 3, dtype=dtype, seed=41)
    _, _, _, rmem, _ = case(4, 1, 2, 5, 3, 3, dtype=dtype, seed=42)
    tick, rtick = torch.tensor([3, 2**62 + 1, -5]), torch.tensor([1, 40, 2**61 + 7, -3])
    index = torch.full((3, 7), -1)
    index[0, 0], index[0, 4], index[1, 2], index[1, 3], index[1, 6] = 1, 0, 2, 3, 2
    dones[0, 4] = True
    g = torch.Generator().manual_seed(43)
    results = []
    for fused in (True, False):
        with cpu_fused.forced(fused):
            zz = z.clone().requires_grad_()
            proj = views_of(zz, 2, 5, 3)
            st, rm = [x.clone().requires_grad_() for x in state], [x.clone().requires_grad_() for x in rmem]
            out, final = reference_recurrence(*proj, dones, *st, tick, restart=(index, *rm, rtick))
            loss = sum((torch.randn(x.shape, generator=g.manual_seed(44 + i), dtype=x.dtype) * x).sum()
                       for i, x in enumerate([out, *final]))  # fmt: skip
            results.append([out, *final, *torch.autograd.grad(loss, [zz, *st, *rm])])
            with torch.no_grad():  # the inference path, in place
                buf = [x.detach().clone() for x in state]
                out_i, _ = reference_recurrence(
                    *proj, dones, *buf, tick, restart=(index, *rmem, rtick), final_out=tuple(buf)
                )
                results[-1] += [out_i, *buf]
    for f, e in zip(*results):
        assert err(f, e) <= tol


@needs_library
def test_bitwise_the_same_whatever_the_thread_count():
    """Each (env, head) is one thread's work in a fixed order: outputs, states and gradients do not
    depend on how many threads share the call (the shapes are large enough to run in parallel)."""
    z, _, dones, state, tick = case(32, 9, 2, 16, 3, 2, seed=31)

    def run() -> list[torch.Tensor]:
        zz = z.clone().requires_grad_()
        out, final = reference_recurrence(*views_of(zz, 2, 16, 3), dones, *state, tick)
        (grad,) = torch.autograd.grad(out.square().sum() + final[0].sum(), zz)
        return [out, *final, grad]

    assert_same_at_one_and_two_threads(run)


def assert_same_at_one_and_two_threads(run) -> None:
    """``run()`` (a list of tensors) gives bitwise the same tensors with 1 and 2 torch threads."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(run())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@needs_library
def test_no_compile_per_shape_or_tick():
    """One library serves every batch size, step count, tick and dtype: nothing is compiled after the
    first use (a shape-specialising compiler would recompile here)."""
    compiles = cpu_fused.build_info()["compiles"]
    with torch.no_grad():
        for B, T, tick0, dtype in [(1, 1, 0, torch.float32), (17, 1, 2**40, torch.float32), (5, 3, -7, torch.float64),
                                   (64, 2, 123, torch.float32)]:  # fmt: skip
            _, proj, dones, state, _ = case(B, T, 2, 4, 2, 3, dtype=dtype)
            out, _ = reference_recurrence(*proj, dones, *state, torch.full((B,), tick0))
            assert out.shape == (B, T, 2, 4)
    assert cpu_fused.build_info()["compiles"] == compiles


def assert_falls_back(module, entry: str, call, monkeypatch, tmp_path) -> None:
    """``call()`` (an output) of a fused ``module`` whose entry point is ``entry``: with AGALITE_CPU_FUSED=0
    the fused path never runs; with no compiler and nothing cached, one warning naming the source, then
    the eager result on every call; the library's state is restored after."""
    state_before = module.build_info()["state"]
    with torch.no_grad(), cpu_fused.forced(False):
        eager = call()

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path ran")

    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setenv("AGALITE_CPU_FUSED", "0")
            m.setattr(module, entry, refuse)
            assert torch.equal(call(), eager)
        module._reset_for_tests()
        try:
            with monkeypatch.context() as m:
                m.setenv("CXX", str(tmp_path / "no-such-compiler"))
                m.setenv("AGALITE_CPU_CACHE", str(tmp_path / "cache"))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    outs = [call() for _ in range(3)]
                fused_warnings = [w for w in caught if issubclass(w.category, cpu_fused.FusedUnavailableWarning)]
                assert len(fused_warnings) == 1 and "eager reference" in str(fused_warnings[0].message)
                assert module.SOURCE.name in str(fused_warnings[0].message)
                assert all(torch.equal(o, eager) for o in outs)
                assert module.build_info()["state"] == "unavailable"
        finally:
            module._reset_for_tests()
    assert module.build_info()["state"] == state_before


def test_switched_off_and_unavailable_fall_back_to_eager(monkeypatch, tmp_path):
    _, proj, dones, state, tick = case(2, 3, 2, 4, 2, 2)
    assert_falls_back(cpu_fused, "fused_recurrence", lambda: reference_recurrence(*proj, dones, *state, tick)[0],
                      monkeypatch, tmp_path)  # fmt: skip


def test_eager_path_matches_naive():
    """The eager maths stays covered now that CPU calls take the fused path by default."""
    _, proj, dones, state, tick = case(2, 6, 2, 3, 2, 3, dtype=torch.float64, seed=3, views=False)
    with torch.no_grad(), cpu_fused.forced(False):
        out, final = reference_recurrence(*proj, dones, *state, tick)
    n_out, n_final = naive_recurrence(*proj, dones, *state, tick)
    for got, want in zip([out, *final], [n_out, *n_final]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
