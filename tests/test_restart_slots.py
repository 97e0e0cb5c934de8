"""Restarts inside a call (TorchRL's recurrent-mode replay) and slots / env_ids (async env stepping).

* ``restart``: a call that restarts chosen (b, t) from given memories equals running each row in pieces,
  split at its restart points, each piece from its restart memory and tick; outputs, final state and
  every gradient (projections, the incoming state, the restart memories), with dones at and around the
  restart points, a restart at t = 0, restart rows shared by several steps, and huge ticks.
* ``slots``: stepping rows ``slots`` of a larger state in place equals stepping those environments alone,
  bitwise, for unsorted slots, T = 1 and T > 1, on the reference and (interpreter) kernel backends; every
  other row is untouched. Out-of-range and repeated slots raise errors naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import agalite_recurrence, galite_recurrence
from agalite_triton.stack import RecurrentStack
from agalite_triton.state import StateOps

from .cores import KINDS, make_core
from .cores import busy_state as _busy_state

H, D, ETA = 2, 3, 2


def projections(batch: int, steps: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    proj = [torch.randn(batch, steps, H, D, generator=g, dtype=dtype) for _ in range(5)]
    return proj + [torch.randn(batch, steps, H, ETA, generator=g, dtype=dtype) for _ in range(3)]


def memories(batch: int, r: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, r, H, ETA * D, generator=g, dtype=dtype),
        torch.randn(batch, r, H, D, generator=g, dtype=dtype),
        torch.rand(batch, H, ETA * D, generator=g, dtype=dtype),
    ]


def split_oracle(proj, dones, state, tick, index, restart_mem, restart_tick, recurrence=agalite_recurrence):
    """Each row run in pieces split at its restart points, every piece from its own memory and tick.
    ``tick`` and ``restart_tick`` None: a recurrence without one (``galite_recurrence``)."""
    outs, finals = [], []
    for b in range(index.shape[0]):
        cuts = [0] + [t for t in range(index.shape[1]) if index[b, t] >= 0 and t > 0] + [index.shape[1]]
        mem, tk = [m[b : b + 1] for m in state], None if tick is None else tick[b : b + 1]
        row_out = []
        for t0, t1 in zip(cuts[:-1], cuts[1:]):
            n = int(index[b, t0])
            if n >= 0:
                mem, tk = [m[n : n + 1] for m in restart_mem], None if restart_tick is None else restart_tick[n : n + 1]
            piece = [p[b : b + 1, t0:t1] for p in proj]
            dn = None if dones is None else dones[b : b + 1, t0:t1]
            out, mem = recurrence(*piece, dn, *mem, *(() if tk is None else (tk,)), backend="reference")
            tk = None if tk is None else tk + (t1 - t0)
            row_out.append(out)
        outs.append(torch.cat(row_out, 1))
        finals.append(mem)
    return torch.cat(outs), [torch.cat(parts) for parts in zip(*finals)]


def restart_case(r: int, seed: int):
    B, T, N = 3, 7, 4
    proj = projections(B, T, seed)
    state = memories(B, r, seed + 1)
    restart_mem = memories(N, r, seed + 2)
    tick = torch.tensor([3, 2**62 + 1, -5])
    restart_tick = torch.tensor([1, 40, 2**61 + 7, -3])
    index = torch.full((B, T), -1)
    index[0, 0], index[0, 4] = 1, 0  # a restart at t = 0 overrides the incoming state
    index[1, 2], index[1, 3], index[1, 6] = 2, 3, 2  # consecutive restarts; a row used twice
    dones = torch.zeros(B, T, dtype=torch.bool)
    dones[0, 4] = dones[1, 1] = dones[2, 3] = True  # a done at a restart point, before one, in a plain row
    return proj, dones, state, tick, index, restart_mem, restart_tick


@pytest.mark.parametrize("r", [1, 2, 7])
def test_step_residues_match_a_python_loop(r):
    from agalite_triton.oscillator import oscillator_period, step_residues

    _, _, _, tick, index, _, restart_tick = restart_case(r, seed=0)
    P = oscillator_period(r)
    want = []
    for b in range(index.shape[0]):
        before, row = int(tick[b]), []
        for t in range(index.shape[1]):
            if index[b, t] >= 0:
                before = int(restart_tick[index[b, t]])
            before += 1
            row.append(before % P)
        want.append(row)
    assert step_residues(tick, index.shape[1], r, index, restart_tick).tolist() == want
    plain = [[(int(tk) + t + 1) % P for t in range(5)] for tk in tick]
    assert step_residues(tick, 5, r).tolist() == plain


def weighted_grads(fn, tensors, seed=9):
    """``fn(leaves)`` -> (out, final) on fresh leaf copies of ``tensors``: out, final and the gradients of a
    fixed random weighting of them (the same for every call with ``seed``) with respect to every leaf."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, final = fn(leaves)
    g = torch.Generator().manual_seed(seed)
    loss = sum((torch.randn(t.shape, generator=g, dtype=t.dtype) * t).sum() for t in (out, *final))
    return out, final, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("case", ["agalite-r2", "agalite-r5", "galite"])
