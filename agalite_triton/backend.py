"""Which implementation of the recurrence runs: the Triton kernels or the PyTorch reference.

``AGALITE_BACKEND`` (read at every call, so a process can switch) or a module's ``backend=``
argument: ``auto`` (default) takes the kernels for CUDA tensors when Triton is importable and the
reference otherwise; ``reference`` always takes PyTorch; ``triton`` always takes the kernels (on CPU
tensors that needs ``TRITON_INTERPRET=1``, set before Triton is imported).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "AGALITE_BACKEND"

__all__ = ["BACKENDS", "ENV_VAR", "check_backend", "resolve_backend", "triton_available"]


def check_backend(name: str | None, argument: str = "backend") -> str | None:
    """Normalise a backend name; ``None`` stays ``None`` (defer to the environment)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{argument}: expected one of {BACKENDS} or None, got {type(name).__name__}")
    norm = name.strip().lower()
    if norm not in BACKENDS:
        raise ValueError(f"{argument}: expected one of {BACKENDS}, got {name!r}")
    return norm


def triton_available() -> bool:
    from . import kernels

    return kernels.AVAILABLE


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The concrete backend (``reference`` or ``triton``) for tensors on ``device``."""
    name = check_backend(requested)
    if name is None:
        name = check_backend(os.environ.get(ENV_VAR, "auto"), argument=f"environment variable {ENV_VAR}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "triton":
        if not triton_available():
            from . import kernels

            raise RuntimeError(f"backend='triton' requested but the Triton kernels are unavailable: {kernels.WHY}")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend='triton' on {device} tensors needs TRITON_INTERPRET=1 (set before importing triton)"
            )
    return name
