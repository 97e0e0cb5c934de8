"""Model-level behaviour: equivalences, dones, ticks, layouts, presets, state packing, bad inputs.

Tests of the call conventions every :class:`~agalite_triton.stack.RecurrentStack` shares run over both
models (``kind``); those of AGaLiTe's tick and sizes run on AGaLiTe alone (GaLiTe's in test_galite_model).
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import PRESETS, AGaLiTe
from agalite_triton.stack import RecurrentStack

from .cores import KINDS, assert_states_close, busy_state, fresh_state, make_core

IN = 7
# Odd sizes: 3 heads of 5, eta = 3 (AGaLiTe) or nu = 3 (GaLiTe).
SIZES = dict(input_dim=IN, d_model=24, n_layers=2, n_heads=3, d_head=5, d_ffc=20, eta=3, r=4, nu=3)

kinds = pytest.mark.parametrize("kind", KINDS)


def small_model(kind: str = "agalite", **kw) -> RecurrentStack:
    return make_core(kind, **{**SIZES, **kw})


def data(B: int, T: int, seed: int = 0, p_done: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, IN, generator=g), torch.rand(B, T, generator=g) < p_done


@kinds
@torch.no_grad()
def test_sequence_equals_one_step_calls(kind) -> None:
    model = small_model(kind)
    B, T = 6, 9
    x, d = data(B, T)
    st0 = busy_state(model, B)
    y, st = model(x, st0, d)
    ys, st_steps = [], st0
    for t in range(T):
        yt, st_steps = model(x[:, t], st_steps, d[:, t])
        assert yt.shape == (B, model.d_model)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)
    assert_states_close(st, st_steps, rtol=1e-5, atol=1e-5)
    if model.has_tick:
        assert torch.equal(st.tick, st0.tick + T)


@kinds
@torch.no_grad()
def test_batch_equals_environments_one_by_one(kind) -> None:
    model = small_model(kind)
    B, T = 5, 8
    x, d = data(B, T, seed=3)
    st0 = busy_state(model, B)
    y, st = model(x, st0, d)
    for b in range(B):
        yb, stb = model(x[b : b + 1], st0.select(b), d[b : b + 1])
        torch.testing.assert_close(yb, y[b : b + 1], rtol=1e-5, atol=1e-6)
        assert_states_close(stb, st.select(b), rtol=1e-5, atol=1e-6)


@kinds
@torch.no_grad()
def test_dones_reset_exactly_the_marked_environments(kind) -> None:
    model = small_model(kind)
    B, T, t_done = 4, 10, 6
    x, _ = data(B, T, seed=4)
    d = torch.zeros(B, T, dtype=torch.bool)
    d[1, t_done] = True
    st0 = busy_state(model, B)
    y, st = model(x, st0, d)
    y_free, st_free = model(x, st0)  # no dones at all
    untouched = [0, 2, 3]
    assert torch.equal(y[untouched], y_free[untouched])
    assert torch.equal(y[1, :t_done], y_free[1, :t_done])
    assert not torch.allclose(y[1, t_done:], y_free[1, t_done:])
    # From the done on, env 1 behaves as if it started from zero memory carrying the same tick.
    fresh = fresh_state(model, 1, st0.tick[1:2] + t_done if model.has_tick else None)
    y_fresh, st_fresh = model(x[1:2, t_done:], fresh)
    torch.testing.assert_close(y[1:2, t_done:], y_fresh, rtol=1e-5, atol=1e-6)
    assert_states_close(st.select(1), st_fresh, rtol=1e-5, atol=1e-6)


@kinds
@torch.no_grad()
def test_every_step_done_ignores_all_history(kind) -> None:
    model = small_model(kind)
    x, _ = data(3, 5, seed=5)
    d = torch.ones(3, 5, dtype=torch.bool)
    y1, _ = model(x, busy_state(model, 3), d)
    y2, _ = model(x, busy_state(model, 3, seed=9), d)
    assert torch.equal(y1, y2)


@kinds
@torch.no_grad()
def test_float_dones_equal_bool_dones_and_reset_flag_ignores_them(kind) -> None:
    model = small_model(kind)
    x, d = data(3, 6, seed=6, p_done=0.4)
    st0 = busy_state(model, 3)
    y_bool, _ = model(x, st0, d)
    y_float, _ = model(x, st0, d.float())
    assert torch.equal(y_bool, y_float)
    model_no_reset = small_model(kind, reset_on_terminate=False)
    y_ignored, _ = model_no_reset(x, st0, d)
    y_none, _ = model_no_reset(x, st0, None)
    assert torch.equal(y_ignored, y_none)
    assert not torch.allclose(y_ignored, y_bool)


@torch.no_grad()
def test_tick_advances_by_t_and_dones_do_not_reset_it() -> None:
    model = small_model()
    st0 = model.initial_state(3)
    assert torch.equal(st0.tick, torch.ones(3, dtype=torch.int64))
    x, _ = data(3, 4)
    _, st = model(x, st0, torch.ones(3, 4, dtype=torch.bool))
    assert torch.equal(st.tick, torch.full((3,), 5))


@torch.no_grad()
def test_huge_tick_uses_exact_phase() -> None:
    # r = 4: omega = {-pi, -pi/3, pi/3, pi}; the period is 6. A tick of 2**40 + k must act as
    # (2**40 + k) mod 6, which a float64 tick * omega cannot resolve this far out.
    model = small_model()
    x, d = data(2, 5, seed=7)
    st0 = busy_state(model, 2)
    big = st0._replace(tick=torch.tensor([2**40, 2**62 - 1]))
    small = st0._replace(tick=torch.tensor([2**40 % 6, (2**62 - 1) % 6]))
    y_big, st_big = model(x, big, d)
    y_small, _ = model(x, small, d)
    assert torch.equal(y_big, y_small)
    assert torch.equal(st_big.tick, big.tick + 5)


@kinds
@torch.no_grad()
def test_time_major_equals_batch_first(kind) -> None:
    bf = small_model(kind)
    tm = small_model(kind, batch_first=False)
    tm.load_state_dict(bf.state_dict())
    x, d = data(4, 6, seed=8)
    st0 = busy_state(bf, 4)
    y_bf, st_bf = bf(x, st0, d)
    y_tm, st_tm = tm(x.transpose(0, 1), st0, d.transpose(0, 1))
    assert y_tm.shape == (6, 4, bf.d_model)
    assert torch.equal(y_tm.transpose(0, 1), y_bf)
    assert_states_close(st_tm, st_bf, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dones"):
        tm(x.transpose(0, 1), st0, d)  # batch-first dones on a time-major model


@kinds
@torch.no_grad()
def test_state_is_not_modified_by_forward(kind) -> None:
    model = small_model(kind)
    st0 = busy_state(model, 3)
    before = st0.clone()
    x, d = data(3, 1)
    model(x[:, 0], st0, d[:, 0])
    model(x, st0, d)
    assert all(torch.equal(a, b) for a, b in zip(st0, before))


@kinds
def test_gradients_reach_initial_state_and_inputs(kind) -> None:
    model = small_model(kind)
    x, d = data(2, 5, seed=10)
    x.requires_grad_()
    st0 = busy_state(model, 2)
    mems = [m.clone().requires_grad_() for m in st0.memories()]
    y, st = model(x, st0._with_memories(mems, st0[-1]), d)
    (y.square().sum() + sum(m.sum() for m in st.memories())).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in mems)
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------- state
@kinds
def test_state_helpers(kind) -> None:
    model = small_model(kind)
    st = busy_state(model, 4)
    mask = torch.tensor([True, False, True, False])
    reset = model.reset_state(st, mask)
    assert type(reset) is model.state_class and len(reset) == len(st)
    if model.has_tick:
        assert torch.equal(reset.tick, st.tick)
    for t_reset, t in zip(reset.memories(), st.memories()):
        assert torch.all(t_reset[:, mask] == 0)
        assert torch.equal(t_reset[:, ~mask], t[:, ~mask])
    picked = st.select(torch.tensor([2, 0]))
    assert picked.batch_size == 2 and torch.equal(picked[0][:, 0], st[0][:, 2])
    assert all(torch.equal(a, b[:, 1:2]) for a, b in zip(st.select(1).memories(), st.memories()))
    if model.has_tick:
        assert torch.equal(st.select(1).tick, st.tick[1:2])
    joined = model.state_class.cat([st.select(slice(0, 1)), st.select(slice(1, 4))])
    assert all(torch.equal(a, b) for a, b in zip(joined, st))
    st_grad = st._with_memories([m.clone().requires_grad_() for m in st.memories()], st[-1])
    assert not any(t.requires_grad for t in st_grad.detach())
    assert st.nbytes_per_env() == model.state_bytes_per_env


@kinds
@torch.no_grad()
def test_reset_then_call_equals_done_on_first_step(kind) -> None:
    model = small_model(kind)
    x, d = data(4, 5, seed=11)
    st0 = busy_state(model, 4)
    mask = torch.tensor([False, True, True, False])
    d[:, 0] = mask
    y_done, _ = model(x, st0, d)
    d2 = d.clone()
    d2[:, 0] = False
    y_reset, _ = model(x, st0.reset(mask), d2)
    assert torch.equal(y_done, y_reset)


def test_pack_unpack_round_trip_keeps_memories_and_tick_modulo_period() -> None:
    model = small_model()
    P = model.tick_period
    st = busy_state(model, 5)._replace(tick=torch.tensor([0, 1, 2**62 - 1, -7, 2**53 + 1]))
    packed = model.pack_state(st)
    assert packed.shape == (5, model.state_size) and packed.dtype == torch.float32
    assert model.state_size == model.n_layers * (4 * 3 * 15 + 4 * 3 * 5 + 3 * 15) + 1
    back = model.unpack_state(packed)
    assert all(torch.equal(a, b) for a, b in zip(back.memories(), st.memories()))
    # The tick comes back as 1 + ((tick - 1) mod P): congruent, in [1, P].
    assert back.tick.tolist() == [1 + (t - 1) % P for t in st.tick.tolist()]
    x, d = data(5, 4, seed=3)
    with torch.no_grad():
        y, after = model(x, st, d)
        y_back, after_back = model(x, back, d)
    assert torch.equal(y, y_back) and all(torch.equal(a, b) for a, b in zip(after.memories(), after_back.memories()))
    # Rows of the packed tensor are environments: indexing commutes with packing.
    assert all(torch.equal(a, b) for a, b in zip(model.unpack_state(packed[[3, 1]]), back.select(torch.tensor([3, 1]))))
    with pytest.raises(ValueError, match="packed"):
        model.unpack_state(packed[:, :-1])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name: str) -> None:
    model = AGaLiTe.from_preset(name, input_dim=11)
    cfg = PRESETS[name]
    assert (model.n_layers, model.d_model, model.n_heads, model.d_head, model.eta, model.r) == (
        cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["eta"], cfg["r"])  # fmt: skip
    L, R, H, D, E = cfg["n_layers"], cfg["r"], cfg["n_heads"], cfg["d_head"], cfg["eta"] * cfg["d_head"]
    assert model.state_bytes_per_env == 4 * L * (R * H * E + R * H * D + H * E) + 8
    assert model.layers[0].dropout.p == cfg.get("dropout", 0.0)
    every = {type(m).__name__ for m in model.modules()}
    assert {"LayerNorm", "GRUGatingUnit", "AGaLiTeAttention"} <= every
    assert AGaLiTe.from_preset(name, input_dim=11, r=3).r == 3
    with torch.no_grad():
        y, st = model(torch.randn(2, 11), model.initial_state(2))
    assert y.shape == (2, cfg["d_model"])


def test_paper_preset_state_bytes() -> None:
    # 4 layers x (2*4*256 + 2*4*64 + 4*256) float32 + an int64 tick.
    assert AGaLiTe.from_preset("paper", 8).state_bytes_per_env == 4 * 4 * (2048 + 512 + 1024) + 8


def test_initialisation_matches_the_original() -> None:
    model = small_model()
    layer = model.layers[0]
    assert layer.ln1.eps == 1e-6 and layer.ln2.eps == 1e-6
    assert torch.all(layer.gate1.bgp == 2.0)
    assert torch.all(layer.attn.in_proj.bias == 0) and torch.all(layer.ffn_in.bias == 0)
    # Each fused block is its own orthogonal matrix with gain sqrt(2): W W^T = 2 I on the short side.
    w = layer.gate1.w_y.weight[: model.d_model]
    torch.testing.assert_close(w @ w.t(), 2 * torch.eye(model.d_model), atol=1e-5, rtol=0)
    kqv = layer.attn.in_proj.weight[: layer.attn.n_kqvbg]  # (5HD, d_model): columns orthonormal
    torch.testing.assert_close(kqv.t() @ kqv, 2 * torch.eye(model.d_model), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- bad inputs
def _bad_calls(model: AGaLiTe):
    st = model.initial_state(3)
    x = torch.randn(3, 4, IN)
    d = torch.zeros(3, 4, dtype=torch.bool)
    other = AGaLiTe(IN, 24, 2, 3, 5, 20, 3, r=2)
    return [
        ("rank", lambda: model(torch.randn(3, 4, 2, IN), st), ValueError, r"x: expected 3 dimensions"),
        ("rank1", lambda: model(torch.randn(IN), st), ValueError, r"x: expected 3 dimensions"),
        ("features", lambda: model(torch.randn(3, 4, IN + 1), st), ValueError, r"x: expected last dimension input_dim=7"),
        ("x dtype", lambda: model(x.double(), st), TypeError, r"x: expected dtype torch.float32"),
        ("x int", lambda: model(x.long(), st), TypeError, r"x: expected dtype"),
        ("x type", lambda: model(x.numpy(), st), TypeError, r"x: expected a torch.Tensor"),
        ("state batch", lambda: model(x, model.initial_state(2)), ValueError, r"state.tilde_k: expected shape .*3"),
        ("state sizes", lambda: model(x, other.initial_state(3)), ValueError, r"state.tilde_k: expected shape"),
        ("state type", lambda: model(x, tuple(st)), TypeError, r"state: expected an AGaLiTeState"),
        ("tick dtype", lambda: model(x, st._replace(tick=st.tick.float())), TypeError, r"state.tick: expected dtype torch.int64"),
        ("state dtype", lambda: model(x, st._replace(s=st.s.double())), TypeError, r"state.s: expected dtype torch.float32"),
        ("dones batch", lambda: model(x, st, torch.zeros(2, 4, dtype=torch.bool)), ValueError, r"dones: expected shape \(3, 4\)"),
        ("dones time", lambda: model(x, st, torch.zeros(3, 5, dtype=torch.bool)), ValueError, r"dones: expected shape \(3, 4\)"),
        ("dones dtype", lambda: model(x, st, torch.zeros(3, 4, dtype=torch.int64)), TypeError, r"dones: expected dtype torch.bool"),
        ("step dones", lambda: model(x[:, 0], st, d), ValueError, r"dones: expected 1 dimensions \(3\)"),
        ("device", lambda: model(x, st._replace(s=st.s.to("meta"))), ValueError, r"state.s: expected a tensor on cpu"),
        ("dones device", lambda: model(x, st, d.to("meta")), ValueError, r"dones: expected a tensor on cpu"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(17))
def test_bad_inputs_raise_naming_the_argument(case: int) -> None:
    model = small_model()
    name, call, exc, pattern = _bad_calls(model)[case]
    with pytest.raises(exc, match=pattern):
        call()


@kinds
def test_bad_constructor_arguments(kind) -> None:
    with pytest.raises(ValueError, match="d_head"):
        small_model(kind, d_head=0)
    with pytest.raises(ValueError, match="dropout"):
        small_model(kind, dropout=1.5)
    with pytest.raises(ValueError, match="backend"):
        small_model(kind, backend="cuda")
    with pytest.raises(ValueError, match="name: expected one of"):
        type(small_model(kind)).from_preset("huge", IN)
    with pytest.raises(ValueError, match="batch_size"):
        small_model(kind).initial_state(-1)
    own = dict(eta=0) if kind == "agalite" else dict(nu=0)
    with pytest.raises(ValueError, match=f"^{next(iter(own))}: expected a positive int, got 0"):
        small_model(kind, **own)


@kinds
@torch.no_grad()
def test_out_state_buffers_and_in_place_stepping(kind) -> None:
    model = small_model(kind)
    B, T = 4, 5
    x, d = data(B, T, seed=12)
    st0 = busy_state(model, B)
    y_ref, st_ref = model(x, st0, d)
    # Double buffering, then fully in place: the same numbers as out-of-place calls.
    spare = model.initial_state(B)
    y_buf, got = model(x, st0, d, out=spare)
    assert got is spare and torch.equal(y_buf, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(spare, st_ref))
    st_ip = st0.clone()
    ys = []
    for t in range(T):
        yt, got = model(x[:, t], st_ip, d[:, t], out=st_ip)
        assert got is st_ip
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    assert_states_close(st_ip, st_ref, rtol=1e-5, atol=1e-5)


@kinds
def test_out_state_is_rejected_with_autograd_or_wrong_sizes(kind) -> None:
    model = small_model(kind)
    st = model.initial_state(3)
    x = torch.randn(3, IN)
    with pytest.raises(RuntimeError, match="out: only for inference"):
        model(x, st, out=st)
    with torch.no_grad(), pytest.raises(ValueError, match=f"out.{st._fields[0]}: expected shape"):
        model(x, st, out=model.initial_state(2))