def test_restart_equals_split_rows_with_gradients(case):
    if case == "galite":
        proj, dones, state, index, rmem = galite_case(seed=1)
        tick = rtick = None
        recurrence = galite_recurrence
    else:
        r = int(case[-1])
        proj, dones, state, tick, index, rmem, rtick = restart_case(r, seed=r)
        recurrence = agalite_recurrence
    n = len(state)
    ticks = lambda tk: () if tk is None else (tk,)  # noqa: E731 - GaLiTe has none

    def restarted(leaves):
        p, st, rm = leaves[:8], leaves[8 : 8 + n], leaves[8 + n :]
        return recurrence(*p, dones, *st, *ticks(tick), restart=(index, *rm, *ticks(rtick)), backend="reference")

    def split(leaves):
        p, st, rm = leaves[:8], leaves[8 : 8 + n], leaves[8 + n :]
        return split_oracle(p, dones, st, tick, index, rm, rtick, recurrence=recurrence)

    out, final, grads = weighted_grads(restarted, proj + state + rmem)
    out2, final2, grads2 = weighted_grads(split, proj + state + rmem)
    torch.testing.assert_close(out, out2, rtol=1e-12, atol=1e-12)
    for a, b in zip(final, final2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(grads, grads2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of leaf {i}")
    # Row 0 restarts at t = 0: nothing of its incoming state reaches the result.
    assert all(float(gr[0].abs().max()) == 0 for gr in grads[8 : 8 + n])
    assert all(float(gr.abs().max()) > 0 for gr in grads[8 + n :])  # every restart memory is used


@pytest.mark.interpret
@pytest.mark.parametrize("steps", [1, 7])
def test_restart_kernel_matches_reference_with_gradients(steps):
    proj, dones, state, tick, index, rmem, rtick = restart_case(4, seed=3)
    proj, state, rmem = ([t.float() for t in group] for group in (proj, state, rmem))
    proj, dones, index = [p[:, :steps] for p in proj], dones[:, :steps], index[:, :steps]
    results = [
        weighted_grads(lambda v, backend=backend: agalite_recurrence(
            *v[:8], dones, *v[8:11], tick, restart=(index, *v[11:], rtick), backend=backend), proj + state + rmem, seed=1)
        for backend in ("reference", "triton")
    ]  # fmt: skip
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    for a, b in zip(f2, f1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(g2, g1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"gradient of leaf {i}")


def test_restart_without_restarts_is_the_plain_call(monkeypatch):
    monkeypatch.setenv("AGALITE_CPU_FUSED", "0")  # restarts run the eager reference: compare with it
    proj, dones, state, tick, _, rmem, rtick = restart_case(3, seed=0)
    none = torch.full(dones.shape, -1)
    out, final = agalite_recurrence(*proj, dones, *state, tick, restart=(none, *rmem, rtick), backend="reference")
    out2, final2 = agalite_recurrence(*proj, dones, *state, tick, backend="reference")
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(final, final2))


def test_restart_float32_one_step_in_place_matches_a_fresh_step(monkeypatch):
    """T = 1 restart under no_grad writing into final_out: bitwise a plain (eager) step from the restart memory."""
    monkeypatch.setenv("AGALITE_CPU_FUSED", "0")
    proj = [t.float() for t in projections(2, 1, seed=4)]
    state = [t.float() for t in memories(2, 3, seed=5)]
    rmem = [t.float() for t in memories(1, 3, seed=6)]
    index = torch.tensor([[-1], [0]])
    tick, rtick = torch.tensor([4, 9]), torch.tensor([100])
    with torch.no_grad():
        buf = [t.clone() for t in state]
        out, final = agalite_recurrence(*proj, None, *buf, tick, restart=(index, *rmem, rtick), final_out=tuple(buf))
        o0, f0 = agalite_recurrence(*[p[:1] for p in proj], None, *[m[:1] for m in state], tick[:1])
        o1, f1 = agalite_recurrence(*[p[1:] for p in proj], None, *rmem, rtick)
    assert torch.equal(out, torch.cat([o0, o1])) and final[0].data_ptr() == buf[0].data_ptr()
    assert all(torch.equal(a, torch.cat([x, y])) for a, x, y in zip(final, f0, f1))


def test_restart_bad_arguments_name_themselves():
    proj, dones, state, tick, index, rmem, rtick = restart_case(2, seed=0)
    call = lambda **kw: agalite_recurrence(*proj, dones, *state, tick, backend="reference", **kw)
    with pytest.raises(TypeError, match=r"^restart: expected a tuple"):
        call(restart=(index, *rmem))
    with pytest.raises(ValueError, match=r"^restart.index: expected a restart row in \[0, 4\)|^restart.index: expected -1"):
        call(restart=(index.masked_fill(index == 3, 4), *rmem, rtick))
    shared = index.clone()
    shared[2, 5] = 3  # row 3 is batch row 1's already
    with pytest.raises(ValueError, match=r"^restart.index: expected each restart row used by one batch row, got row 3 used by batch rows 1 and 2"):
        call(restart=(shared, *rmem, rtick))
    with pytest.raises(TypeError, match=r"^restart.index: expected dtype torch.int64"):
        call(restart=(index.int(), *rmem, rtick))
    with pytest.raises(ValueError, match=r"^restart.tilde_v: expected shape"):
        call(restart=(index, rmem[0], rmem[1][:3], rmem[2], rtick))
    with pytest.raises(TypeError, match=r"^restart.tilde_k: expected dtype torch.float64"):
        call(restart=(index, rmem[0].float(), *rmem[1:], rtick))


def galite_case(seed: int, nu: int = 3):
    """restart_case's batch, restart points and dones for GaLiTe: (B, T, H, nu) factors, memories (c, s)."""
    _, dones, _, _, index, _, _ = restart_case(2, seed)
    B, T, N = 3, 7, 4
    g = torch.Generator().manual_seed(seed)
    proj = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(5)]
    proj += [torch.randn(B, T, H, nu, generator=g, dtype=torch.float64) for _ in range(3)]

    def mem(batch):
        return [torch.randn(batch, H, D, nu * D, generator=g, dtype=torch.float64),
                torch.rand(batch, H, nu * D, generator=g, dtype=torch.float64)]  # fmt: skip

    return proj, dones, mem(B), index, mem(N)


def test_galite_slots_step_equals_those_rows_alone():
    proj, dones, _, _, _ = galite_case(seed=2)
    proj, dones = [t[:, :3].float() for t in proj], dones[:, :3]
    g = torch.Generator().manual_seed(3)
    mem = [torch.randn(7, H, D, 3 * D, generator=g), torch.rand(7, H, 3 * D, generator=g)]
    slots = torch.tensor([5, 0, 3])
    with torch.no_grad():
        alone_out, alone = galite_recurrence(*proj, dones, *[m[slots] for m in mem])
        live = [m.clone() for m in mem]
        out, final = galite_recurrence(*proj, dones, *live, final_out=tuple(live), slots=slots)
    assert torch.equal(out, alone_out)
    others = torch.tensor([1, 2, 4, 6])
    for name, a, b, before, fin in zip(("c", "s"), live, alone, mem, final):
        assert fin.data_ptr() == a.data_ptr(), name
        assert torch.equal(a[slots], b), name
        assert torch.equal(a[others], before[others]), name


# ----------------------------------------------------------------------------------------------- slots
def big_state(batch: int, r: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    mem = [t.float() for t in memories(batch, r, seed)]
    return mem, torch.arange(batch, dtype=torch.int64) * 5 + 2**40


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 3])
def test_slots_step_equals_those_rows_alone(backend, steps):
    mem, tick = big_state(7, 3, seed=steps)
    slots = torch.tensor([5, 0, 3])
    proj = [t.float() for t in projections(3, steps, seed=11)]
    dones = torch.tensor([[True], [False], [False]]).expand(3, steps).contiguous()
    with torch.no_grad():
        alone_out, alone = agalite_recurrence(
            *proj, dones, *[m[slots] for m in mem], tick[slots], backend=backend
        )  # fmt: skip
        live = [m.clone() for m in mem]
        out, final = agalite_recurrence(
            *proj, dones, *live, tick, final_out=tuple(live), slots=slots, backend=backend
        )  # fmt: skip
    assert torch.equal(out, alone_out)
    others = torch.tensor([1, 2, 4, 6])
    for name, a, b, before, fin in zip(("tilde_k", "tilde_v", "s"), live, alone, mem, final):
        assert fin.data_ptr() == a.data_ptr(), name
        assert torch.equal(a[slots], b), name
        assert torch.equal(a[others], before[others]), name


