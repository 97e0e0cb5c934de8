"""GaLiTe in the prepared GPU session: its kernels against the float64 oracle at the galite-tmaze size
(correctness stage), its launch-table knobs (sweep stage) and its recurrence times beside AGaLiTe's
(figures stage).

Inputs as AGaLiTe's (``cases``): drawn on the device, random and non-zero, dones inside T, a non-zero
initial memory (C ~ N(0, 1), s ~ U(0, 1), as the conformance fixtures), gate logits optionally pushed
towards 0 or 1; the oracle is the reference backend in float64 on a subset of rows, the kernels run
on every row with NaN-poisoned outputs, compared by ``cases.compare`` with the same tolerances.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from agalite_triton import GALITE_PRESETS, galite_recurrence

from . import cases
from .stage import Session, Stage, json_table
from .timer import time_call

__all__ = ["GaliteShape", "correctness", "figures", "galite_bytes", "plan_for", "sweep"]

MEMORY_NAMES = ("c", "s")


@dataclass(frozen=True)
class GaliteShape:
    preset: str
    heads: int
    head_dim: int
    nu: int

    @property
    def pads(self) -> tuple[int, int, int]:
        """The launch table's key for GaLiTe: (D_PAD, NU_PAD, D_PAD)."""
        p2 = lambda n: 1 << (n - 1).bit_length()
        return p2(self.head_dim), p2(self.nu), p2(self.head_dim)

    def as_dict(self) -> dict[str, Any]:
        return dict(preset=self.preset, H=self.heads, D=self.head_dim, nu=self.nu)


@dataclass(frozen=True)
class GalitePlan:
    shape: GaliteShape
    correctness: tuple[tuple[int, int, str, str], ...]  # (B, T, dtype, gates): forward + backward and no-grad
    step_batch: int
    sweep: tuple[int, int]  # (B, T) of the sweep, float32
    grid: dict[str, tuple[int, ...]]  # warps, rows, stages, chunks
    full_grid: bool
    figure: tuple[int, int]  # (B, T) of the recurrence figures


def plan_for(dry_run: bool) -> GalitePlan:
    if not dry_run:
        p = GALITE_PRESETS["galite-tmaze"]
        shape = GaliteShape("galite-tmaze", p["n_heads"], p["d_head"], p["nu"])
        return GalitePlan(
            shape, ((256, 128, "float32", "normal"), (256, 100, "bfloat16", "near1"), (256, 128, "float32", "near0")),
            step_batch=4096, sweep=(256, 128),
            # 12 backward, 6 forward and 6 step candidates, each compiled in the stage (no pool): seconds each.
            grid=dict(warps=(2, 4), rows=(4, 8, 16), stages=(1,), chunks=(16, 32)), full_grid=True,
            figure=(256, 128),
        )  # fmt: skip
    # D not a power of two and nu = 3: every padded path; tiny, since the interpreter runs it.
    return GalitePlan(GaliteShape("galite-tiny", 2, 6, 3), ((3, 4, "float32", "normal"),), step_batch=3, sweep=(2, 4),
                      grid=dict(warps=(1, 2), rows=(2, 4), stages=(1, 2), chunks=(1, 2)), full_grid=False,
                      figure=(2, 3))  # fmt: skip


@dataclass
class Inputs:
    shape: GaliteShape
    dtype: str
    proj: list[torch.Tensor]
    dones: torch.Tensor
    memory: list[torch.Tensor]  # c (B, H, D, K), s (B, H, K) in float32
    grad_out: torch.Tensor
    rows: torch.Tensor


def make_inputs(shape: GaliteShape, batch: int, seq_len: int, dtype: str, device: torch.device,
                gates: str = "normal", seed: int = 0, ref_rows: int = 48) -> Inputs:  # fmt: skip
    """GaLiTe's counterpart of ``cases.make_inputs``: AGaLiTe's projections at (H, D, eta = nu), its memory."""
    agalite_shape = replace_shape(shape)
    inp = cases.make_inputs(agalite_shape, batch, seq_len, dtype, device, gates, seed, ref_rows)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    H, D, K = shape.heads, shape.head_dim, shape.nu * shape.head_dim
    memory = [torch.randn(batch, H, D, K, generator=gen, device=device), torch.rand(batch, H, K, generator=gen,
              device=device)]  # fmt: skip
    return Inputs(shape, dtype, inp.proj, inp.dones, memory, inp.grad_out, inp.rows)


