"""Hostile inputs across the public API: bad calls fail loudly, naming the argument; odd but valid calls work.

Bad calls (the table ``BAD_CALLS``): each must raise the listed exception with a message naming the
argument, before any kernel runs, and leave the state and the parameters passed in untouched.

Odd but valid calls, with the documented result:
  * non-contiguous and expanded (stride-0) tensors work and give bitwise the result of contiguous copies;
  * NaN/inf inputs are propagated, not rejected (no host sync in the hot path), and stay in their
    environment: a NaN in env i's input or memory makes env i's outputs and state NaN and no other env's.
    A done inside a call does not clear a NaN memory (it multiplies by 0, as the original); ``state.reset``
    writes exact zeros and does;
  * an empty batch (B = 0) returns empty outputs and state; T = 0 returns an empty output and the state
    unchanged, tick included;
  * negative ticks are valid: the phase is exact for any int64 tick.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from agalite_triton import AGaLiTe, AGaLiTeState, GaLiTe, GaLiTeState, agalite_recurrence, galite_recurrence, kernels
from agalite_triton.convert import export_flax_params, load_flax_params

IN, DM, L, H, D, FF, ETA, R = 5, 8, 2, 2, 4, 8, 2, 3
E = ETA * D
NU = 3  # GaLiTe: K = NU * D
K = NU * D
B, T = 3, 4

kernel_marks = [pytest.mark.interpret,
                pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}")]
BACKENDS = ["reference", pytest.param("triton", marks=kernel_marks)]


@dataclass
class Ctx:
    """A model, a valid call (x, dones, state) and valid functional-recurrence arguments."""

    model: AGaLiTe | GaLiTe
    x: torch.Tensor
    dones: torch.Tensor
    state: AGaLiTeState | GaLiTeState
    rec: dict[str, torch.Tensor | None] = field(default_factory=dict)
    monkeypatch: pytest.MonkeyPatch | None = None

    def forward(self, **kw):
        args = dict(x=self.x, state=self.state, dones=self.dones) | kw
        return self.model(args["x"], args["state"], args["dones"])

    def recurrence(self, **kw):
        args = dict(self.rec) | kw
        backend = args.pop("backend", "reference")
        final_out = args.pop("final_out", None)
        recurrence = galite_recurrence if isinstance(self.model, GaLiTe) else agalite_recurrence
        return recurrence(**args, backend=backend, final_out=final_out)


def make_ctx(monkeypatch=None) -> Ctx:
    torch.manual_seed(0)
    model = AGaLiTe(IN, DM, L, H, D, FF, ETA, R, backend="reference")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, IN, generator=g)
    dones = torch.zeros(B, T, dtype=torch.bool)
    dones[1, 2] = True
    state = model.initial_state(B)
    state = AGaLiTeState(torch.randn(state.tilde_k.shape, generator=g), torch.randn(state.tilde_v.shape, generator=g),
                         torch.rand(state.s.shape, generator=g), torch.tensor([1, 50, -7]))  # fmt: skip
    names = ["keys", "queries", "values", "beta", "gamma"]
    rec: dict[str, torch.Tensor | None] = {n: torch.randn(B, T, H, D, generator=g) for n in names}
    rec |= {n: torch.randn(B, T, H, ETA, generator=g) for n in ("p1", "p2", "p3")}
    rec |= dict(dones=dones.clone(), tilde_k=state.tilde_k[0].clone(), tilde_v=state.tilde_v[0].clone(),
                s=state.s[0].clone(), tick=state.tick.clone())  # fmt: skip
    return Ctx(model, x, dones, state, rec, monkeypatch)


def make_galite_ctx(monkeypatch=None) -> Ctx:
    torch.manual_seed(0)
    model = GaLiTe(IN, DM, L, H, D, FF, NU, backend="reference")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, IN, generator=g)
    dones = torch.zeros(B, T, dtype=torch.bool)
    dones[1, 2] = True
    init = model.initial_state(B)
    state = GaLiTeState(torch.randn(init.c.shape, generator=g), torch.rand(init.s.shape, generator=g))
    names = ["keys", "queries", "values", "beta", "gamma"]
    rec: dict[str, torch.Tensor | None] = {n: torch.randn(B, T, H, D, generator=g) for n in names}
    rec |= {n: torch.randn(B, T, H, NU, generator=g) for n in ("p1", "p2", "p3")}
    rec |= dict(dones=dones.clone(), c=state.c[0].clone(), s=state.s[0].clone())
    return Ctx(model, x, dones, state, rec, monkeypatch)


def other_model(**overrides) -> AGaLiTe:
    sizes = dict(input_dim=IN, d_model=DM, n_layers=L, n_heads=H, d_head=D, d_ffc=FF, eta=ETA, r=R) | overrides
    return AGaLiTe(**sizes)


def flax_params(ctx: Ctx) -> dict[str, np.ndarray]:
    return export_flax_params(ctx.model)


def _drop_one(d: dict) -> dict:
    d = dict(d)
    d.pop(sorted(d)[0])
    return d


def _reshape_one(d: dict) -> dict:
    d = dict(d)
    key = "params/layer1/LayerNorm_0/scale"
    d[key] = np.zeros(DM + 1, dtype=np.float32)
    return d


def _set_env(ctx: Ctx, name: str, value: str) -> Ctx:
    ctx.monkeypatch.setenv(name, value)
    return ctx


# (id, call, exception, pattern the message must match: it names the argument)
BadCall = tuple[str, Callable[[Ctx], object], type[BaseException], str]
# Bad x and dones: the same errors from either model (make_ctx and make_galite_ctx share IN, B and T).
INPUT_BAD_CALLS: list[BadCall] = [
    ("x_rank_4", lambda c: c.forward(x=c.x[None]), ValueError, r"^x: expected 3 dimensions"),
    ("x_rank_1", lambda c: c.forward(x=c.x[0, 0], state=None, dones=None), ValueError, r"^x: expected 3"),
    ("x_last_dim", lambda c: c.forward(x=c.x[..., :-1]), ValueError, r"^x: expected last dimension input_dim=5"),
    ("x_int_dtype", lambda c: c.forward(x=c.x.long()), TypeError, r"^x: expected dtype"),
    ("x_float64_vs_float32_model", lambda c: c.forward(x=c.x.double()), TypeError, r"^x: expected dtype torch.float32"),
    ("x_numpy", lambda c: c.forward(x=c.x.numpy()), TypeError, r"^x: expected a torch.Tensor, got ndarray"),
    ("x_on_meta_device", lambda c: c.forward(x=c.x.to("meta"), state=None, dones=None), ValueError,
     r"^x: expected a tensor on cpu"),
    ("dones_shape", lambda c: c.forward(dones=c.dones[:, :-1]), ValueError, r"^dones: expected shape \(3, 4\)"),
    ("dones_time_major", lambda c: c.forward(dones=c.dones.t()), ValueError, r"^dones: expected shape"),
    ("dones_int_dtype", lambda c: c.forward(dones=c.dones.long()), TypeError, r"^dones: expected dtype torch.bool"),
    ("dones_on_meta_device", lambda c: c.forward(dones=c.dones.to("meta")), ValueError,
     r"^dones: expected a tensor on cpu"),
]
BAD_CALLS: list[BadCall] = [
    *INPUT_BAD_CALLS,
    # model forward: state rank, shape, dtype, device, type
    ("state_batch_mismatch", lambda c: c.forward(state=c.state.select(slice(0, 2))), ValueError,
     r"^state.tilde_k: expected shape \(2, 3, 3, 2, 8\)"),
    ("state_other_r", lambda c: c.forward(state=other_model(r=2).initial_state(B)), ValueError,
     r"^state.tilde_k: expected shape"),
    ("state_other_layers", lambda c: c.forward(state=other_model(n_layers=1).initial_state(B)), ValueError,
     r"^state.tilde_k: expected shape"),
    ("state_float64", lambda c: c.forward(state=AGaLiTeState(*(t.double() for t in c.state[:3]), c.state.tick)),
     TypeError, r"^state.tilde_k: expected dtype torch.float32"),
    ("state_tick_int32", lambda c: c.forward(state=c.state._replace(tick=c.state.tick.int())), TypeError,
     r"^state.tick: expected dtype torch.int64"),
    ("state_tick_float", lambda c: c.forward(state=c.state._replace(tick=c.state.tick.float())), TypeError,
     r"^state.tick: expected dtype torch.int64"),
    ("state_tick_2d", lambda c: c.forward(state=c.state._replace(tick=c.state.tick[:, None])), ValueError,
     r"^state.tick: expected 1 dimensions"),
    ("state_plain_tuple", lambda c: c.forward(state=tuple(c.state)), TypeError, r"^state: expected an AGaLiTeState"),
    ("state_on_meta_device", lambda c: c.forward(state=c.state.to("meta")), ValueError,
     r"^state.tilde_k: expected a tensor on cpu"),
    # single step
    ("step_dones_2d", lambda c: c.forward(x=c.x[:, 0], dones=c.dones[:, :1]), ValueError, r"^dones: expected 1 dim"),
    ("step_state_batch", lambda c: c.forward(x=c.x[:2, 0], dones=None), ValueError, r"^state.tilde_k: expected shape"),
    # state helpers
    ("reset_mask_length", lambda c: c.state.reset(torch.tensor([True, False])), ValueError, r"^mask: expected shape"),
    ("reset_mask_float", lambda c: c.state.reset(torch.ones(B)), TypeError, r"^mask: expected dtype torch.bool"),
    ("reset_mask_meta", lambda c: c.state.reset(torch.ones(B, dtype=torch.bool, device="meta")), ValueError,
     r"^mask: expected a tensor on cpu"),
    ("select_out_of_range", lambda c: c.state.select(B), IndexError, r"^index: expected an env in \[-3, 3\)"),
    ("cat_empty", lambda c: AGaLiTeState.cat([]), ValueError, r"^states: expected at least one"),
    ("cat_other_sizes", lambda c: AGaLiTeState.cat([c.state, other_model(r=2).initial_state(1)]), ValueError,
     r"^states\[1\].tilde_k: expected"),
    ("cat_other_dtype", lambda c: AGaLiTeState.cat([c.state, AGaLiTeState(*(t.double() for t in c.state[:3]),
                                                                           c.state.tick)]),  # fmt: skip
     ValueError, r"^states\[1\].tilde_k: expected .*torch.float32"),
    ("initial_state_negative", lambda c: c.model.initial_state(-1), ValueError, r"^batch_size: expected"),
    ("initial_state_float", lambda c: c.model.initial_state(2.0), ValueError, r"^batch_size: expected"),
    # pack / unpack
    ("unpack_width", lambda c: c.model.unpack_state(torch.zeros(B, c.model.state_size - 1)), ValueError,
     r"^packed: expected shape"),
    ("unpack_1d", lambda c: c.model.unpack_state(torch.zeros(c.model.state_size)), ValueError,
     r"^packed: expected 2 dimensions"),
    ("unpack_float64", lambda c: c.model.unpack_state(torch.zeros(B, c.model.state_size, dtype=torch.float64)),
     TypeError, r"^packed: expected dtype torch.float32"),
    ("pack_other_model_state", lambda c: c.model.pack_state(other_model(r=2).initial_state(B)), ValueError,
     r"^state.tilde_k: expected shape"),
    # Flax import: nothing is copied unless everything matches
    ("flax_missing_key", lambda c: load_flax_params(c.model, _drop_one(flax_params(c))), KeyError,
     r"flat: parameter keys do not match the model \(missing 1"),
    ("flax_unexpected_key", lambda c: load_flax_params(c.model, flax_params(c) | {"params/layer9/x": np.zeros(1)}),
     KeyError, r"unexpected 1: \['params/layer9/x'\]"),
    ("flax_wrong_shape", lambda c: load_flax_params(c.model, _reshape_one(flax_params(c))), ValueError,
     r"params/layer1/LayerNorm_0/scale: expected \(8,\), got \(9,\)"),
    # constructor and presets
    ("preset_unknown", lambda c: AGaLiTe.from_preset("huge", IN), ValueError, r"^name: expected one of"),
    ("preset_bad_override", lambda c: AGaLiTe.from_preset("paper", IN, d_model=0), ValueError, r"^d_model: expected"),
    ("preset_unknown_override", lambda c: AGaLiTe.from_preset("paper", IN, widht=3), TypeError, r"widht"),
    ("ctor_r_zero", lambda c: other_model(r=0), ValueError, r"^r: expected a positive int"),
    ("ctor_eta_float", lambda c: other_model(eta=1.5), ValueError, r"^eta: expected a positive int"),
    ("ctor_dropout_one", lambda c: AGaLiTe.from_preset("paper", IN, dropout=1.0), ValueError, r"^dropout: expected"),
    # backend selection
    ("backend_unknown", lambda c: AGaLiTe(IN, DM, L, H, D, FF, ETA, R, backend="cuda"), ValueError,
     r"^backend: expected one of \('auto', 'reference', 'triton'\), got 'cuda'"),
    ("backend_not_str", lambda c: setattr(c.model, "backend", 3), TypeError, r"^backend: expected one of"),
    ("backend_env_unknown", lambda c: other_model()(_set_env(c, "AGALITE_BACKEND", "fast").x), ValueError,
     r"^environment variable AGALITE_BACKEND: expected one of"),
    ("backend_triton_without_interpreter", lambda c: _set_env(c, "TRITON_INTERPRET", "0").recurrence(backend="triton"),
     RuntimeError, r"backend='triton'"),
    # functional recurrence
    ("rec_keys_rank", lambda c: c.recurrence(keys=c.rec["keys"][0]), ValueError, r"^keys: expected 4 dimensions"),
    ("rec_values_shape", lambda c: c.recurrence(values=c.rec["values"][:, :, :, :-1]), ValueError,
     r"^values: expected shape \(3, 4, 2, 4\)"),
    ("rec_queries_dtype", lambda c: c.recurrence(queries=c.rec["queries"].double()), TypeError,
     r"^queries: expected dtype torch.float32"),
    ("rec_p2_eta", lambda c: c.recurrence(p2=c.rec["p2"][..., :1]), ValueError, r"^p2: expected shape"),
    ("rec_gamma_meta", lambda c: c.recurrence(gamma=c.rec["gamma"].to("meta")), ValueError,
     r"^gamma: expected a tensor on cpu"),
    ("rec_tilde_k_fp16", lambda c: c.recurrence(tilde_k=c.rec["tilde_k"].half()), TypeError,
     r"^tilde_k: expected dtype torch.float32"),
    ("rec_tilde_v_r", lambda c: c.recurrence(tilde_v=c.rec["tilde_v"][:, :2]), ValueError, r"^tilde_v: expected shape"),
    ("rec_s_batch", lambda c: c.recurrence(s=c.rec["s"][:2]), ValueError, r"^s: expected shape \(3, 2, 8\)"),
    ("rec_tick_float", lambda c: c.recurrence(tick=c.rec["tick"].float()), TypeError,
     r"^tick: expected dtype torch.int64"),
    ("rec_tick_batch", lambda c: c.recurrence(tick=c.rec["tick"][:2]), ValueError, r"^tick: expected shape \(3,?\)"),
    ("rec_dones_int", lambda c: c.recurrence(dones=c.rec["dones"].int()), TypeError, r"^dones: expected dtype"),
    ("rec_final_out_with_grad", lambda c: c.recurrence(final_out=tuple(torch.empty_like(c.rec[n]) for n in
                                                                        ("tilde_k", "tilde_v", "s"))),  # fmt: skip
     RuntimeError, r"^final_out: only for inference"),
]


def other_galite(**overrides) -> GaLiTe:
    sizes = dict(input_dim=IN, d_model=DM, n_layers=L, n_heads=H, d_head=D, d_ffc=FF, nu=NU) | overrides
    return GaLiTe(**sizes)


def _restart(c: Ctx, *memories: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A valid GaLiTe restart tuple's index (row 1 restarts at t = 2 from restart row 0) with ``memories``."""
    index = torch.full((B, T), -1)
    index[1, 2] = 0
    return (index, *memories)


