"""Property tests (hypothesis) of both models on the reference path: environment isolation, chunking
invariance, reset equivalence; and the analytic bound on AGaLiTe's read-out."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agalite_triton import agalite_recurrence

from .cores import KINDS, busy_state, fresh_state, make_core

IN = 4
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)

# AGaLiTe: r = 4, period 6, ticks matter. GaLiTe: nu = 2.
MODELS = {kind: make_core(kind, input_dim=IN, d_model=8, n_layers=2, n_heads=2, d_head=3, d_ffc=8, eta=2, r=4, nu=2,
                          backend="reference").eval() for kind in KINDS}  # fmt: skip
kinds = pytest.mark.parametrize("kind", KINDS)


def inputs(kind: str, seed: int, batch: int, steps: int, done_rate: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, IN, generator=g)
    dones = torch.rand(batch, steps, generator=g) < done_rate
    tick = torch.randint(-(2**40), 2**40, (batch,), generator=g)
    return x, dones, busy_state(MODELS[kind], batch, seed=seed, tick=tick)


def rel_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-30)


@kinds
@SETTINGS
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 4), steps=st.integers(1, 5), data=st.data())
def test_environment_isolation(kind, seed, batch, steps, data):
    """Changing env j's input, dones, memory or tick never changes any other env's outputs or state."""
    model = MODELS[kind]
    j = data.draw(st.integers(0, batch - 1), label="env")
    what = data.draw(st.sampled_from(["x", "dones", "memory", *(["tick"] if model.has_tick else [])]), label="what")
    x, dones, state = inputs(kind, seed, batch, steps)
    x2, dones2, state2 = x.clone(), dones.clone(), state.clone()
    if what == "x":
        x2[j] = x2[j] * -3 + 1
    elif what == "dones":
        dones2[j] = ~dones2[j]
    elif what == "memory":
        env = torch.tensor([j])
        # Every memory of env j changed; normalisers (s) stay positive.
        changed = [m.index_fill(1, env, 0.25 if name == "s" else 5.0) for name, m in zip(state._fields, state.memories())]
        state2 = state2._with_memories(changed, state2[-1])
    else:
        state2.tick[j] += 1
    with torch.no_grad():
        y, new = model(x, state, dones)
        y2, new2 = model(x2, state2, dones2)
    others = torch.tensor([b for b in range(batch) if b != j])
    assert torch.equal(y[others], y2[others])
    for a, b in zip(new.memories(), new2.memories()):
        assert torch.equal(a[:, others], b[:, others])
    if model.has_tick:
        assert torch.equal(new.tick[others], new2.tick[others])


@kinds
@SETTINGS
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 12), data=st.data())
def test_chunking_invariance(kind, seed, steps, data):
    """Any split of a sequence into calls (state carried; chunks of one step through the single-step API)
    gives the whole-sequence result within 1e-5 relative."""
    model = MODELS[kind]
    cuts = sorted(data.draw(st.sets(st.integers(1, steps - 1), max_size=steps - 1), label="cuts"))
    x, dones, state = inputs(kind, seed, 3, steps)
    with torch.no_grad():
        y_all, final_all = model(x, state, dones)
        outs, st_ = [], state
        for a, b in zip([0, *cuts], [*cuts, steps]):
            if b - a == 1:
                y, st_ = model(x[:, a], st_, dones[:, a])
                y = y.unsqueeze(1)
            else:
                y, st_ = model(x[:, a:b], st_, dones[:, a:b])
            outs.append(y)
    assert rel_close(torch.cat(outs, 1), y_all, 1e-5)
    for a, b in zip(st_.memories(), final_all.memories()):
        assert rel_close(a, b, 1e-5)
    if model.has_tick:
        assert torch.equal(st_.tick, final_all.tick)


@kinds
@SETTINGS
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 8), data=st.data())
def test_reset_equivalence(kind, seed, steps, data):
    """A done at step t equals starting at t from a zero memory that carries the same tick."""
    model = MODELS[kind]
    t = data.draw(st.integers(0, steps - 1), label="t")
    env = data.draw(st.integers(0, 2), label="env")
    x, dones, state = inputs(kind, seed, 3, steps)
    dones[env, t] = True
    with torch.no_grad():
        y, final = model(x, state, dones)
        fresh = fresh_state(model, 1, state.tick[env : env + 1] + t if model.has_tick else None)
        y_env, final_env = model(x[env : env + 1, t:], fresh, dones[env : env + 1, t:])
    # 1e-5: the batch-of-1 run's matmuls may round differently from the batch-of-3 run's.
    assert rel_close(y[env, t:], y_env[0], 1e-5)
    for a, b in zip(final.memories(), final_env.memories()):
        assert rel_close(a[:, env], b[:, 0], 1e-5)
    if model.has_tick:
        assert torch.equal(final.tick[env : env + 1], final_env.tick)


@SETTINGS
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 6), r=st.integers(1, 6), scale=st.sampled_from([0.1, 1, 30]))
def test_read_out_bound(seed, steps, r, scale):
    """From a memory with |tilde_k[j]| <= s (zero memory, or any memory the recurrence produced),
    |out| <= (1 / 2R) sum_j |tilde_v[j]| <= max(|tilde_v_0|, max |v|) / 2, elementwise.
    (Derivation in test_long_horizon's docstring.)"""
    g = torch.Generator().manual_seed(seed)
    B, H, D, eta = 2, 2, 3, 2
    proj = [torch.randn(B, steps, H, D, generator=g) * scale for _ in range(5)]
    proj += [torch.randn(B, steps, H, eta, generator=g) * scale for _ in range(3)]
    s0 = torch.rand(B, H, eta * D, generator=g)
    tk0 = s0.unsqueeze(1) * (2 * torch.rand(B, r, H, eta * D, generator=g) - 1)  # |tilde_k0| <= s0
    tv0 = torch.randn(B, r, H, D, generator=g)
    tick = torch.randint(0, 1000, (B,), generator=g)
    with torch.no_grad():
        out, _ = agalite_recurrence(*proj, None, tk0, tv0, s0, tick, backend="reference")
    bound = torch.maximum(tv0.abs().amax(1).unsqueeze(1), proj[2].abs().cummax(1).values) / 2  # (B, T, H, D)
    assert (out.abs() <= bound * (1 + 1e-5) + 1e-30).all()
