"""Property tests (hypothesis) of the model on the reference path: environment isolation, chunking
invariance, reset equivalence, and the analytic bound on the read-out."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agalite_triton import AGaLiTe, AGaLiTeState, agalite_recurrence

IN = 4
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)

torch.manual_seed(0)
MODEL = AGaLiTe(IN, 8, 2, 2, 3, 8, 2, 4, backend="reference")  # r = 4: period 6, ticks matter
MODEL.eval()


def inputs(seed: int, batch: int, steps: int, done_rate: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, IN, generator=g)
    dones = torch.rand(batch, steps, generator=g) < done_rate
    state = MODEL.initial_state(batch)
    state = AGaLiTeState(torch.randn(state.tilde_k.shape, generator=g), torch.randn(state.tilde_v.shape, generator=g),
                         torch.rand(state.s.shape, generator=g),
                         torch.randint(-(2**40), 2**40, (batch,), generator=g))  # fmt: skip
    return x, dones, state


def rel_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-30)


@SETTINGS
@given(seed=st.integers(0, 2**16), batch=st.integers(2, 4), steps=st.integers(1, 5), data=st.data())
def test_environment_isolation(seed, batch, steps, data):
    """Changing env j's input, dones, memory or tick never changes any other env's outputs or state."""
    j = data.draw(st.integers(0, batch - 1), label="env")
    what = data.draw(st.sampled_from(["x", "dones", "memory", "tick"]), label="what")
    x, dones, state = inputs(seed, batch, steps)
    x2, dones2, state2 = x.clone(), dones.clone(), state.clone()
    if what == "x":
        x2[j] = x2[j] * -3 + 1
    elif what == "dones":
        dones2[j] = ~dones2[j]
    elif what == "memory":
        state2 = AGaLiTeState(state2.tilde_k.index_fill(1, torch.tensor([j]), 5.0), state2.tilde_v,
                              state2.s.index_fill(1, torch.tensor([j]), 0.25), state2.tick)  # fmt: skip
    else:
        state2.tick[j] += 1
    with torch.no_grad():
        y, new = MODEL(x, state, dones)
        y2, new2 = MODEL(x2, state2, dones2)
    others = torch.tensor([b for b in range(batch) if b != j])
    assert torch.equal(y[others], y2[others])
    for a, b in zip(new[:3], new2[:3]):
        assert torch.equal(a[:, others], b[:, others])
    assert torch.equal(new.tick[others], new2.tick[others])


@SETTINGS
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 12), data=st.data())
def test_chunking_invariance(seed, steps, data):
    """Any split of a sequence into calls (state carried; chunks of one step through the single-step API)
    gives the whole-sequence result within 1e-5 relative."""
    cuts = sorted(data.draw(st.sets(st.integers(1, steps - 1), max_size=steps - 1), label="cuts"))
    x, dones, state = inputs(seed, 3, steps)
    with torch.no_grad():
        y_all, final_all = MODEL(x, state, dones)
        outs, st_ = [], state
        for a, b in zip([0, *cuts], [*cuts, steps]):
            if b - a == 1:
                y, st_ = MODEL(x[:, a], st_, dones[:, a])
                y = y.unsqueeze(1)
            else:
                y, st_ = MODEL(x[:, a:b], st_, dones[:, a:b])
            outs.append(y)
    assert rel_close(torch.cat(outs, 1), y_all, 1e-5)
    for a, b in zip(st_[:3], final_all[:3]):
        assert rel_close(a, b, 1e-5)
    assert torch.equal(st_.tick, final_all.tick)


@SETTINGS
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 8), data=st.data())
def test_reset_equivalence(seed, steps, data):
    """A done at step t equals starting at t from a zero memory that carries the same tick."""
    t = data.draw(st.integers(0, steps - 1), label="t")
    env = data.draw(st.integers(0, 2), label="env")
    x, dones, state = inputs(seed, 3, steps)
    dones[env, t] = True
    with torch.no_grad():
        y, final = MODEL(x, state, dones)
        fresh = MODEL.initial_state(1)._replace(tick=state.tick[env : env + 1] + t)
        y_env, final_env = MODEL(x[env : env + 1, t:], fresh, dones[env : env + 1, t:])
    # 1e-5: the batch-of-1 run's matmuls may round differently from the batch-of-3 run's.
    assert rel_close(y[env, t:], y_env[0], 1e-5)
    for a, b in zip(final[:3], final_env[:3]):
        assert rel_close(a[:, env], b[:, 0], 1e-5)
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
