"""What only GaLiTe has: a tickless state (c, s) whose packed form is its memories alone, the ``galite-tmaze``
preset's sizes, and a state dtype that follows the parameters (float64 oracle) but not autocast.

The call conventions both models share are tested over both in test_model, test_restart_slots,
test_packed_state, test_checkpoint, test_hostile_inputs and test_properties.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import GALITE_PRESETS, GaLiTe, GaLiTeState

from .cores import busy_state, make_core

IN = 5
SIZES = dict(input_dim=IN, d_model=16, n_layers=2, n_heads=3, d_head=4, d_ffc=12, nu=3)


def small_model(**kw) -> GaLiTe:
    return make_core("galite", **{**SIZES, **kw})


def data(B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, IN, generator=g), torch.rand(B, T, generator=g) < 0.25


def test_state_has_no_tick_and_packs_to_its_memories_alone() -> None:
    model = small_model()
    L, H, D, K = 2, 3, 4, 12
    assert not model.has_tick and not hasattr(model, "tick_period") and GaLiTeState._fields == ("c", "s")
    st = busy_state(model, 5)
    assert st.c.shape == (L, 5, H, D, K) and st.s.shape == (L, 5, H, K) and not st.has_tick
    assert model.state_size == L * (H * D * K + H * K)
    assert model.state_bytes_per_env == 4 * model.state_size == st.nbytes_per_env()
    packed = model.pack_state(st)
    assert packed.shape == (5, model.state_size) and packed.dtype == torch.float32
    # Layer-major per env: every layer's c, then every layer's s.
    assert torch.equal(packed[:, : L * H * D * K], st.c.transpose(0, 1).reshape(5, -1))
    back = model.unpack_state(packed)
    assert type(back) is GaLiTeState and all(torch.equal(a, b) for a, b in zip(back, st))
    assert all(t.is_contiguous() for t in back)
    picked = model.unpack_state(packed[[3, 1]])
    assert all(torch.equal(a, b) for a, b in zip(picked, st.select(torch.tensor([3, 1]))))
    zeros = model.unpack_state(torch.zeros(2, model.state_size))
    assert all(torch.equal(a, b) for a, b in zip(zeros, model.initial_state(2)))
    x, d = data(5, 3)
    with torch.no_grad():
        y, after = model(x, st, d)
        y_back, after_back = model(x, back, d)
    assert torch.equal(y, y_back) and all(torch.equal(a, b) for a, b in zip(after, after_back))


def test_galite_tmaze_preset() -> None:
    model = GaLiTe.from_preset("galite-tmaze", input_dim=11)
    cfg = GALITE_PRESETS["galite-tmaze"]
    assert (model.n_layers, model.d_model, model.n_heads, model.d_head, model.nu) == (4, 128, 4, 64, 2)
    assert model.config == dict(input_dim=11, **cfg, reset_on_terminate=True, dropout=0.0)
    # 4 layers x 4 heads x (64 x 128 + 128) float32 words: c (D x K) and s (K) per head, K = nu * D = 128.
    assert model.state_size == 4 * 4 * (64 * 128 + 128)
    assert model.state_bytes_per_env == 4 * 4 * 4 * (64 * 128 + 128)
    assert {"LayerNorm", "GRUGatingUnit", "GaLiTeAttention"} <= {type(m).__name__ for m in model.modules()}
    assert GaLiTe.from_preset("galite-tmaze", input_dim=11, nu=1, n_layers=1).feature_dim == 64
    with torch.no_grad():
        y, st = model(torch.randn(2, 11), model.initial_state(2))
    assert y.shape == (2, 128) and st.c.shape == (4, 2, 4, 64, 128)


def test_float64_model_keeps_a_float64_state_and_agrees_with_float32() -> None:
    m32 = small_model()
    m64 = small_model().double()
    st = busy_state(m32, 3)
    assert m64.initial_state(2).c.dtype == torch.float64
    x, d = data(3, 6, seed=2)
    with torch.no_grad():
        y32, s32 = m32(x, st, d)
        y64, s64 = m64(x.double(), GaLiTeState(*(t.double() for t in st)), d)
    assert y64.dtype == torch.float64 and all(t.dtype == torch.float64 for t in s64)
    assert m64.pack_state(s64).dtype == torch.float64
    # float32 rounding against the float64 oracle.
    torch.testing.assert_close(y32, y64.float(), rtol=1e-4, atol=1e-5)
    for a, b in zip(s32, s64):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match=r"^state.c: expected dtype torch.float64"):
        m64(x.double(), st, d)


def test_bf16_autocast_keeps_a_float32_state() -> None:
    model = small_model()
    st = busy_state(model, 3)
    x, d = data(3, 5, seed=3)
    with torch.no_grad():
        y_ref, st_ref = model(x, st, d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, new = model(x, st, d)
    assert all(t.dtype == torch.float32 for t in new)
    model.check_state(new, 3, x.device)  # a valid state for the next, float32 or autocast, call
    # bf16 projections: about 3 significant digits.
    err = (y.float() - y_ref).abs().max() / y_ref.abs().max()
    assert err < 5e-2, err
    y.float().square().sum().backward()
    assert all(p.grad is not None for p in model.layers[0].attn.parameters())
