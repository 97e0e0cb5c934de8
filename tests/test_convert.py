"""Flax import: exact mapping, clear errors on mismatched trees, memory conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agalite_triton import AGaLiTe
from agalite_triton.convert import (
    export_flax_params,
    flax_param_shapes,
    load_flax_params,
    state_from_flax_memory,
    state_to_flax_memory,
)

from .golden import load, params_of


def cfga_model() -> AGaLiTe:
    return AGaLiTe(10, 32, 2, 2, 8, 48, 2, 3)


def test_round_trip_of_the_fixture_parameters() -> None:
    _, arrays = load("cfgA")
    flat = params_of(arrays)
    model = cfga_model()
    load_flax_params(model, flat)
    back = export_flax_params(model)
    assert set(back) == set(flat)
    for k, v in flat.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert flax_param_shapes(model) == {k: v.shape for k, v in flat.items()}


def test_prefix_is_optional() -> None:
    _, arrays = load("cfgA")
    model = cfga_model()
    load_flax_params(model, {k.removeprefix("params/"): v for k, v in params_of(arrays).items()})
    torch.testing.assert_close(model.layers[1].gate2.bgp, torch.from_numpy(arrays["params/layer2/GRUGatingUnit_1/bgp"]))


def test_missing_and_unexpected_keys_are_listed() -> None:
    _, arrays = load("cfgA")
    flat = params_of(arrays)
    flat.pop("params/layer2/Dense_1/bias")
    flat["params/layer3/Dense_0/bias"] = np.zeros(3)
    model = cfga_model()
    before = model.layers[0].emb.weight.detach().clone()
    with pytest.raises(KeyError) as info:
        load_flax_params(model, flat)
    assert "params/layer2/Dense_1/bias" in str(info.value) and "params/layer3/Dense_0/bias" in str(info.value)
    assert torch.equal(model.layers[0].emb.weight, before)  # nothing half-loaded


def test_wrong_shapes_are_listed() -> None:
    _, arrays = load("cfgA")
    flat = params_of(arrays)
    flat["params/layer1/emb_layer/kernel"] = np.zeros((11, 32), np.float32)
    with pytest.raises(ValueError, match=r"emb_layer/kernel: expected \(10, 32\), got \(11, 32\)"):
        load_flax_params(cfga_model(), flat)


def test_model_of_other_sizes_is_rejected() -> None:
    _, arrays = load("cfgA")
    with pytest.raises(ValueError, match="linear_p1p2p3"):
        load_flax_params(AGaLiTe(10, 32, 2, 2, 8, 48, 3, 3), params_of(arrays))


def test_memory_conversion_batched_and_unbatched() -> None:
    _, arrays = load("cfgA_batch")
    mem = {
        f"layer_{i}": {n: arrays[f"init_memory/layer_{i}/{n}"] for n in ("tilde_k", "tilde_v", "s", "tick")}
        for i in (1, 2)
    }
    st = state_from_flax_memory(mem)
    assert st.tilde_k.shape == (2, 5, 3, 2, 16) and st.tick.tolist() == [1, 8, 7, 4, 100]
    back = state_to_flax_memory(st)
    for i in (1, 2):
        for j, n in enumerate(("tilde_k", "tilde_v", "s", "tick")):
            np.testing.assert_array_equal(back[f"layer_{i}"][j], arrays[f"init_memory/layer_{i}/{n}"])
    one = state_from_flax_memory({k: tuple(v[n][2] for n in ("tilde_k", "tilde_v", "s", "tick")) for k, v in mem.items()})
    assert one.batch_size == 1 and one.tick.tolist() == [7]
    assert torch.equal(one.tilde_k[:, 0], st.tilde_k[:, 2])


def test_memory_errors() -> None:
    z = np.zeros
    good = (z((3, 2, 16)), z((3, 2, 8)), z((2, 16)), np.array([1.0]))
    with pytest.raises(KeyError, match="layer_1..layer_L"):
        state_from_flax_memory({"layer_2": good})
    with pytest.raises(ValueError, match="same tick"):
        state_from_flax_memory({"layer_1": good, "layer_2": good[:3] + (np.array([2.0]),)})
    with pytest.raises(ValueError, match="expected"):
        state_from_flax_memory({"layer_1": good[:3]})
