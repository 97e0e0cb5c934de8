"""Oscillator phases from the integer tick: exact at any horizon, equal to the original when small."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agalite_triton.oscillator import oscillator_coefficients, oscillator_period

from .naive import exact_cos


@pytest.mark.parametrize("r", [1, 2, 3, 4, 7, 8])
def test_small_ticks_match_the_original_float32_formula(r: int) -> None:
    tick = torch.tensor([1, 8, 7, 100, 0])
    T = 40
    got = oscillator_coefficients(tick, T, r).numpy()
    # The original: float32 ticks times float32 linspace(-pi, pi, r), cos in float32.
    omegas = np.linspace(-np.pi, np.pi, r).astype(np.float32)
    ticks = (tick.numpy()[:, None] + np.arange(1, T + 1)).astype(np.float32)
    original = np.cos(ticks[..., None] * omegas).astype(np.float32)
    np.testing.assert_allclose(got, original, rtol=0, atol=2e-5)


@pytest.mark.parametrize("r", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("tick", [10**6, 2**31 + 5, 2**40, 2**62 - 1, -(2**40) - 3])
def test_huge_ticks_give_the_exact_phase(r: int, tick: int) -> None:
    got = oscillator_coefficients(torch.tensor([tick]), 3, r)[0]
    for t in range(3):
        # The call's step t uses tick + t + 1; compare with the phase reduced in Python integers.
        exp = torch.tensor(exact_cos(tick + t + 1, r), dtype=torch.float64)
        torch.testing.assert_close(got[t].double(), exp, rtol=0, atol=1e-7)


def test_large_ticks_where_float64_still_resolves_the_phase() -> None:
    # Up to ~2**40 a float64 tick * omega still has a phase error below ~1e-3 rad.
    r, tick = 7, 2**40
    omegas = np.linspace(-np.pi, np.pi, r)
    f64 = np.cos((tick + 1) * omegas)
    got = oscillator_coefficients(torch.tensor([tick]), 1, r)[0, 0].numpy()
    np.testing.assert_allclose(got, f64, atol=2e-3)


@pytest.mark.parametrize("r", [1, 2, 3, 4, 7, 8])
def test_period(r: int) -> None:
    P = oscillator_period(r)
    c = oscillator_coefficients(torch.tensor([3, 3 + P, 3 + 1000 * P]), 2 * P, r)
    assert torch.equal(c[0], c[1]) and torch.equal(c[0], c[2])


def test_r2_oscillators_are_identical_and_alternate() -> None:
    c = oscillator_coefficients(torch.tensor([1]), 6, 2)[0]
    assert torch.equal(c[:, 0], c[:, 1])
    # tick 1 before the call: the steps use ticks 2..7, cos(pi * t) = (-1)^t.
    assert torch.equal(c[:, 0], torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]))