# GaLiTe's model and functional entry point: the same checks, its own names (c, s; nu; no tick).
GALITE_BAD_CALLS: list[BadCall] = [
    *INPUT_BAD_CALLS,
    ("state_agalite", lambda c: c.forward(state=other_model().initial_state(B)), TypeError,
     r"^state: expected an GaLiTeState, got AGaLiTeState"),
    ("state_plain_tuple", lambda c: c.forward(state=tuple(c.state)), TypeError, r"^state: expected an GaLiTeState"),
    ("state_batch_mismatch", lambda c: c.forward(state=c.state.select(slice(0, 2))), ValueError,
     r"^state.c: expected shape \(2, 3, 2, 4, 12\)"),
    ("state_other_nu", lambda c: c.forward(state=other_galite(nu=2).initial_state(B)), ValueError,
     r"^state.c: expected shape \(2, 3, 2, 4, 12\), got \(2, 3, 2, 4, 8\)"),
    ("state_other_layers", lambda c: c.forward(state=other_galite(n_layers=1).initial_state(B)), ValueError,
     r"^state.c: expected shape"),
    ("state_float64", lambda c: c.forward(state=GaLiTeState(*(t.double() for t in c.state))), TypeError,
     r"^state.c: expected dtype torch.float32"),
    ("state_s_on_meta", lambda c: c.forward(state=c.state._replace(s=c.state.s.to("meta"))), ValueError,
     r"^state.s: expected a tensor on cpu"),
    ("step_state_batch", lambda c: c.forward(x=c.x[:2, 0], dones=None), ValueError, r"^state.c: expected shape"),
    ("cat_other_nu", lambda c: GaLiTeState.cat([c.state, other_galite(nu=2).initial_state(1)]), ValueError,
     r"^states\[1\].c: expected"),
    ("cat_agalite", lambda c: GaLiTeState.cat([c.state, other_model().initial_state(1)]), TypeError,
     r"^states\[1\]: expected an GaLiTeState, got AGaLiTeState"),
    ("unpack_agalite_width", lambda c: c.model.unpack_state(torch.zeros(B, other_model().state_size)), ValueError,
     r"^packed: expected shape \(B, 240\), got \(3, 177\)"),
    ("pack_agalite_state", lambda c: c.model.pack_state(other_model().initial_state(B)), TypeError,
     r"^state: expected an GaLiTeState"),
    ("pack_plain_tuple", lambda c: c.model.pack_state(tuple(c.state)), TypeError,
     r"^state: expected an GaLiTeState, got tuple"),
    ("pack_c_1d", lambda c: c.model.pack_state(GaLiTeState(c.state.c[0, 0, 0, 0], c.state.s)), ValueError,
     r"^state.c: expected 5 dimensions \(2, B, 2, 4, 12\)"),
    ("pack_s_other_batch", lambda c: c.model.pack_state(c.state._replace(s=c.state.s[:, :2])), ValueError,
     r"^state.s: expected shape \(2, 3, 2, 12\)"),
    ("restart_state_plain_tuple", lambda c: c.model(c.x, c.state, restart=torch.zeros(B, T, dtype=torch.bool),
                                                    restart_state=tuple(c.state)),  # fmt: skip
     TypeError, r"^restart_state: expected an GaLiTeState, got tuple"),
    ("out_other_nu", lambda c: torch.no_grad()(c.model)(c.x, c.state, out=other_galite(nu=2).initial_state(B)),
     ValueError, r"^out.c: expected shape"),
    ("restart_state_agalite", lambda c: c.model(c.x, c.state, restart=torch.zeros(B, T, dtype=torch.bool),
                                                restart_state=other_model().initial_state(0)),  # fmt: skip
     TypeError, r"^restart_state: expected an GaLiTeState"),
    ("preset_unknown", lambda c: GaLiTe.from_preset("paper", IN), ValueError, r"^name: expected one of \['galite-tmaze'\]"),
    ("preset_agalite_override", lambda c: GaLiTe.from_preset("galite-tmaze", IN, eta=2), TypeError, r"eta"),
    ("ctor_nu_zero", lambda c: other_galite(nu=0), ValueError, r"^nu: expected a positive int, got 0"),
    ("ctor_nu_bool", lambda c: other_galite(nu=True), ValueError, r"^nu: expected a positive int, got True"),
    # functional recurrence
    ("rec_keys_rank", lambda c: c.recurrence(keys=c.rec["keys"][0]), ValueError, r"^keys: expected 4 dimensions"),
    ("rec_queries_dtype", lambda c: c.recurrence(queries=c.rec["queries"].double()), TypeError,
     r"^queries: expected dtype torch.float32"),
    ("rec_p3_nu", lambda c: c.recurrence(p3=c.rec["p3"][..., :1]), ValueError, r"^p3: expected shape \(3, 4, 2, 3\)"),
    ("rec_beta_meta", lambda c: c.recurrence(beta=c.rec["beta"].to("meta")), ValueError,
     r"^beta: expected a tensor on cpu"),
    ("rec_c_nu_mismatch", lambda c: c.recurrence(c=c.rec["c"][..., :8]), ValueError,
     r"^c: expected shape \(3, 2, 4, 12\), got \(3, 2, 4, 8\)"),
    ("rec_c_float64", lambda c: c.recurrence(c=c.rec["c"].double()), TypeError, r"^c: expected dtype torch.float32"),
    ("rec_s_batch", lambda c: c.recurrence(s=c.rec["s"][:2]), ValueError, r"^s: expected shape \(3, 2, 12\)"),
    ("rec_s_on_meta", lambda c: c.recurrence(s=c.rec["s"].to("meta")), ValueError, r"^s: expected a tensor on cpu"),
    ("rec_dones_int", lambda c: c.recurrence(dones=c.rec["dones"].int()), TypeError, r"^dones: expected dtype"),
    ("rec_restart_with_tick", lambda c: c.recurrence(restart=_restart(c, c.rec["c"][:1], c.rec["s"][:1],
                                                                      torch.ones(1, dtype=torch.int64))),  # fmt: skip
     TypeError, r"^restart: expected a tuple \(index, c, s\), got a tuple of 4"),
    ("rec_restart_short", lambda c: c.recurrence(restart=_restart(c, c.rec["c"][:1])), TypeError,
     r"^restart: expected a tuple \(index, c, s\), got a tuple of 2"),
    ("rec_restart_s_rows", lambda c: c.recurrence(restart=_restart(c, c.rec["c"][:1], c.rec["s"][:2])), ValueError,
     r"^restart.s: expected shape \(1, 2, 12\)"),
    ("rec_restart_index_range", lambda c: c.recurrence(restart=_restart(c, c.rec["c"][:0], c.rec["s"][:0])),
     ValueError, r"^restart.index: expected -1 \(no restart\) or a restart row in \[0, 0\)"),
    ("rec_final_out_with_grad", lambda c: c.recurrence(final_out=(torch.empty_like(c.rec["c"]),
                                                                  torch.empty_like(c.rec["s"]))),  # fmt: skip
     RuntimeError, r"^final_out: only for inference"),
    ("rec_final_out_length", lambda c: torch.no_grad()(c.recurrence)(final_out=(torch.empty_like(c.rec["c"]),)),
     TypeError, r"^final_out: expected a tuple \(c, s\)"),
    ("rec_triton_without_interpreter", lambda c: _set_env(c, "TRITON_INTERPRET", "0").recurrence(backend="triton"),
     RuntimeError, r"backend='triton'"),
]


