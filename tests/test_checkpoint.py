"""Checkpoints: model, recurrent state and optimiser survive torch.save / torch.load(weights_only=True).

How to save a state: ``AGaLiTeState`` is a NamedTuple, which ``torch.load(weights_only=True)`` rejects
unless the class is allow-listed (``torch.serialization.add_safe_globals([AGaLiTeState])`` or the
``safe_globals`` context manager). Without that, store ``state._asdict()`` (a dict of four tensors) and
rebuild it with ``AGaLiTeState(**d)``, or store ``model.pack_state(state)`` (one (B, S) float32 tensor,
the tick kept modulo the oscillator period) and rebuild it with ``model.unpack_state``. The first two are
lossless; the packed form keeps the memories bitwise and a tick congruent to the original, so everything
that follows is bitwise the same. The same holds for GaLiTe and its ``GaLiTeState`` (c, s), which has no
tick: its packed form is lossless.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from agalite_triton.stack import RecurrentStack
from agalite_triton.state import StateOps

from .cores import KINDS, make_core, model_kind

SIZES = dict(input_dim=5, d_model=8, n_layers=2, n_heads=2, d_head=4, d_ffc=12, eta=2, r=3, nu=2)


def roundtrip(obj: object, **load_kw) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, **load_kw)


def rollout_state(model: RecurrentStack, seed: int = 0) -> tuple[StateOps, torch.Tensor]:
    """A state after some steps, with ticks that need all 64 bits, and the next chunk of inputs."""
    g = torch.Generator().manual_seed(seed)
    state = model.initial_state(3)
    if model.has_tick:
        state = state._replace(tick=torch.tensor([1, 2**62 + 3, -(2**40) - 1]))
    with torch.no_grad():
        _, state = model(torch.randn(3, 6, SIZES["input_dim"], generator=g), state)
    return state, torch.randn(3, 4, SIZES["input_dim"], generator=g)


def assert_state_equal(a: StateOps, b: StateOps, tick_period: int | None = None) -> None:
    """Bitwise equal; with ``tick_period`` the ticks need only be congruent modulo it (the packed form)."""
    assert type(b) is type(a)
    for name, x, y in zip(a._fields, a, b):
        if name == "tick" and tick_period is not None:
            assert y.dtype == torch.int64 and torch.equal(torch.remainder(x - y, tick_period), torch.zeros_like(x))
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.fixture(params=KINDS)
def model(request) -> RecurrentStack:
    return make_core(request.param, **SIZES)


def test_model_state_dict_roundtrip(model):
    loaded = roundtrip(model.state_dict())
    other = make_core(model_kind(model), seed=1, **SIZES)  # different initial weights
    other.load_state_dict(loaded)
    state, x = rollout_state(model)
    with torch.no_grad():
        y, st = model(x, state)
        y2, st2 = other(x, state)
    assert torch.equal(y, y2)
    assert_state_equal(st, st2)


@pytest.mark.parametrize("form", ["asdict", "tuple", "packed", "allow_listed"])
def test_state_roundtrip_and_continuation(model, form):
    state, x = rollout_state(model)
    cls = model.state_class
    if form == "asdict":
        restored = cls(**roundtrip(state._asdict()))
    elif form == "tuple":
        restored = cls(*roundtrip(tuple(state)))
    elif form == "packed":
        restored = model.unpack_state(roundtrip(model.pack_state(state)))
    else:
        with torch.serialization.safe_globals([cls]):
            restored = roundtrip(state)
    period = model.tick_period if form == "packed" and model.has_tick else None
    assert_state_equal(state, restored, period)
    if period is not None:
        assert bool(((restored.tick >= 1) & (restored.tick <= period)).all()), restored.tick
    with torch.no_grad():
        y, st = model(x, state)
        y2, st2 = model(x, restored)
    assert torch.equal(y, y2)
    assert_state_equal(st, st2, period)


def test_plain_namedtuple_is_rejected_by_weights_only_load(model):
    """Documents why the forms above exist: the class is not on torch's allow-list by default."""
    state, _ = rollout_state(model)
    with pytest.raises(pickle.UnpicklingError, match=model.state_class.__name__):
        roundtrip(state)


def test_full_training_checkpoint_resumes_identically(model):
    """Model, optimiser and rollout state in one weights_only checkpoint: resuming reproduces the next update."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state, x = rollout_state(model)

    def update(m: RecurrentStack, o: torch.optim.Optimizer, st: StateOps) -> torch.Tensor:
        o.zero_grad()
        y, _ = m(x, st)
        y.square().mean().backward()
        o.step()
        return y.detach()

    update(model, opt, state)  # the optimiser now has moments
    ckpt = roundtrip({"model": model.state_dict(), "optim": opt.state_dict(), "state": state._asdict()})
    model2 = make_core(model_kind(model), seed=5, **SIZES)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    state2 = model.state_class(**ckpt["state"])
    y1, y2 = update(model, opt, state), update(model2, opt2, state2)
    assert torch.equal(y1, y2)
    for (name, p1), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p1, p2), name


@pytest.mark.parametrize("change,expected", [
    (dict(d_model=16), ["size mismatch for layers.0.emb.weight", "size mismatch for layers.1.ffn_out.weight"]),
    (dict(r=2, eta=3, nu=3), ["size mismatch for layers.0.attn.in_proj.weight"]),
    (dict(n_layers=3), ["Missing key(s) in state_dict", "layers.2.ln1.weight"]),
    (dict(n_layers=1), ["Unexpected key(s) in state_dict", "layers.1.ln1.weight"]),
])  # fmt: skip
def test_loading_into_other_sizes_names_the_mismatches(model, change, expected):
    loaded = roundtrip(model.state_dict())
    other = make_core(model_kind(model), **(SIZES | change))
    with pytest.raises(RuntimeError) as info:
        other.load_state_dict(loaded)
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {info.value}"


def test_state_of_other_sizes_is_rejected(model):
    state, x = rollout_state(model)
    other = make_core(model_kind(model), **(SIZES | dict(r=2, nu=3)))
    restored = model.state_class(**roundtrip(state._asdict()))
    with pytest.raises(ValueError, match=rf"^state.{state._fields[0]}: expected shape"):
        other(x, restored)
    with pytest.raises(ValueError, match=r"^packed: expected shape"):
        other.unpack_state(roundtrip(model.pack_state(state)))


def test_one_models_weights_do_not_load_into_the_other():
    loaded = roundtrip(make_core("agalite", **SIZES).state_dict())
    with pytest.raises(RuntimeError) as info:
        make_core("galite", **SIZES).load_state_dict(loaded)
    for part in ("Missing key(s) in state_dict", "layers.0.attn.q_weight", "size mismatch for layers.0.attn.in_proj"):
        assert part in str(info.value), f"{part!r} not in {info.value}"
