"""The reference recurrence against an independent float64 transcription of the original, and its
autograd against finite differences."""

from __future__ import annotations

import pytest
import torch

from agalite_triton import agalite_recurrence
from agalite_triton.reference import discounted_sum

from .naive import naive_recurrence


def make_inputs(B, T, H, D, eta, R, *, dones="random", state="random", tick=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    proj = [rn(B, T, H, D) for _ in range(5)] + [rn(B, T, H, eta) for _ in range(3)]
    if dones == "random":
        d = torch.rand(B, T, generator=g) < 0.25
    elif dones == "none":
        d = None
    else:
        d = dones
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    E = eta * D
    if state == "zero":
        st = [torch.zeros(B, R, H, E, dtype=sdt), torch.zeros(B, R, H, D, dtype=sdt), torch.zeros(B, H, E, dtype=sdt)]
    else:
        st = [torch.rand(B, R, H, E, generator=g, dtype=torch.float64).to(sdt) - 0.5,
              torch.randn(B, R, H, D, generator=g, dtype=torch.float64).to(sdt),
              torch.rand(B, H, E, generator=g, dtype=torch.float64).to(sdt)]  # fmt: skip
    if tick is None:
        tick = torch.randint(0, 1000, (B,), generator=g)
    return proj, d, st, tick


@pytest.mark.parametrize(
    "B,T,H,D,eta,R",
    [(1, 1, 1, 1, 1, 1), (2, 7, 3, 5, 3, 2), (3, 11, 2, 6, 1, 3), (2, 5, 1, 3, 4, 7), (1, 9, 2, 4, 2, 8)],
)
@pytest.mark.parametrize("state", ["zero", "random"])
def test_matches_naive_float64(B, T, H, D, eta, R, state) -> None:
    proj, d, st, tick = make_inputs(B, T, H, D, eta, R, state=state, seed=B * 100 + T)
    out, final = agalite_recurrence(*proj, d, *st, tick, backend="reference")
    n_out, n_final = naive_recurrence(*proj, d, *st, tick)
    torch.testing.assert_close(out.double(), n_out, rtol=1e-4, atol=1e-5)
    for got, exp in zip(final, n_final):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)


def test_float64_inputs_match_naive_tightly() -> None:
    proj, d, st, tick = make_inputs(2, 6, 2, 3, 2, 3, dtype=torch.float64, seed=3)
    out, final = agalite_recurrence(*proj, d, *st, tick, backend="reference")
    n_out, n_final = naive_recurrence(*proj, d, *st, tick)
    torch.testing.assert_close(out, n_out, rtol=1e-10, atol=1e-12)
    for got, exp in zip(final, n_final):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dones", ["none", "random"])
def test_gradcheck_float64(dones) -> None:
    proj, d, st, tick = make_inputs(2, 5, 2, 3, 2, 3, dones=dones, dtype=torch.float64, seed=5)
    inputs = [t.requires_grad_() for t in proj + st]

    def f(*args):
        out, final = agalite_recurrence(*args[:8], d, *args[8:], tick, backend="reference")
        return (out, *final)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_low_precision_inputs_keep_float32_state() -> None:
    proj, d, st, tick = make_inputs(2, 4, 2, 3, 2, 2, seed=9)
    out, final = agalite_recurrence(*(p.bfloat16() for p in proj), d, *st, tick, backend="reference")
    assert out.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in final)


def test_zero_steps_returns_state_unchanged() -> None:
    proj, d, st, tick = make_inputs(2, 0, 2, 3, 2, 2, dones="none")
    out, final = agalite_recurrence(*proj, None, *st, tick, backend="reference")
    assert out.shape == (2, 0, 2, 3)
    for got, exp in zip(final, st):
        assert torch.equal(got, exp) and got.data_ptr() != exp.data_ptr()


def test_final_out_buffers_receive_the_state() -> None:
    proj, d, st, tick = make_inputs(3, 1, 2, 3, 2, 2, seed=2)
    expected_out, expected = agalite_recurrence(*proj, d, *st, tick, backend="reference")
    bufs = tuple(torch.full_like(t, float("nan")) for t in st)
    with torch.no_grad():
        out, final = agalite_recurrence(*proj, d, *st, tick, backend="reference", final_out=bufs)
    assert all(a is b for a, b in zip(final, bufs))
    assert torch.equal(out, expected_out)
    assert all(torch.equal(a, b) for a, b in zip(final, expected))
    with pytest.raises(RuntimeError, match="final_out"):
        agalite_recurrence(*proj, d, *st, tick, backend="reference", final_out=bufs)


def test_discounted_sum_gradcheck_with_zero_decays() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 6, 1, 4, generator=g, dtype=torch.float64)
    a[:, 2] = 0.0
    a[0, 5] = 1.0
    a.requires_grad_()
    h0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(discounted_sum, (x, a, h0))
