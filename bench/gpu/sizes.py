"""What the session measures, in one place: the shapes, batch sizes, systems and per-case time of
every stage, for the real run on a GPU and for the dry run (the same stages at tiny shapes on CPU).

The dry run keeps each preset's R and eta (so every kernel specialisation and size-class path is
exercised) and shrinks H, D, B and T; it runs fewer combinations of dtype and gate regime, but every
kind of case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agalite_triton import PRESETS

from ..recurrence import RecurrenceShape
from ..systems import GTRXL_SIZE, SystemSpec

__all__ = ["Case", "Plan", "Shape", "System", "plan_for"]


@dataclass(frozen=True)
class Shape:
    """One recurrence shape, named after the preset it comes from."""

    preset: str
    heads: int
    head_dim: int
    eta: int
    r: int

    @property
    def rec(self) -> RecurrenceShape:
        return RecurrenceShape(f"recurrence-{self.preset}", self.heads, self.head_dim, self.eta, self.r)

    @property
    def pads(self) -> tuple[int, int, int]:
        """(r_pad, eta_pad, d_pad) as the launchers compute them: the launch table's key."""
        p2 = lambda n: 1 << (n - 1).bit_length()
        return p2(self.r), p2(self.eta), p2(self.head_dim)

    def as_dict(self) -> dict[str, Any]:
        return dict(preset=self.preset, H=self.heads, D=self.head_dim, eta=self.eta, R=self.r)


@dataclass(frozen=True)
class Case:
    """A correctness case of the recurrence: a shape, B, T, dtype and gate regime."""

    shape: Shape
    batch: int
    seq_len: int
    dtype: str  # "float32" | "bfloat16"
    gates: str = "normal"  # "normal" | "near1" (gate logits +9: memory replaced) | "near0" (-9: memory kept)

    @property
    def id(self) -> str:
        return f"{self.shape.preset}/B{self.batch}/T{self.seq_len}/{self.dtype}/{self.gates}"


@dataclass(frozen=True)
class System:
    """A model in the rollout or training figures; ``role`` is what the summary's targets look up."""

    role: str  # "agalite" | "agalite-reference" | "gtrxl" | "lstm-128" | "lstm-128x2" | "lstm-600"
    spec: SystemSpec


@dataclass(frozen=True)
class Plan:
    dry_run: bool
    input_dim: int
    ref_rows: int  # batch rows compared with the float64 reference (rows are independent)
    correctness: tuple[Case, ...]  # forward + backward and no-grad forward, kernel vs reference
    training: tuple[Case, ...]  # long-T forward + backward
    step: tuple[Case, ...]  # one-step kernel in place (seq_len 1)
    model_config: dict[str, Any]  # the AGaLiTe model of the model-level checks and figures
    model_check: tuple[tuple[int, int, str], ...]  # (B, T, dtype) model forward + backward vs reference
    graph_check: tuple[int, int]  # (B, replays) of a captured whole-model step
    bitwise: Case  # run twice, compared bit for bit (and the step kernel at step[0]'s batch)
    sweep_shapes: tuple[tuple[Shape, int], ...]  # (shape, B) of the tuning sweep
    sweep_seq: int
    sweep_step_batches: tuple[int, ...]  # extra batch sizes for the step kernel only
    sweep_rep_s: float
    sweep_refine_top: int  # best backward configurations whose CHUNK is varied afterwards
    figure_shapes: tuple[Shape, ...]
    figure_batch: int
    figure_seq: int
    figure_dtypes: tuple[str, ...]
    figure_rep_s: float
    rollout_batch: int
    train_batch: int
    train_seq: int
    systems: tuple[System, ...] = field(default_factory=tuple)
    pool_workers: int = 1
    pytest_timeout_s: float = 240.0
    pool_kinds: tuple[str, ...] | None = None  # compile-task kinds kept (the dry run: the cheap ones; the path runs)
    gates: tuple[str, ...] = ("recurrence", "model", "gtrxl")  # bench.gate checks run
    grid: dict[str, Any] = field(default_factory=dict)  # candidate values per knob (see sweep_grid.py)


def _shape(preset: str, heads: int | None = None, head_dim: int | None = None) -> Shape:
    p = PRESETS[preset]
    return Shape(preset, heads or p["n_heads"], head_dim or p["d_head"], p["eta"], p["r"])