def test_slots_bad_arguments_name_themselves():
    mem, tick = big_state(5, 2, seed=0)
    proj = [t.float() for t in projections(2, 1, seed=1)]
    call = lambda slots, **kw: agalite_recurrence(*proj, None, *mem, tick, slots=slots, **kw)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^slots: needs final_out"):
            call(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"^slots: expected state rows in \[0, 5\), got values in \[1, 5\]"):
            call(torch.tensor([5, 1]), final_out=tuple(mem))
        with pytest.raises(ValueError, match=r"^slots: expected state rows in \[0, 5\), got values in \[-1, 2\]"):
            call(torch.tensor([2, -1]), final_out=tuple(mem))
        with pytest.raises(ValueError, match=r"^slots: expected distinct state rows, got 1 repeated"):
            call(torch.tensor([3, 3]), final_out=tuple(mem))
        with pytest.raises(ValueError, match=r"^slots: expected shape \(2,?\)"):
            call(torch.tensor([3]), final_out=tuple(mem))
        with pytest.raises(TypeError, match=r"^slots: expected dtype torch.int64"):
            call(torch.tensor([3, 1], dtype=torch.int32), final_out=tuple(mem))
        index = torch.full((2, 1), -1)
        with pytest.raises(ValueError, match=r"^slots and restart"):
            call(torch.tensor([0, 1]), final_out=tuple(mem), restart=(index, *[m[:1] for m in mem], tick[:1]))
    with pytest.raises(RuntimeError, match=r"^final_out: only for inference"):
        call(torch.tensor([0, 1]), final_out=tuple(mem))