def _assert_bad_call_raises(ctx: Ctx, name: str, call, exc, pattern: str) -> None:
    """The call raises ``exc`` with a message matching ``pattern`` and modifies no state, parameter or argument."""
    before = [t.clone() for t in (*ctx.state, *ctx.model.state_dict().values())]
    before_rec = {k: v.clone() for k, v in ctx.rec.items() if v is not None}
    with pytest.raises(exc) as info:
        call(ctx)
    message = info.value.args[0] if info.value.args else ""
    assert re.search(pattern, str(message)), f"{name}: message {message!r} does not match {pattern!r}"
    for a, b in zip(before, (*ctx.state, *ctx.model.state_dict().values())):
        assert torch.equal(a, b), f"{name}: a state or parameter tensor was modified by a failing call"
    for k, v in before_rec.items():
        assert torch.equal(v, ctx.rec[k]), f"{name}: {k} was modified by a failing call"


@pytest.mark.parametrize("name,call,exc,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_naming_the_argument(name, call, exc, pattern, monkeypatch):
    _assert_bad_call_raises(make_ctx(monkeypatch), name, call, exc, pattern)


@pytest.mark.parametrize("name,call,exc,pattern", GALITE_BAD_CALLS, ids=[c[0] for c in GALITE_BAD_CALLS])
def test_galite_bad_call_raises_naming_the_argument(name, call, exc, pattern, monkeypatch):
    _assert_bad_call_raises(make_galite_ctx(monkeypatch), name, call, exc, pattern)


def test_the_table_is_large():
    assert len(BAD_CALLS) >= 25


# ------------------------------------------------------------------------------------- odd but valid
def _assert_state_equal(a: AGaLiTeState, b: AGaLiTeState) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_non_contiguous_and_expanded_model_inputs_give_the_same_result():
    ctx = make_ctx()
    model = ctx.model
    with torch.no_grad():
        y_ref, st_ref = model(ctx.x, ctx.state, ctx.dones)
        # Non-contiguous: time-major storage viewed batch-first, and every-other-column slices.
        x_t = ctx.x.transpose(0, 1).contiguous().transpose(0, 1)
        wide = torch.zeros(B, T, 2 * IN)
        wide[..., ::2] = ctx.x
        dones_t = ctx.dones.t().contiguous().t()
        state_strided = AGaLiTeState(*(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in ctx.state[:3]),
                                     torch.stack([ctx.state.tick, ctx.state.tick], 1)[:, 0])  # fmt: skip
        assert not x_t.is_contiguous() and not wide[..., ::2].is_contiguous() and not state_strided.s.is_contiguous()
        for x, dones, state in [(x_t, ctx.dones, ctx.state), (wide[..., ::2], dones_t, ctx.state),
                                (ctx.x, ctx.dones, state_strided)]:  # fmt: skip
            y, st = model(x, state, dones)
            assert torch.equal(y, y_ref)
            _assert_state_equal(st, st_ref)
        # Expanded (stride 0): one env's input, dones and state broadcast to B envs.
        x1 = ctx.x[:1].expand(B, T, IN)
        st1 = ctx.state.select(0)
        st_exp = AGaLiTeState(st1.tilde_k.expand(L, B, R, H, E), st1.tilde_v.expand(L, B, R, H, D),
                              st1.s.expand(L, B, H, E), st1.tick.expand(B))  # fmt: skip
        d1 = ctx.dones[:1].expand(B, T)
        y_e, st_e = model(x1, st_exp, d1)
        st_c = AGaLiTeState(*(t.contiguous() for t in st_exp))
        y_c, st_cc = model(x1.contiguous(), st_c, d1.contiguous())
        assert torch.equal(y_e, y_c)
        _assert_state_equal(st_e, st_cc)
        assert torch.equal(st1.tilde_k, ctx.state.tilde_k[:, :1])  # the expanded source was not written


def same_as(got, want, exact: bool) -> None:
    """Bitwise for the kernels. The reference's elementwise results inherit their inputs' strides, so its
    reductions may add in another order: equal up to float32 rounding there (measured: 1 ulp)."""
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded_recurrence_inputs_give_the_same_result(backend):
    ctx = make_ctx()
    rec = ctx.rec
    ref = agalite_recurrence(**rec, backend=backend)
    fused = torch.cat([rec[n] for n in ("keys", "queries", "values", "beta", "gamma")], -1)  # (B,T,H,5D) views
    strided = dict(rec)
    for i, n in enumerate(("keys", "queries", "values", "beta", "gamma")):
        strided[n] = fused[..., i * D : (i + 1) * D]
    strided["tilde_k"] = rec["tilde_k"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["dones"] = rec["dones"].t().contiguous().t()
    assert not strided["keys"].is_contiguous() and not strided["tilde_k"].is_contiguous()
    got = agalite_recurrence(**strided, backend=backend)
    same_as(got, ref, exact=backend == "triton")
    expanded = {k: (v[:1].expand_as(v) if v is not None else None) for k, v in rec.items()}
    got = agalite_recurrence(**expanded, backend=backend)
    want = agalite_recurrence(**{k: v.contiguous() for k, v in expanded.items()}, backend=backend)
    same_as(got, want, exact=backend == "triton")


def _nan_env(t: torch.Tensor, env: int, value: float, batch_dim: int = 0) -> torch.Tensor:
    t = t.clone()
    index = [0] * t.dim()
    index[batch_dim] = env
    t[tuple(index)] = value
    return t


MAKE_CTX = {"agalite": make_ctx, "galite": make_galite_ctx}
kinds = pytest.mark.parametrize("kind", sorted(MAKE_CTX))


@kinds
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["input", "state"])
def test_model_nan_stays_in_its_environment(where, value, kind):
    ctx = MAKE_CTX[kind]()
    env = 1
    x, state = ctx.x, ctx.state
    if where == "input":
        x = _nan_env(x, env, value)
    else:
        field = "tilde_v" if kind == "agalite" else "c"  # the memory the read-out's numerator comes from
        state = state._replace(**{field: _nan_env(getattr(state, field), env, value, batch_dim=1)})
    with torch.no_grad():
        y, new = ctx.model(x, state, ctx.dones)
        y_clean, new_clean = ctx.model(ctx.x, ctx.state, ctx.dones)
    others = [b for b in range(B) if b != env]
    assert not torch.isfinite(y[env]).all()
    assert torch.equal(y[others], y_clean[others])
    for name, a, c in zip(new._fields, new.memories(), new_clean.memories()):
        assert torch.equal(a[:, others], c[:, others])
        # GaLiTe's normaliser s never reads c: a NaN in c stays out of it.
        assert (kind, where, name) == ("galite", "state", "s") or not torch.isfinite(a[:, env]).all(), name
    # A done inside a call multiplies the memory by 0, which keeps NaN (as the original); state.reset clears it.
    cleared = new.reset(torch.arange(B) == env)
    assert all(torch.equal(t[:, env], torch.zeros_like(t[:, env])) for t in cleared.memories())


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrence_nan_stays_in_its_environment(backend):
    ctx = make_ctx()
    rec = dict(ctx.rec)
    rec["values"] = _nan_env(rec["values"], 0, float("nan"))
    rec["tilde_k"] = _nan_env(rec["tilde_k"], 2, float("inf"))
    with torch.no_grad():
        out, final = agalite_recurrence(**rec, backend=backend)
        clean = agalite_recurrence(**ctx.rec, backend=backend)
    assert torch.equal(out[1], clean[0][1]) and all(torch.equal(a[1], b[1]) for a, b in zip(final, clean[1]))
    assert not torch.isfinite(out[0]).all() and not torch.isfinite(out[2]).all()
    # Gradients of env 1's results: finite and equal to the clean run's (zero for the other envs).
    def grads_of(args):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items() if v is not None and v.is_floating_point()}
        out, final = agalite_recurrence(**(args | leaves), backend=backend)
        loss = out[1].sum() + sum(f[1].sum() for f in final)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    dirty, clean_grads = grads_of(rec), grads_of(dict(ctx.rec))
    for name, gr in dirty.items():
        assert torch.equal(gr[1], clean_grads[name][1]), name