def _systems(agalite: dict[str, Any], gtrxl: dict[str, Any], lstm: tuple[int, int, int], tag: str) -> tuple:
    h_small, h_two, h_big = lstm
    return (
        System("agalite", SystemSpec(f"AGaLiTe-{tag}", "agalite", dict(agalite), backend="triton")),
        System("agalite-reference", SystemSpec(f"AGaLiTe-{tag}", "agalite", dict(agalite), backend="reference")),
        System("gtrxl", SystemSpec(f"GTrXL-{gtrxl['memory']}", "gtrxl", dict(gtrxl))),
        System("lstm-600", SystemSpec(f"LSTM-{h_big}", "lstm", dict(hidden=h_big, num_layers=1))),
        System("lstm-128", SystemSpec(f"LSTM-{h_small}", "lstm", dict(hidden=h_small, num_layers=1))),
        System("lstm-128x2", SystemSpec(f"LSTM-{h_two}x2", "lstm", dict(hidden=h_two, num_layers=2))),
    )


def plan_for(dry_run: bool, workers: int | None = None) -> Plan:
    if not dry_run:
        paper, standard, craftax = _shape("paper"), _shape("standard"), _shape("craftax")
        shapes = (paper, standard, craftax)
        cases = []
        for shape in shapes:
            for dtype in ("float32", "bfloat16"):
                cases.append(Case(shape, 1024, 128, dtype, "normal"))
                cases.append(Case(shape, 1024, 100, dtype, "near1"))
            if shape is paper:
                cases += [Case(paper, 1024, 128, d, "near0") for d in ("float32", "bfloat16")]
        return Plan(
            dry_run=False, input_dim=64, ref_rows=48, correctness=tuple(cases),
            training=tuple(Case(paper, 256, 1024, d) for d in ("float32", "bfloat16")),
            step=tuple(Case(s, 4096, 1, d) for s in shapes for d in ("float32", "bfloat16")),
            model_config=dict(PRESETS["paper"]), model_check=((32, 1024, "float32"), (32, 128, "bfloat16")),
            graph_check=(4096, 4), bitwise=Case(paper, 1024, 128, "float32"),
            sweep_shapes=((paper, 1024), (standard, 1024), (paper, 256)), sweep_seq=128,
            sweep_step_batches=(4096,), sweep_rep_s=0.05, sweep_refine_top=3,
            figure_shapes=shapes, figure_batch=1024, figure_seq=128, figure_dtypes=("float32", "bfloat16"),
            figure_rep_s=0.25, rollout_batch=4096, train_batch=256, train_seq=128,
            systems=_systems(PRESETS["paper"], dict(GTRXL_SIZE, memory=128), (128, 128, 600), "paper"),
            pool_workers=workers or 12, pytest_timeout_s=240.0,
            grid=dict(warps=(1, 2, 4, 8), stages=(1, 2, 3), splits=(1, 2, 4), chunks=(8, 32, 64)),
        )  # fmt: skip
    paper, standard = _shape("paper", 2, 8), _shape("standard", 2, 8)
    tiny_model = dict(d_model=16, n_layers=1, n_heads=2, d_head=8, d_ffc=16, eta=2, r=2)
    tiny_gtrxl = dict(d_model=16, n_layers=2, n_heads=2, d_head=8, d_ff=16, memory=4)
    return Plan(
        dry_run=True, input_dim=6, ref_rows=2,
        correctness=(Case(paper, 3, 5, "float32", "normal"), Case(paper, 3, 4, "bfloat16", "near1"),
                     Case(standard, 3, 5, "float32", "near0")),
        training=(Case(paper, 2, 7, "float32"),), step=(Case(paper, 5, 1, "float32"), Case(standard, 5, 1, "bfloat16")),
        model_config=tiny_model, model_check=((2, 5, "float32"),), graph_check=(3, 2),
        bitwise=Case(paper, 3, 4, "float32"),
        sweep_shapes=((paper, 2),), sweep_seq=2, sweep_step_batches=(), sweep_rep_s=0.0, sweep_refine_top=1,
        figure_shapes=(paper,), figure_batch=3, figure_seq=4, figure_dtypes=("float32",), figure_rep_s=0.0,
        rollout_batch=3, train_batch=2, train_seq=3,
        systems=_systems(tiny_model, tiny_gtrxl, (16, 16, 24), "tiny"),
        pool_workers=workers or 2, pytest_timeout_s=120.0, pool_kinds=("step", "model_step"), gates=("gtrxl",),
        grid=dict(warps=(1, 2), stages=(1, 2), splits=(1, 2), chunks=(1,)),
    )  # fmt: skip