def replace_shape(shape: GaliteShape) -> Any:
    """The AGaLiTe shape with the same projections (eta = nu; R = 1, never read)."""
    from .sizes import Shape

    return Shape(shape.preset, shape.heads, shape.head_dim, shape.nu, 1)


def run_recurrence(inp: Inputs, grad: bool, backend: str = "triton", rows: torch.Tensor | None = None,
                   upcast: bool = False, table: dict | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Output, final memory and (with ``grad``) the gradients of every projection and of the memory."""

    def take(t: torch.Tensor) -> torch.Tensor:
        t = cases.take_rows(t, rows)
        return t.double() if upcast else t

    proj = [take(p).detach() for p in inp.proj]
    memory = [take(m).detach() for m in inp.memory]
    dones = cases.take_rows(inp.dones, rows)
    with json_table(table):
        if not grad:
            with torch.no_grad():
                out, final = galite_recurrence(*proj, dones, *memory, backend=backend)
            return dict(zip(("out", *MEMORY_NAMES), (out, *final)))
        leaves = [t.requires_grad_(True) for t in (*proj, *memory)]
        out, final = galite_recurrence(*proj, dones, *memory, backend=backend)
        out.backward(take(inp.grad_out))
    got = dict(zip(("out", *MEMORY_NAMES), (out.detach(), *(f.detach() for f in final))))
    for name, leaf in zip((*cases.PROJ_NAMES, *(f"{n}0" for n in MEMORY_NAMES)), leaves):
        got[f"d_{name}"] = leaf.grad
    return got


def reference(inp: Inputs, grad: bool) -> dict[str, torch.Tensor]:
    return run_recurrence(inp, grad, backend="reference", rows=inp.rows, upcast=True)


def check(inp: Inputs, ref: dict[str, torch.Tensor], grad: bool, table: dict | None = None) -> tuple[bool, dict]:
    with cases.poisoned() as poison:
        got = run_recurrence(inp, grad, table=table)
    passed, detail = cases.compare(got, ref, inp.rows, inp.dtype)
    return passed, dict(poisoned=poison, **detail)


def run_step(inp: Inputs, how: str, table: dict | None = None) -> dict[str, torch.Tensor]:
    """One step on copies of the memory: ``in_place`` (``galite_step_``), ``final_out`` (into the memory,
    as a rollout), ``out_of_place``, or ``slots`` (a quarter of the rows, through the index; the others
    must stay bitwise as they were: they come back as ``untouched``)."""
    from agalite_triton.kernels import galite_step_

    memory = [m.clone() for m in inp.memory]
    proj = [p[:, :1].detach() for p in inp.proj]
    dones = inp.dones[:, :1]
    with torch.no_grad(), json_table(table):
        if how == "in_place":
            out, final = galite_step_(*(p[:, 0] for p in proj), dones[:, 0], *memory).unsqueeze(1), memory
        elif how == "final_out":
            out, final = galite_recurrence(*proj, dones, *memory, backend="triton", final_out=tuple(memory))
        elif how == "out_of_place":
            out, final = galite_recurrence(*proj, dones, *memory, backend="triton")
        elif how == "slots":
            n = max(1, proj[0].shape[0] // 4)
            slots = torch.randperm(proj[0].shape[0], generator=torch.Generator().manual_seed(3))[:n].to(proj[0].device)
            out, _ = galite_recurrence(*(p[slots] for p in proj), dones[slots], *memory, backend="triton",
                                       final_out=tuple(memory), slots=slots)  # fmt: skip
            full = torch.full((proj[0].shape[0], *out.shape[1:]), float("nan"), dtype=out.dtype, device=out.device)
            full[slots] = out
            untouched = torch.ones(proj[0].shape[0], dtype=torch.bool, device=out.device)
            untouched[slots] = False
            same = all(bool(torch.equal(a[untouched], b[untouched])) for a, b in zip(memory, inp.memory))
            return dict(out=full, c=memory[0], s=memory[1], slots=slots, untouched=torch.tensor(same))
        else:
            raise ValueError(f"how: expected 'in_place', 'final_out', 'out_of_place' or 'slots', got {how!r}")
    return dict(zip(("out", *MEMORY_NAMES), (out, *final)))


def launch_config(shape: GaliteShape) -> dict[str, Any] | None:
    """The GaLiTe kernels' launch configuration now at this shape (None without Triton)."""
    try:
        from agalite_triton.kernels import config
    except ImportError:
        return None
    kernels = ("galite_forward", "galite_backward", "galite_step")
    return dict(size_class=config.size_class(*shape.pads), **{k: asdict(config.get_config(k, *shape.pads))
                                                              for k in kernels})  # fmt: skip


def _step_reference(inp: Inputs) -> Inputs:
    """The step's inputs as a T = 1 case (its oracle is the sequence reference on the first step)."""
    return Inputs(inp.shape, inp.dtype, [p[:, :1] for p in inp.proj], inp.dones[:, :1], inp.memory,
                  inp.grad_out[:, :1], inp.rows)  # fmt: skip


def correctness(session: Session, stage: Stage) -> None:
    """Forward + backward and the no-grad forward at each planned (B, T, dtype, gates), the step four
    ways, and a bitwise re-run of forward + backward."""
    gp, device, ref_rows = plan_for(session.dry_run), session.device, session.plan.ref_rows
    shape = gp.shape
    fields = dict(shape=shape.as_dict(), model="galite", config=launch_config(shape))
    for batch, seq_len, dtype, gates in gp.correctness:
        holder: dict[str, Any] = {}
        case_id = f"galite/{shape.preset}/B{batch}/T{seq_len}/{dtype}/{gates}"

        def inputs(batch=batch, seq_len=seq_len, dtype=dtype, gates=gates, holder=holder) -> Inputs:
            if "inp" not in holder:
                holder["inp"] = make_inputs(shape, batch, seq_len, dtype, device, gates, seed=41, ref_rows=ref_rows)
            return holder["inp"]

        def one(grad: bool) -> dict[str, Any]:
            ref = reference(inputs(), grad)
            passed, detail = check(inputs(), ref, grad)
            return dict(status="ok" if passed else "fail", **detail)

        for grad, kernel in ((True, "forward+backward"), (False, "forward")):
            stage.case(f"{case_id}/{kernel.replace('+', '_')}", 3.0, lambda grad=grad: one(grad), kernel=kernel,
                       batch=batch, seq_len=seq_len, dtype=dtype, gates=gates, **fields)  # fmt: skip
        holder.clear()

    step_holder: dict[str, Any] = {}

    def step_inputs() -> tuple[Inputs, dict]:
        if "inp" not in step_holder:
            inp = make_inputs(shape, gp.step_batch, 1, "float32", device, seed=43, ref_rows=ref_rows)
            step_holder.update(inp=inp, ref=reference(_step_reference(inp), grad=False))
        return step_holder["inp"], step_holder["ref"]

    for how in ("in_place", "final_out", "out_of_place", "slots"):

        def step(how: str = how) -> dict[str, Any]:
            inp, ref = step_inputs()
            with cases.poisoned() as poison:
                got = run_step(inp, how)
            extra = {}
            if how == "slots":
                rows = got.pop("slots")
                extra["others_untouched"] = bool(got.pop("untouched"))
                sub = Inputs(inp.shape, inp.dtype, [p[rows] for p in inp.proj], inp.dones[rows],
                             [m[rows] for m in inp.memory], inp.grad_out[rows],
                             torch.arange(min(len(rows), ref_rows), device=device))  # fmt: skip
                ref = reference(_step_reference(sub), grad=False)
                got = dict(out=got["out"][rows], c=got["c"][rows], s=got["s"][rows])
                passed, detail = cases.compare(got, ref, sub.rows, inp.dtype)
                passed = passed and extra["others_untouched"]
            else:
                passed, detail = cases.compare(got, ref, inp.rows, inp.dtype)
            return dict(status="ok" if passed else "fail", poisoned=poison, **extra, **detail)

        stage.case(f"galite/step/{shape.preset}/B{gp.step_batch}/{how}", 1.5, step, kernel="step", how=how,
                   batch=gp.step_batch, seq_len=1, dtype="float32", **fields)  # fmt: skip

    batch, seq_len, dtype, _ = gp.correctness[0]

    def twice() -> dict[str, Any]:
        inp = make_inputs(shape, batch, seq_len, dtype, device, seed=47, ref_rows=ref_rows)
        first, second = run_recurrence(inp, grad=True), run_recurrence(inp, grad=True)
        differ = [k for k in first if not torch.equal(first[k], second[k])]
        return dict(status="fail" if differ else "ok", differ=differ, compared=sorted(first))

    stage.case(f"galite/bitwise/{shape.preset}/B{batch}/T{seq_len}/{dtype}/forward_backward", 2.0, twice,
               kernel="forward+backward", batch=batch, seq_len=seq_len, dtype=dtype, **fields)  # fmt: skip


# Knobs each GaLiTe kernel reads from the launch table (the step kernel has no time loop).
_AXES = {
    "galite_backward": ("num_warps", "rows", "chunk"),
    "galite_forward": ("num_warps", "rows", "num_stages"),
    "galite_step": ("num_warps", "rows"),
}
_GRID_KEYS = {"num_warps": "warps", "rows": "rows", "num_stages": "stages", "chunk": "chunks"}


def candidates(kernel: str, default: Any, grid: dict[str, tuple[int, ...]], full_grid: bool) -> list[Any]:
    """The default first, then the grid over the kernel's knobs (or, in the dry run, one candidate with
    every knob moved)."""
    axes = {name: tuple(grid[_GRID_KEYS[name]]) for name in _AXES[kernel]}
    found = [default]
    if full_grid:
        for values in itertools.product(*axes.values()):
            found.append(replace(default, **dict(zip(axes, values))))
    else:
        found.append(replace(default, **{n: next((v for v in vs if v != getattr(default, n)), getattr(default, n))
                                         for n, vs in axes.items()}))  # fmt: skip
    return list(dict.fromkeys(found))


def _timed_fn(inp: Inputs, kernel: str, table: dict) -> Callable[[], Any]:
    if kernel == "galite_step":
        from agalite_triton.kernels import galite_step_

        memory = [m.clone() for m in inp.memory]
        proj = [p[:, 0] for p in inp.proj]

        def step() -> None:
            with json_table(table):
                galite_step_(*proj, inp.dones[:, 0], *memory)

        return step
    return recurrence_fn(inp, "triton", backward=kernel == "galite_backward", table=table)


def recurrence_fn(inp: Inputs, backend: str, backward: bool, table: dict | None = None) -> Callable[[], None]:
    """A timed ``galite_recurrence`` call: forward without grad, or forward + backward."""
    leaves = [p.detach().requires_grad_(backward) for p in inp.proj]

    def call() -> None:
        with json_table(table):
            if not backward:
                with torch.no_grad():
                    galite_recurrence(*leaves, inp.dones, *inp.memory, backend=backend)
                return
            for p in leaves:
                p.grad = None
            out, _ = galite_recurrence(*leaves, inp.dones, *inp.memory, backend=backend)
            out.backward(inp.grad_out)

    return call


def sweep(session: Session, stage: Stage) -> None:
    """Every candidate checked against the oracle (poisoned outputs), then timed; records as AGaLiTe's
    sweep (``tune`` picks them up: ``sweep_kernel`` galite_*)."""
    from agalite_triton.kernels import config

    gp, device = plan_for(session.dry_run), session.device
    shape, (batch, seq_len) = gp.shape, gp.sweep
    cls = config.size_class(*shape.pads)
    cache: dict[str, tuple[Inputs, dict]] = {}

    def inputs(kernel: str) -> tuple[Inputs, dict]:
        mode = "step" if kernel == "galite_step" else kernel
        if mode not in cache:
            steps = 1 if mode == "step" else seq_len
            inp = make_inputs(shape, batch, steps, "float32", device, seed=51, ref_rows=session.plan.ref_rows)
            cache[mode] = (inp, reference(inp, grad=mode == "galite_backward"))
        return cache[mode]

    for kernel in ("galite_backward", "galite_forward", "galite_step"):
        default = config.DEFAULT_TABLE[kernel][cls]
        for cand in candidates(kernel, default, gp.grid, gp.full_grid):
            table = {kernel: {cls: asdict(cand)}}
            if kernel == "galite_backward":  # the forward's entry decides the checkpoint interval
                table["galite_forward"] = {cls: asdict(replace(config.DEFAULT_TABLE["galite_forward"][cls],
                                                               chunk=cand.chunk))}  # fmt: skip
            cid = f"w{cand.num_warps}-s{cand.num_stages}-c{cand.chunk}-r{cand.rows}"

            def one(kernel: str = kernel, table: dict = table) -> dict[str, Any]:
                inp, ref = inputs(kernel)
                if kernel == "galite_step":
                    with cases.poisoned():
                        got = run_step(inp, "in_place", table)
                    passed, detail = cases.compare(got, ref, inp.rows, inp.dtype)
                else:
                    passed, detail = check(inp, ref, grad=kernel == "galite_backward", table=table)
                if not passed:
                    return dict(status="fail", detail=f"disagrees with the reference: {detail['failed']}", check=detail)
                fn = _timed_fn(inp, kernel, table)
                if device.type == "cuda":
                    fn()
                    session.sync()
                return dict(check_max_error=detail["max_error"], **time_call(fn, device, session.plan.sweep_rep_s))

            estimate = 0.5 if session.dry_run else 5.0  # a compile each on the GPU machine
            stage.case(f"{kernel}/{shape.preset}/B{batch}/{cid}", estimate, one, sweep_kernel=kernel, size_class=cls,
                       candidate=asdict(cand), is_default=cand == default, table=table, shape=shape.as_dict(),
                       shape_id=f"{shape.preset}/B{batch}", batch=batch,
                       seq_len=1 if kernel == "galite_step" else seq_len, dtype="float32")  # fmt: skip
    cache.clear()


def galite_bytes(shape: GaliteShape, batch: int, seq_len: int, dtype: str, backward: bool) -> int:
    """The bandwidth floor (as ``floors.recurrence_bytes``): projections, dones and the memory read once,
    the read-out and final memory written once; the backward adds the read-out's gradient, the
    projections' and the initial memory's gradients."""
    e = cases.DTYPES[dtype].itemsize
    B, T, H, D, nu = batch, seq_len, shape.heads, shape.head_dim, shape.nu
    projections = B * T * H * (5 * D + 3 * nu) * e
    readout = B * T * H * D * e
    memory = B * H * (D * nu * D + nu * D) * 4
    forward = projections + B * T + 2 * memory + readout
    return forward if not backward else forward + readout + projections + memory


def figures(session: Session, stage: Stage) -> None:
    """GaLiTe's recurrence, forward and forward + backward, kernels and reference, float32, beside
    AGaLiTe's (``figure=recurrence``, ``system`` the GaLiTe preset)."""
    gp, device, plan = plan_for(session.dry_run), session.device, session.plan
    shape, (B, T) = gp.shape, gp.figure
    ceiling = session.ceilings.get("copy_bytes_per_s")
    inp = make_inputs(shape, B, T, "float32", device, seed=53, ref_rows=plan.ref_rows)
    for backward in (False, True):
        mode = "forward_backward" if backward else "forward"
        for backend in ("triton", "reference"):

            def one(backward: bool = backward, backend: str = backend) -> dict[str, Any]:
                extra: dict[str, Any] = {}
                if backend == "triton":
                    passed, detail = check(inp, reference(inp, backward), grad=backward)
                    extra["check_max_error"] = detail["max_error"]
                    if not passed:
                        return dict(status="fail", detail=f"disagrees: {detail['failed']}", check=detail)
                fn = recurrence_fn(inp, backend, backward)
                if device.type == "cuda" or not session.dry_run:
                    fn()
                    session.sync()
                timing = time_call(fn, device, plan.figure_rep_s)
                floor = galite_bytes(shape, B, T, "float32", backward)
                achieved = floor / timing["median_s"]
                fraction = achieved / ceiling if ceiling else None
                return dict(bytes_floor=floor, achieved_bytes_per_s=achieved, ceiling_bytes_per_s=ceiling,
                            bandwidth_fraction=fraction, throughput=B * T / timing["median_s"], **extra,
                            **timing)  # fmt: skip

            stage.case(f"recurrence/{mode}/{shape.preset}/B{B}/T{T}/float32/{backend}", 3.0, one, figure="recurrence",
                       mode=mode, variant="default", backend=backend, system=shape.preset, shape=shape.as_dict(),
                       dtype="float32", batch=B, seq_len=T, unit="samples/s", model="galite")  # fmt: skip