@kinds
def test_empty_batch(kind):
    ctx = MAKE_CTX[kind]()
    empty = ctx.model.initial_state(0)
    y, st = ctx.model(torch.zeros(0, T, IN), empty, torch.zeros(0, T, dtype=torch.bool))
    per_env = (R, H, E) if kind == "agalite" else (H, D, K)
    assert y.shape == (0, T, DM) and st.batch_size == 0 and st[0].shape == (L, 0, *per_env)
    y, st = ctx.model(torch.zeros(0, IN))
    assert y.shape == (0, DM) and st.batch_size == 0
    x = torch.zeros(0, T, IN, requires_grad=True)
    y, _ = ctx.model(x)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_recurrence(backend):
    ctx = make_ctx()
    rec = {k: v[:0] for k, v in ctx.rec.items()}
    with torch.no_grad():
        out, final = agalite_recurrence(**rec, backend=backend)
    assert out.shape == (0, T, H, D) and final[0].shape == (0, R, H, E)
    leaves = {k: v.clone().requires_grad_() for k, v in rec.items() if v.is_floating_point()}
    out, final = agalite_recurrence(**(rec | leaves), backend=backend)
    grads = torch.autograd.grad(out.sum() + final[0].sum(), list(leaves.values()))
    assert all(gr.shape == v.shape for gr, v in zip(grads, leaves.values()))


