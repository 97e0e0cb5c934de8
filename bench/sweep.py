"""What a run measures: the quick sweep (the default, sized for a 2-core CPU in under 3 minutes) and the
full sweep (``--full``), per device, narrowed by the command-line selections."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

__all__ = ["WORKLOADS", "Sweep", "default_sweep"]

WORKLOADS = ("inference", "training", "recurrence")
ALL_PRESETS = ["paper", "craftax", "standard", "fast", "optimized"]


@dataclass(frozen=True)
class Sweep:
    mode: str  # "quick" | "full" (or "custom" once narrowed)
    workloads: tuple[str, ...]
    inference_batches: tuple[int, ...]
    training_batches: tuple[int, ...]
    recurrence_batches: tuple[int, ...]
    gtrxl_memories: tuple[int, ...]
    presets: tuple[str, ...]  # AGaLiTe sizes timed (the paper's first), and the recurrence shapes
    dtypes: tuple[str, ...]  # "float32", plus "bfloat16" (autocast) on GPU
    seq_len: int = 128  # T of the training and recurrence workloads
    input_dim: int = 64
    done_prob: float = 0.01
    budget_s: float = 0.3  # seconds of repetitions per measurement (after warm-up), over all rounds
    rounds: int = 1  # the sweep is timed this many times over, each case's samples pooled (see timing.py)
    systems: tuple[str, ...] = ()  # substrings of system names to keep; empty keeps all
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def narrowed(
        self,
        only: list[str] | None = None,
        batches: list[int] | None = None,
        memories: list[int] | None = None,
        systems: list[str] | None = None,
        presets: list[str] | None = None,
        seq_len: int | None = None,
        budget_s: float | None = None,
        rounds: int | None = None,
    ) -> Sweep:
        """This sweep with the command line's selections applied."""
        changes: dict[str, Any] = {}
        if only:
            unknown = sorted(set(only) - set(WORKLOADS))
            if unknown:
                raise ValueError(f"--only: expected names from {list(WORKLOADS)}, got {unknown}")
            changes["workloads"] = tuple(w for w in WORKLOADS if w in only)
        if batches:
            if min(batches) < 1:
                raise ValueError(f"--batch: expected positive batch sizes, got {batches}")
            b = tuple(sorted(set(batches)))
            changes.update(inference_batches=b, training_batches=b, recurrence_batches=b)
        if memories:
            if min(memories) < 1:
                raise ValueError(f"--memory: expected positive GTrXL memory sizes, got {memories}")
            changes["gtrxl_memories"] = tuple(sorted(set(memories)))
        if systems:
            changes["systems"] = tuple(systems)
        if presets:
            unknown = sorted(set(presets) - set(ALL_PRESETS))
            if unknown:
                raise ValueError(f"--presets: expected names from {ALL_PRESETS}, got {unknown}")
            changes["presets"] = tuple(presets)
        if seq_len is not None:
            if seq_len < 1:
                raise ValueError(f"--seq-len: expected a positive int, got {seq_len}")
            changes["seq_len"] = seq_len
        if budget_s is not None:
            if budget_s <= 0:
                raise ValueError(f"--budget: expected a positive number of seconds, got {budget_s}")
            changes["budget_s"] = budget_s
        if rounds is not None:
            if rounds < 1:
                raise ValueError(f"--rounds: expected a positive int, got {rounds}")
            changes["rounds"] = rounds
        if not changes:
            return self
        structural = set(changes) - {"budget_s", "rounds"}
        return replace(self, mode=self.mode if not structural else f"{self.mode}+custom", **changes)

    def keeps(self, name: str) -> bool:
        """Whether the system (or recurrence shape) called ``name`` is selected by ``--systems``."""
        return not self.systems or any(s.lower() in name.lower() for s in self.systems)


def default_sweep(device: torch.device, full: bool = False) -> Sweep:
    if device.type == "cuda":
        return Sweep(
            mode="full" if full else "quick",
            workloads=WORKLOADS,
            inference_batches=(1, 64, 1024, 4096),
            training_batches=(16, 64, 256, 1024) if full else (16, 64),
            recurrence_batches=(1, 64, 1024, 4096) if full else (64, 1024),
            gtrxl_memories=(32, 64, 128, 256) if full else (128,),
            presets=tuple(ALL_PRESETS),
            dtypes=("float32", "bfloat16"),
            budget_s=0.1,
        )
    if full:
        return Sweep(
            mode="full",
            workloads=WORKLOADS,
            inference_batches=(1, 64, 1024, 4096),
            training_batches=(8, 32),
            recurrence_batches=(4, 16),
            gtrxl_memories=(32, 64, 128, 256),
            presets=tuple(ALL_PRESETS),
            dtypes=("float32",),
            budget_s=1.0,
            rounds=3,
        )
    # The quick CPU sweep is what the README reports: every system at the paper's size at three rollout
    # batch sizes, two training batches and the recurrence at every preset's shape, in a few minutes on 2 cores.
    return Sweep(
        mode="quick",
        workloads=WORKLOADS,
        inference_batches=(1, 64, 1024),
        training_batches=(8, 16),
        recurrence_batches=(4,),
        gtrxl_memories=(128,),
        presets=tuple(ALL_PRESETS),
        dtypes=("float32",),
        budget_s=0.3,
        rounds=3,
    )
