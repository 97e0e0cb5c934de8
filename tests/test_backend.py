"""Backend selection: environment variable, constructor argument, and their errors."""

from __future__ import annotations

import pytest
import torch

from agalite_triton import AGaLiTe, kernels, resolve_backend
from agalite_triton.backend import ENV_VAR

CPU = torch.device("cpu")


def test_auto_is_reference_on_cpu(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, CPU) == "reference"
    assert resolve_backend("auto", CPU) == "reference"
    monkeypatch.setenv(ENV_VAR, "Reference")
    assert resolve_backend(None, CPU) == "reference"


def test_unknown_values_raise(monkeypatch) -> None:
    with pytest.raises(ValueError, match="backend: expected one of"):
        resolve_backend("cuda", CPU)
    with pytest.raises(TypeError, match="backend"):
        resolve_backend(3, CPU)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match="AGALITE_BACKEND"):
        resolve_backend(None, CPU)
    model = AGaLiTe(4, 8, 1, 2, 4, 8, 1, 2)
    with pytest.raises(ValueError, match="AGALITE_BACKEND"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="backend"):
        model.backend = "jax"


def test_argument_overrides_environment(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend("reference", CPU) == "reference"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if kernels.AVAILABLE:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", CPU)
    else:
        with pytest.raises(RuntimeError, match="unavailable"):
            resolve_backend("triton", CPU)


def test_model_backend_setter_reaches_every_layer() -> None:
    model = AGaLiTe(4, 8, 3, 2, 4, 8, 1, 2, backend="reference")
    assert {layer.attn.backend for layer in model.layers} == {"reference"}
    model.backend = None
    assert {layer.attn.backend for layer in model.layers} == {None}