@kinds
def test_zero_steps_return_empty_output_and_the_state_unchanged(kind):
    ctx = MAKE_CTX[kind]()
    y, st = ctx.model(torch.zeros(B, 0, IN), ctx.state, torch.zeros(B, 0, dtype=torch.bool))
    assert y.shape == (B, 0, DM)
    _assert_state_equal(st, ctx.state)
    # A new state, not the one passed in: writing into it cannot corrupt the caller's.
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(st, ctx.state))
    own = (ETA, R) if kind == "agalite" else (NU,)
    time_major = type(ctx.model)(IN, DM, L, H, D, FF, *own, batch_first=False)
    y, st = time_major(torch.zeros(0, B, IN), time_major.initial_state(B))
    assert y.shape == (0, B, DM)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(st, time_major.initial_state(B)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_steps_recurrence(backend):
    ctx = make_ctx()
    rec = {k: (v[:, :0] if k in ("keys", "queries", "values", "beta", "gamma", "p1", "p2", "p3", "dones") else v)
           for k, v in ctx.rec.items()}  # fmt: skip
    out, final = agalite_recurrence(**rec, backend=backend)
    assert out.shape == (B, 0, H, D)
    for a, n in zip(final, ("tilde_k", "tilde_v", "s")):
        assert torch.equal(a, ctx.rec[n]) and a.data_ptr() != ctx.rec[n].data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_ticks_are_exact(backend):
    """tick -7 is congruent to -7 + 4 * 10**6 modulo every period 2 (r - 1) with r <= 5: same result."""
    ctx = make_ctx()
    rec = dict(ctx.rec)
    rec["tick"] = torch.tensor([-1, -7, -(2**62)])
    shifted = dict(rec, tick=rec["tick"] + 12 * 10**6)  # 12e6 is a multiple of the period 4 of r = 3
    with torch.no_grad():
        a = agalite_recurrence(**rec, backend=backend)
        b = agalite_recurrence(**shifted, backend=backend)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert torch.isfinite(a[0]).all()


def test_model_negative_tick_advances():
    ctx = make_ctx()
    state = ctx.state._replace(tick=torch.tensor([-5, -1, 0]))
    _, st = ctx.model(ctx.x, state, ctx.dones)
    assert st.tick.tolist() == [-5 + T, -1 + T, T]
