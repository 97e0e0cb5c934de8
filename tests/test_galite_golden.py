"""Conformance with the original JAX/Flax GaLiTe (../shared/golden/galite): outputs, memories, chunked runs,
batches with terminations and gradients of every parameter and of the initial memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agalite_triton import GaLiTe, kernels
from agalite_triton.convert import export_flax_params, galite_state_from_flax_memory, load_flax_params

from .golden import assert_close, load, params_of

BACKENDS = [
    "reference",
    pytest.param(
        "triton",
        marks=[pytest.mark.interpret, pytest.mark.skipif(not kernels.AVAILABLE, reason="Triton kernels unavailable")],
    ),
]


def build(name: str, backend: str) -> tuple[dict, dict, GaLiTe]:
    meta, arrays = load(f"galite/{name}")
    if "params_from" in meta:  # the batch fixture reuses another fixture's parameters
        source, source_arrays = load(f"galite/{meta['params_from'].removesuffix('.npz')}")
        meta = {**source, **meta}
        arrays = {**params_of(source_arrays), **arrays}
    cfg = meta["config"]
    model = GaLiTe(
        cfg["input_dim"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["d_head"], cfg["d_ffc"], cfg["nu"],
        backend=backend,
    )  # fmt: skip
    load_flax_params(model, params_of(arrays))
    return meta, arrays, model


def memory_state(arrays: dict, prefix: str, n_layers: int):
    return galite_state_from_flax_memory(
        {f"layer{i}": (arrays[f"{prefix}/layer{i}/c"], arrays[f"{prefix}/layer{i}/s"]) for i in range(n_layers)}
    )


def assert_memory(prefix: str, st, arrays: dict, n_layers: int, batched: bool = False) -> None:
    for i in range(n_layers):
        for name, got in zip(("c", "s"), st.layer(i)):
            assert_close(f"{prefix}/layer{i}/{name}", got if batched else got[0], arrays[f"{prefix}/layer{i}/{name}"])


@pytest.fixture(params=["fused", "eager"])
def cpu_path(request):
    """On CPU the reference runs fused by default; ``eager`` forces the eager oracle."""
    from agalite_triton.reference import cpu_fused

    with cpu_fused.forced(request.param == "fused"):
        yield request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gA", "gC"])
@pytest.mark.parametrize("case", ["zero", "rand"])
def test_whole_and_chunked_sequence(name: str, case: str, backend: str, cpu_path: str) -> None:
    if backend == "triton" and cpu_path == "eager":
        pytest.skip("the eager switch concerns the reference backend")
    meta, arrays, model = build(name, backend)
    n_layers = meta["config"]["n_layers"]
    x = torch.from_numpy(arrays["inputs"])[None]
    dones = torch.from_numpy(arrays["terminations"])[None]
    st0 = memory_state(arrays, f"init_memory/{case}", n_layers)
    with torch.no_grad():
        y, st = model(x, st0, dones)
        k = meta["chunk_split"]
        y1, st1 = model(x[:, :k], st0, dones[:, :k])
        y2, st2 = model(x[:, k:], st1, dones[:, k:])
    assert_close(f"{case}/outputs", y[0], arrays[f"{case}/outputs"])
    assert_memory(f"{case}/memory", st, arrays, n_layers)
    assert_close(f"{case}/chunk1/outputs", y1[0], arrays[f"{case}/chunk1/outputs"])
    assert_memory(f"{case}/chunk1/memory", st1, arrays, n_layers)
    assert_close(f"{case}/chunk2/outputs", y2[0], arrays[f"{case}/chunk2/outputs"])
    assert_memory(f"{case}/chunk2/memory", st2, arrays, n_layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gA", "gC"])
def test_gradients(name: str, backend: str, cpu_path: str) -> None:
    if backend == "triton" and cpu_path == "eager":
        pytest.skip("the eager switch concerns the reference backend")
    meta, arrays, model = build(name, backend)
    n_layers = meta["config"]["n_layers"]
    x = torch.from_numpy(arrays["inputs"])[None].requires_grad_()
    dones = torch.from_numpy(arrays["terminations"])[None]
    st0 = memory_state(arrays, "init_memory/rand", n_layers)
    mems = [m.clone().requires_grad_() for m in st0]
    y, _ = model(x, type(st0)(*mems), dones)
    loss = (y[0] * torch.from_numpy(arrays["loss/W"])).sum()
    assert_close("loss/value", loss, arrays["loss/value"])
    loss.backward()

    assert_close("grad/inputs", x.grad[0], arrays["grad/inputs"])
    grads = export_flax_params(model, grads=True)
    assert set(grads) == set(params_of(arrays))
    for path, g in grads.items():
        assert_close(f"grad/{path}", g, arrays[f"grad/{path}"])
    for i in range(n_layers):
        for name_, m in zip(("c", "s"), mems):
            key = f"grad/init_memory/layer{i}/{name_}"
            assert_close(key, m.grad[i, 0], arrays[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch(backend: str, cpu_path: str) -> None:
    """Four environments at once: zero and random memories, terminations at step 0, inside and at the end.

    One input gradient of this fixture is ill-conditioned: env 0 starts from a zero memory, where C is
    nearly rank one along s, so the query gradient ``(C - out s^T) g / <s, Q>`` is a difference of two large
    terms divided by a small ``<s, Q>``. The original's float32 value there is 9.4e-3 from the same maths in
    float64 (above the 7.3e-3 tolerance); no float32 implementation with other rounding can land within the
    tolerance of it. So the bound at each element is the tolerance plus the fixture's own distance from
    this model run in float64 (zero wherever the fixture is accurate).
    """
    if backend == "triton" and cpu_path == "eager":
        pytest.skip("the eager switch concerns the reference backend")
    meta, arrays, model = build("gA_batch", backend)
    n_layers = meta["config"]["n_layers"]
    dones = torch.from_numpy(arrays["terminations"])
    grads = {}
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        x = torch.from_numpy(arrays["inputs"]).to(dtype).requires_grad_()
        st0 = memory_state(arrays, "init_memory", n_layers)
        y, st = model(x, type(st0)(*(t.to(dtype) for t in st0)), dones)
        if dtype == torch.float32:
            assert_close("outputs", y, arrays["outputs"])
            assert_memory("memory", st, arrays, n_layers, batched=True)
        (y * torch.from_numpy(arrays["loss/W"]).to(dtype)).sum().backward()
        grads[dtype] = x.grad.double().numpy()
    ref = arrays["grad/inputs"]
    fixture_error = np.abs(ref - grads[torch.float64])
    bound = 1e-4 * max(1.0, float(np.abs(ref).max())) + fixture_error
    excess = np.abs(grads[torch.float32] - ref) - bound
    assert excess.max() <= 0, f"grad/inputs: {int((excess > 0).sum())} elements beyond the bound, worst by {excess.max():.3e}"
    # The widening is local: everywhere but env 0's ill-conditioned step the fixture is within 2e-4 of float64.
    assert np.sort(fixture_error.reshape(-1))[-2] <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_load_rejects_a_tree_that_does_not_fit() -> None:
    _, arrays, model = build("gA", "reference")
    params = params_of(arrays)
    broken = dict(params)
    del broken["params/layer0/RLTAttentionLayer_0/csop/Dense_1/kernel"]
    broken["params/layer0/extra/kernel"] = np.zeros(3)
    broken["params/layer1/RLTAttentionLayer_0/ParameteredProjection_0/Dense_1/bias"] = np.zeros((2, 5))
    before = model.layers[0].attn.in_proj.weight.detach().clone()
    with pytest.raises(KeyError) as info:
        load_flax_params(model, broken)
    text = str(info.value)
    assert "csop/Dense_1/kernel" in text and "extra/kernel" in text and "expected (2, 2), got (2, 5)" in text
    assert torch.equal(model.layers[0].attn.in_proj.weight, before)  # nothing half-loaded
    wrong_shape = dict(params)
    wrong_shape["params/layer0/emb_layer/kernel"] = np.zeros((11, 32), dtype=np.float32)
    with pytest.raises(ValueError, match=r"layer0/emb_layer/kernel: expected \(10, 32\), got \(11, 32\)"):
        load_flax_params(model, wrong_shape)
    # An AGaLiTe tree does not fit a GaLiTe.
    _, agalite_arrays = load("cfgA")
    with pytest.raises(KeyError, match="missing"):
        load_flax_params(model, params_of(agalite_arrays))
