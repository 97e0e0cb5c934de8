"""The packed (B, S) state survives what RL frameworks do to a flat hidden tensor.

TorchRL's primer and SB3 zero-fill new states, SB3 resets by multiplying by ``1 - episode_start``, TorchRL
selects with ``torch.where``, buffers index and concatenate rows, ``torch.set_flush_denormal(True)`` flushes
tiny floats, and TorchRL's GAE replaces NaNs of ``("next", key)`` by the root's. The tick word holds
``(tick - 1) mod P``, a small exact integer, so each of these leaves a valid state: zeros are exactly
``initial_state``, and a surviving row continues bitwise as the original state would. GaLiTe's state has
no tick: its packed form is its memories alone, and the same holds.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton.stack import RecurrentStack
from agalite_triton.state import StateOps

from .cores import KINDS, busy_state, make_core

kinds = pytest.mark.parametrize("kind", KINDS)


def model_and_state(kind: str = "agalite", dtype=torch.float32) -> tuple[RecurrentStack, StateOps]:
    model = make_core(kind, input_dim=3, d_model=8, n_layers=2, n_heads=2, d_head=2, d_ffc=8, eta=2, r=5, nu=3)
    model = model.to(dtype)
    state = busy_state(model, 4, tick=torch.tensor([1, 2, 2**62 + 3, -11]))  # P = 8: words 0, 1, 2, 4
    return model, state


def continues_like(model: RecurrentStack, a: StateOps, b: StateOps) -> bool:
    """Same memories bitwise, and the same outputs and memories after a few steps from either."""
    if not all(torch.equal(x, y) for x, y in zip(a.memories(), b.memories())):
        return False
    x = torch.randn(a.batch_size, 3, model.input_dim, generator=torch.Generator().manual_seed(2),
                    dtype=a[0].dtype)  # fmt: skip
    with torch.no_grad():
        ya, sa = model(x, a)
        yb, sb = model(x, b)
    return torch.equal(ya, yb) and all(torch.equal(p, q) for p, q in zip(sa.memories(), sb.memories()))


@kinds
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zeros_unpack_to_initial_state(dtype, kind):
    model, _ = model_and_state(kind, dtype)
    zero = model.unpack_state(torch.zeros(3, model.state_size, dtype=dtype))
    init = model.initial_state(3)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(zero, init))
    assert torch.equal(model.pack_state(init), torch.zeros(3, model.state_size, dtype=dtype))


def test_tick_word_is_small_exact_integer():
    model, state = model_and_state()
    packed = model.pack_state(state)
    assert packed[:, -1].tolist() == [0.0, 1.0, 2.0, 4.0]
    assert model.unpack_state(packed).tick.tolist() == [1, 2, 3, 5]
    assert continues_like(model, state, model.unpack_state(packed))


@kinds
def test_survives_multiplication_by_masks_and_where(kind):
    model, state = model_and_state(kind)
    packed = model.pack_state(state)
    assert torch.equal(model.pack_state(model.unpack_state(packed * 1.0)), packed)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])  # SB3: state * (1 - episode_start)
    masked = model.unpack_state(packed * keep[:, None])
    init = model.initial_state(4)
    for rows, want in ((torch.tensor([0, 2]), model.unpack_state(packed)), (torch.tensor([1, 3]), init)):
        assert continues_like(model, masked.select(rows), want.select(rows))
    chosen = torch.where(keep.bool()[:, None], packed, torch.zeros_like(packed))  # TorchRL acting mode
    assert torch.equal(chosen, packed * keep[:, None])


@kinds
def test_survives_cat_and_indexing(kind):
    model, state = model_and_state(kind)
    packed = model.pack_state(state)
    joined = torch.cat([packed[2:], packed[[1, 0]]])
    order = torch.tensor([2, 3, 1, 0])
    assert continues_like(model, model.unpack_state(joined), model.unpack_state(packed).select(order))
    assert continues_like(model, model.unpack_state(joined), state.select(order))


@kinds
def test_survives_denormal_flushing(kind):
    model, state = model_and_state(kind)
    packed = model.pack_state(state)
    previous = torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    try:
        flushed = packed * 1.0
        tiny = torch.tensor([1e-45]) * 1.0  # a denormal, flushed to 0 while the mode is on
    finally:
        torch.set_flush_denormal(previous)
    assert float(tiny) == 0.0  # the mode was on
    assert continues_like(model, model.unpack_state(flushed), state)


@kinds
def test_survives_nan_sanitising_of_other_entries(kind):
    """GAE's ``torch.where(isnan(next), root, next)`` and ``nan_to_num`` touch only the poisoned entries."""
    model, state = model_and_state(kind)
    packed = model.pack_state(state)
    poisoned = packed.clone()
    poisoned[1, 5] = float("nan")
    poisoned[3, 0] = float("nan")
    root = model.pack_state(model.initial_state(4))
    sanitised = torch.where(torch.isnan(poisoned), root, poisoned)
    assert torch.equal(sanitised[:, -1], packed[:, -1])
    assert torch.equal(torch.nan_to_num(poisoned)[:, -1], packed[:, -1])
    assert continues_like(model, model.unpack_state(sanitised).select(torch.tensor([0, 2])), state.select(torch.tensor([0, 2])))