# ------------------------------------------------------------------------------------------ the model
# Both models (GaLiTe has no Triton kernels yet: its model runs on the reference backend only).
MODEL_CASES = [("agalite", "reference"), pytest.param("agalite", "triton", marks=pytest.mark.interpret),
               ("galite", "reference")]  # fmt: skip


def small_model(kind: str = "agalite", **kw) -> RecurrentStack:
    sizes = dict(input_dim=4, d_model=12, n_layers=2, n_heads=2, d_head=3, d_ffc=10, eta=2, r=4, nu=3)
    return make_core(kind, **{**sizes, **kw})


def busy_state(model: RecurrentStack, batch: int, seed: int) -> StateOps:
    return _busy_state(model, batch, seed, tick=torch.arange(batch) * 7 + 3)


@pytest.mark.parametrize("kind,backend", MODEL_CASES)
def test_model_env_ids_steps_equal_those_envs_alone(kind, backend):
    model = small_model(kind, backend=backend)
    state = busy_state(model, 6, seed=1)
    g = torch.Generator().manual_seed(2)
    live = state.clone()
    with torch.no_grad():
        for ids in ([4, 1, 5], [5, 4, 3, 2, 1, 0]):  # unsorted, then every row in reverse
            ids = torch.tensor(ids)
            x = torch.randn(len(ids), 4, generator=g)
            done = torch.rand(len(ids), generator=g) < 0.4
            alone_y, alone = model(x, live.select(ids), done)
            before = live.clone()
            y, out = model(x, live, done, env_ids=ids, out=live)
            assert out is live and torch.equal(y, alone_y)
            assert all(torch.equal(a, b) for a, b in zip(live.select(ids), alone))
            rest = torch.tensor([i for i in range(6) if i not in ids.tolist()], dtype=torch.int64)
            assert all(torch.equal(a, b) for a, b in zip(live.select(rest), before.select(rest)))
        # out=None: a stepped copy, the state passed in untouched.
        ids = torch.tensor([2, 0])
        x = torch.randn(2, 3, 4, generator=g)
        snapshot = live.clone()
        y, copy = model(x, live, None, env_ids=ids)
    assert copy is not live and all(torch.equal(a, b) for a, b in zip(live, snapshot))
    assert y.shape == (2, 3, model.d_model)
    if model.has_tick:
        assert torch.equal(copy.tick[ids], live.tick[ids] + 3)
    with torch.no_grad():
        alone_y, alone = model(x, live.select(ids))
    assert torch.equal(y, alone_y) and all(torch.equal(a, b) for a, b in zip(copy.select(ids), alone))


