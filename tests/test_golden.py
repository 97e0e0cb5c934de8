"""Conformance with the original JAX/Flax AGaLiTe: outputs, memories, chunked runs and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agalite_triton import kernels
from agalite_triton.convert import export_flax_params

from .golden import assert_close, build_model, load, params_of, state

BACKENDS = [
    "reference",
    pytest.param(
        "triton",
        marks=[pytest.mark.interpret, pytest.mark.skipif(not kernels.AVAILABLE, reason="Triton kernels unavailable")],
    ),
]


def _assert_memory(prefix: str, st, arrays: dict, n_layers: int, batched: bool = False) -> None:
    for i in range(n_layers):
        for name, got in zip(("tilde_k", "tilde_v", "s"), st.layer(i)):
            exp = arrays[f"{prefix}/layer_{i + 1}/{name}"]
            assert_close(f"{prefix}/layer_{i + 1}/{name}", got if batched else got[0], exp)
        exp_tick = arrays[f"{prefix}/layer_{i + 1}/tick"].reshape(-1)
        np.testing.assert_array_equal(st.tick.numpy(), exp_tick.astype(np.int64), err_msg=f"{prefix} tick")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["cfgA", "cfgC"])
@pytest.mark.parametrize("case", ["zero", "rand"])
def test_whole_and_chunked_sequence(cfg: str, case: str, backend: str) -> None:
    meta, arrays = load(cfg)
    model = build_model(meta, arrays, backend=backend)
    n_layers = meta["config"]["n_layers"]
    x = torch.from_numpy(arrays["inputs"])[None]
    dones = torch.from_numpy(arrays["terminations"])[None]
    st0 = state(arrays, f"init_memory/{case}", n_layers)
    with torch.no_grad():
        y, st = model(x, st0, dones)
        assert_close(f"{case}/outputs", y[0], arrays[f"{case}/outputs"])
        _assert_memory(f"{case}/memory", st, arrays, n_layers)

        k = meta["chunk_split"]
        y1, st1 = model(x[:, :k], st0, dones[:, :k])
        y2, st2 = model(x[:, k:], st1, dones[:, k:])
    assert_close(f"{case}/chunk1/outputs", y1[0], arrays[f"{case}/chunk1/outputs"])
    _assert_memory(f"{case}/chunk1/memory", st1, arrays, n_layers)
    assert_close(f"{case}/chunk2/outputs", y2[0], arrays[f"{case}/chunk2/outputs"])
    _assert_memory(f"{case}/chunk2/memory", st2, arrays, n_layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["cfgA", "cfgC"])
def test_gradients(cfg: str, backend: str) -> None:
    meta, arrays = load(cfg)
    model = build_model(meta, arrays, backend=backend)
    n_layers = meta["config"]["n_layers"]
    x = torch.from_numpy(arrays["inputs"])[None].requires_grad_()
    dones = torch.from_numpy(arrays["terminations"])[None]
    st0 = state(arrays, "init_memory/rand", n_layers)
    mems = [m.clone().requires_grad_() for m in st0.memories()]
    st0 = st0._replace(tilde_k=mems[0], tilde_v=mems[1], s=mems[2])
    y, _ = model(x, st0, dones)
    loss = (y[0] * torch.from_numpy(arrays["loss/W"])).sum()
    assert_close("loss/value", loss, arrays["loss/value"])
    loss.backward()

    assert_close("grad/inputs", x.grad[0], arrays["grad/inputs"])
    grads = export_flax_params(model, grads=True)
    assert set(grads) == set(params_of(arrays))
    for path, g in grads.items():
        assert_close(f"grad/{path}", g, arrays[f"grad/{path}"])
    for i in range(n_layers):
        for name, m in zip(("tilde_k", "tilde_v", "s"), mems):
            key = f"grad/init_memory/layer_{i + 1}/{name}"
            assert_close(key, m.grad[i, 0], arrays[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_environments(backend: str) -> None:
    meta, arrays = load("cfgA_batch")
    _, params = load("cfgA")
    model = build_model(meta, params, backend=backend)
    n_layers = meta["config"]["n_layers"]
    x = torch.from_numpy(arrays["inputs"]).requires_grad_()
    dones = torch.from_numpy(arrays["terminations"])
    st0 = state(arrays, "init_memory", n_layers)
    y, st = model(x, st0, dones)
    assert_close("outputs", y, arrays["outputs"])
    _assert_memory("memory", st, arrays, n_layers, batched=True)

    loss = (y * torch.from_numpy(arrays["loss/W"])).sum()
    assert_close("loss/value", loss, arrays["loss/value"])
    loss.backward()
    assert_close("grad/inputs", x.grad, arrays["grad/inputs"])
    values = export_flax_params(model)
    for path, g in export_flax_params(model, grads=True).items():
        g64, p64 = g.astype(np.float64), values[path].astype(np.float64)
        stats = np.array([g64.sum(), (g64**2).sum(), (g64 * p64).sum()])
        assert_close(f"gradstat/{path}", stats, arrays[f"gradstat/{path}"])
