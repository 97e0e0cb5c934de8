"""Loading the conformance fixtures produced by the original JAX/Flax AGaLiTe (../shared/golden)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from agalite_triton import AGaLiTe
from agalite_triton.convert import load_flax_params, state_from_flax_memory

GOLDEN_DIR = Path(os.environ.get("AGALITE_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def load(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    path = GOLDEN_DIR / f"{name}.npz"
    if not path.exists():
        pytest.fail(f"golden fixture {path} is missing: clone the repository with ../shared beside it")
    meta = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return meta, arrays


def params_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k.startswith("params/")}


def build_model(meta: dict, arrays: dict[str, np.ndarray], backend: str | None = None) -> AGaLiTe:
    cfg = meta["config"]
    model = AGaLiTe(
        cfg["input_dim"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["d_head"], cfg["d_ffc"],
        cfg["eta"], cfg["r"], backend=backend,
    )  # fmt: skip
    load_flax_params(model, params_of(arrays))
    return model


def memory(arrays: dict[str, np.ndarray], prefix: str, n_layers: int) -> dict[str, tuple[np.ndarray, ...]]:
    """``{layer_l: (tilde_k, tilde_v, s, tick)}`` from keys ``<prefix>/layer_<l>/<name>``."""
    return {
        f"layer_{i}": tuple(arrays[f"{prefix}/layer_{i}/{n}"] for n in ("tilde_k", "tilde_v", "s", "tick"))
        for i in range(1, n_layers + 1)
    }


def state(arrays: dict[str, np.ndarray], prefix: str, n_layers: int):
    return state_from_flax_memory(memory(arrays, prefix, n_layers))


def assert_close(name: str, actual: torch.Tensor | np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """The fixtures' criterion: ``max|port - ref| <= rel * max(1, max|ref|)`` per tensor."""
    a = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, float)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    bound = rel * max(1.0, float(np.max(np.abs(e))) if e.size else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