@pytest.mark.parametrize("kind", KINDS)
def test_model_env_ids_bad_arguments(kind):
    model = small_model(kind)
    state = busy_state(model, 4, seed=1)
    x = torch.randn(2, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^env_ids: expected state rows in \[0, 4\), got values in \[1, 4\]"):
            model(x, state, env_ids=torch.tensor([4, 1]), out=state)
        with pytest.raises(ValueError, match=r"^env_ids: expected distinct state rows, got 1 repeated"):
            model(x, state, env_ids=torch.tensor([2, 2]), out=state)
        with pytest.raises(ValueError, match=r"^env_ids: expected shape \(2,?\)"):
            model(x, state, env_ids=torch.tensor([0, 1, 2]), out=state)
        with pytest.raises(ValueError, match=r"^state: env_ids steps rows of a given state"):
            model(x, None, env_ids=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"^env_ids and restart"):
            model(x, state, env_ids=torch.tensor([0, 1]), restart=torch.zeros(2, dtype=torch.bool),
                  restart_state=state.select(slice(0, 0)))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^env_ids: only for inference"):
        model(x, state, env_ids=torch.tensor([0, 1]), out=state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_model_restart_equals_running_from_the_restart_state(batch_first, kind):
    model = small_model(kind, batch_first=batch_first)
    B, T = 3, 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, 4, generator=g)
    dones = torch.zeros(B, T, dtype=torch.bool)
    dones[2, 1] = True
    state = busy_state(model, B, seed=4)
    restart = torch.zeros(B, T, dtype=torch.bool)
    restart[0, 3] = restart[2, 0] = restart[2, 4] = True
    rs = _busy_state(model, 3, seed=5, tick=torch.tensor([2**50, 11, 1]))
    rs = rs._with_memories([t.requires_grad_() for t in rs.memories()], rs[-1])
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    y, final = model(layout(x), state, layout(dones), restart=layout(restart), restart_state=rs)
    y = layout(y)
    # Row-major numbering of the restart mask: (0, 3) -> 0, (2, 0) -> 1, (2, 4) -> 2.
    pieces = [
        (0, 0, 3, state.select(slice(0, 1))), (0, 3, 6, rs.select(slice(0, 1))),
        (1, 0, 6, state.select(slice(1, 2))),
        (2, 0, 4, rs.select(slice(1, 2))), (2, 4, 6, rs.select(slice(2, 3))),
    ]  # fmt: skip
    # float32 rounding of a batch of 1 against a batch of 3. GaLiTe's read-out divides by <s, Q>, which
    # amplifies it (measured 2.6e-5 relative; a float64 model agrees to 1e-15).
    tol = dict(rtol=1e-5, atol=1e-6) if kind == "agalite" else dict(rtol=1e-4, atol=1e-5)
    for b, t0, t1, st in pieces:
        yp, fp = model(layout(x[b : b + 1, t0:t1]), st, layout(dones[b : b + 1, t0:t1]))
        torch.testing.assert_close(y[b : b + 1, t0:t1], layout(yp), **tol)
        if t1 == T:
            for a, c in zip(final.select(slice(b, b + 1)), fp):
                torch.testing.assert_close(a, c, **tol)
    if model.has_tick:
        assert final.tick.tolist() == [2**50 + 3, state.tick[1].item() + 6, 1 + 2]
    y.square().sum().backward()
    assert all(t.grad is not None and float(t.grad.abs().max()) > 0 for t in rs.memories())
    # One step (B,): rows 0 and 2 restart, bitwise a step from the state with those rows replaced.
    with torch.no_grad():
        one = torch.tensor([True, False, True])
        y1, s1 = model(x[:, 0], state, dones[:, 0], restart=one, restart_state=rs.select(slice(0, 2)).detach())
        mixed = type(state).cat([rs.select(0).detach(), state.select(1), rs.select(1).detach()])
        y2, s2 = model(x[:, 0], mixed, dones[:, 0])
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(s1, s2))


