"""The recurrent cores a run measures, how to build each, and the state training starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from agalite_triton import GALITE_PRESETS, PRESETS, AGaLiTe, GaLiTe, GaLiTeState

from .baselines import GTrXL, GTrXLState, LSTMState, ResetLSTM

__all__ = [
    "REFERENCE_SYSTEM",
    "SystemSpec",
    "agalite_specs",
    "build",
    "galite_specs",
    "gtrxl_specs",
    "lstm_specs",
    "training_state",
]

# The system every ratio is taken against.
REFERENCE_SYSTEM = "AGaLiTe-paper"

# GTrXL matched to the AGaLiTe paper's size (L=4, d=128, 4 heads x 64, FFN 128).
GTRXL_SIZE = dict(d_model=128, n_layers=4, n_heads=4, d_head=64, d_ff=128)


@dataclass(frozen=True)
class SystemSpec:
    """One recurrent core in one configuration (and, for AGaLiTe, one backend; for GTrXL, one mode)."""

    name: str  # e.g. "AGaLiTe-paper", "GaLiTe-tmaze", "GTrXL-128", "LSTM-128x2"
    family: str  # "agalite" | "galite" | "gtrxl" | "lstm"
    config: dict[str, Any] = field(hash=False)
    # GTrXL inference mode: "recompute" | "kv_cache"; AGaLiTe and GaLiTe: "eager" for the reference with
    # the fused CPU recurrence switched off (AGALITE_CPU_FUSED=0), None for the default path.
    mode: str | None = None
    backend: str | None = None  # AGaLiTe / GaLiTe backend: "reference" | "triton"

    @property
    def label(self) -> str:
        tags = ", ".join(t for t in (self.backend, self.mode) if t)
        return f"{self.name} [{tags}]" if tags else self.name


def agalite_specs(presets: list[str], backends: list[str], eager: tuple[str, ...] = ()) -> list[SystemSpec]:
    """``AGaLiTe-<preset>`` on each backend; ``paper`` first, since it is what ratios refer to. Presets in
    ``eager`` are also timed on the reference with the fused CPU recurrence off, right after the default."""
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"presets: expected names from {sorted(PRESETS)}, got {unknown}")
    ordered = sorted(presets, key=lambda p: p != "paper")
    specs = []
    for p in ordered:
        for b in backends:
            specs.append(SystemSpec(f"AGaLiTe-{p}", "agalite", dict(PRESETS[p]), backend=b))
            if b == "reference" and p in eager:
                specs.append(SystemSpec(f"AGaLiTe-{p}", "agalite", dict(PRESETS[p]), mode="eager", backend=b))
    return specs


def galite_specs(backends: list[str], eager: bool = False) -> list[SystemSpec]:
    """``GaLiTe-tmaze`` (the AGaLiTe paper's T-Maze size with nu = 2) on each backend; with ``eager``, also
    on the reference with the fused CPU recurrence off, right after the default."""
    config = dict(GALITE_PRESETS["galite-tmaze"])
    specs = []
    for b in backends:
        specs.append(SystemSpec("GaLiTe-tmaze", "galite", config, backend=b))
        if b == "reference" and eager:
            specs.append(SystemSpec("GaLiTe-tmaze", "galite", config, mode="eager", backend=b))
    return specs


def gtrxl_specs(memories: list[int], modes: list[str | None]) -> list[SystemSpec]:
    """``GTrXL-<M>``; mode None is the training segment (the same in both inference modes)."""
    return [
        SystemSpec(f"GTrXL-{m}", "gtrxl", dict(GTRXL_SIZE, memory=m), mode=mode) for m in memories for mode in modes
    ]


def lstm_specs() -> list[SystemSpec]:
    """nn.LSTM with hidden = d_model (1 and 2 layers) and the AGaLiTe paper's T-Maze LSTM (hidden 600)."""
    return [
        SystemSpec("LSTM-128", "lstm", dict(hidden=128, num_layers=1)),
        SystemSpec("LSTM-128x2", "lstm", dict(hidden=128, num_layers=2)),
        SystemSpec("LSTM-600", "lstm", dict(hidden=600, num_layers=1)),
    ]


def build(spec: SystemSpec, input_dim: int, device: torch.device, seed: int = 0) -> nn.Module:
    """The module of ``spec`` on ``device``, with parameters drawn from ``seed``."""
    torch.manual_seed(seed)
    if spec.family == "agalite":
        module: nn.Module = AGaLiTe(input_dim, **spec.config, backend=spec.backend)
    elif spec.family == "galite":
        module = GaLiTe(input_dim, **spec.config, backend=spec.backend)
    elif spec.family == "gtrxl":
        module = GTrXL(input_dim, **spec.config, mode=spec.mode or "recompute")
    elif spec.family == "lstm":
        module = ResetLSTM(input_dim, **spec.config)
    else:
        raise ValueError(f"spec.family: expected 'agalite', 'galite', 'gtrxl' or 'lstm', got {spec.family!r}")
    return module.to(device)


def training_state(module: nn.Module, batch: int, device: torch.device, seed: int = 0) -> Any:
    """A stored, non-trivial initial state for a training segment, as a replay buffer would hold.

    GTrXL starts from a full hidden-state memory (every slot visible), so its attention does all of
    its work; AGaLiTe's and GaLiTe's memories hold non-negative keys / normalisers as a real rollout
    leaves them.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(shape: tuple[int, ...], normal: bool) -> torch.Tensor:
        t = torch.randn(shape, generator=gen) if normal else torch.rand(shape, generator=gen)
        return t.to(device)

    if isinstance(module, AGaLiTe):
        s = module.initial_state(batch, device)
        return type(s)(
            rand(tuple(s.tilde_k.shape), False),
            rand(tuple(s.tilde_v.shape), True),
            rand(tuple(s.s.shape), False),
            torch.randint(1, 10**6, (batch,), generator=gen).to(device),
        )
    if isinstance(module, GaLiTe):
        s = module.initial_state(batch, device)
        return GaLiTeState(rand(tuple(s.c.shape), True), rand(tuple(s.s.shape), False))
    if isinstance(module, GTrXL):
        s = module.memory_state(batch, device)
        return GTrXLState(rand(tuple(s.memory.shape), True), torch.full_like(s.since_done, module.memory_len))
    if isinstance(module, ResetLSTM):
        s = module.initial_state(batch, device)
        return LSTMState(0.1 * rand(tuple(s.h.shape), True), 0.1 * rand(tuple(s.c.shape), True))
    raise TypeError(f"module: expected AGaLiTe, GaLiTe, GTrXL or ResetLSTM, got {type(module).__name__}")