@pytest.mark.parametrize("kind", KINDS)
def test_model_restart_bad_arguments(kind):
    model = small_model(kind)
    state = busy_state(model, 2, seed=1)
    x = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 1] = True
    with pytest.raises(ValueError, match=r"^restart_state: expected batch size restart.sum\(\)=1, got 2"):
        model(x, state, restart=mask, restart_state=state)
    with pytest.raises(ValueError, match=r"^restart_state: expected restart and restart_state together"):
        model(x, state, restart=mask)
    with pytest.raises(TypeError, match=r"^restart: expected dtype torch.bool"):
        model(x, state, restart=mask.long(), restart_state=state.select(slice(0, 1)))
    with pytest.raises(ValueError, match=r"^restart: expected shape \(2, 3\)"):
        model(x, state, restart=mask[:, :2], restart_state=state.select(slice(0, 1)))
    other = dict(r=2) if kind == "agalite" else dict(nu=2)
    with pytest.raises(ValueError, match=rf"^restart_state.{state._fields[0]}: expected shape"):
        model(x, state, restart=mask, restart_state=small_model(kind, **other).initial_state(1))
    with pytest.raises(TypeError, match=rf"^restart_state: expected an {type(state).__name__}"):
        model(x, state, restart=mask, restart_state=tuple(state.select(slice(0, 1))))
