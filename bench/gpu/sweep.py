"""Stage ``sweep``: every candidate launch configuration, checked against the reference, then timed.

Order: the backward (the kernel the occupancy question is about) over warps x stages x split, then
the forward over warps x stages, then CHUNK on the best backward configurations, then the step
kernel over warps (after the compile pool has ended: microsecond kernels feel the host's load).
Each candidate was compiled (and checked at a tiny batch) by the compile pool beforehand; here it
is checked again at the sweep's batch on a subset of rows against the float64 oracle with
NaN-poisoned outputs, and only if it agrees, timed (``do_bench``), with the registers, spills and
blocks/SM of the kernels it launched. Shapes: the paper and standard sizes at B = 1024 and the
paper size at B = 256 (T = 128, float32); the step kernel also at B = 4096. GaLiTe's kernels follow
(``galite.sweep``: warps, rows per program, stages, CHUNK at galite-tmaze). The tuned table
(``tune.tuned_table``) is recorded at the end and used by the figures as an extra variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from . import cases, compiled, galite, heartbeat, tune
from .precompile import Task
from .records import read_records
from .sizes import Plan, Shape
from .stage import Session, Stage
from .sweep_grid import candidates, chunk_candidates, config_id
from .timer import time_call

__all__ = ["primary_tasks", "run"]


def _classes(plan: Plan) -> dict[str, Shape]:
    """One representative shape per size class among the sweep shapes (B does not change a compile)."""
    from agalite_triton.kernels import config

    out: dict[str, Shape] = {}
    for shape, _ in plan.sweep_shapes:
        out.setdefault(config.size_class(*shape.pads), shape)
    return out


def _candidates(plan: Plan, kernel: str, cls: str, shape: Shape) -> list[Any]:
    from agalite_triton.kernels import config

    return candidates(kernel, config.DEFAULT_TABLE[kernel][cls], shape.pads, plan.grid, full_grid=not plan.dry_run)


def _task(kind_kernel: str, cls: str, shape: Shape, table: dict, cid: str, plan: Plan, group: str) -> Task:
    step = kind_kernel == "step"
    return Task(id=f"sweep/{kind_kernel}/{cls}/{cid}", group=group, kind="step" if step else "recurrence",
                shape=asdict(shape), seq_len=1 if step else plan.sweep_seq, dtype="float32",
                grad=kind_kernel == "backward", table=table, check=True)  # fmt: skip


def primary_tasks(plan: Plan) -> list[Task]:
    """Compile tasks for every primary candidate (one per size class; the batch does not matter)."""
    tasks = []
    for kernel in ("backward", "forward", "step"):
        for cls, shape in _classes(plan).items():
            for cfg in _candidates(plan, kernel, cls, shape):
                tasks.append(_task(kernel, cls, shape, {kernel: {cls: asdict(cfg)}}, config_id(cfg), plan, "sweep"))
    return [t for t in tasks if plan.pool_kinds is None or t.kind in plan.pool_kinds]


class _Inputs:
    """Inputs and float64 references per (shape, batch, mode), made once and shared by all candidates."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cache: dict[tuple[str, int, str], tuple[cases.Inputs, dict]] = {}

    def get(self, shape: Shape, batch: int, mode: str) -> tuple[cases.Inputs, dict]:
        key = (shape.preset, batch, mode)
        if key not in self.cache:
            plan, device = self.session.plan, self.session.device
            steps = 1 if mode == "step" else plan.sweep_seq
            inp = cases.make_inputs(shape, batch, steps, "float32", device, seed=21, ref_rows=plan.ref_rows)
            if mode == "step":
                ref = cases.reference(inp, grad=False)
            else:
                ref = cases.reference(inp, grad=mode == "backward")
            self.cache[key] = (inp, ref)
        return self.cache[key]


def _timed_fn(inp: cases.Inputs, mode: str) -> Callable[[], Any]:
    if mode in ("forward", "backward"):
        return cases.recurrence_fn(inp, "triton", backward=mode == "backward")
    from agalite_triton.kernels import agalite_step_

    state = [s.clone() for s in inp.state]
    proj = [p[:, 0] for p in inp.proj]
    dones = inp.dones[:, 0]
    return lambda: agalite_step_(*proj, dones, *state, inp.tick)


def _measure(session: Session, stage: Stage, inputs: _Inputs, kernel: str, cls: str, shape: Shape, batch: int,
             table: dict, candidate: Any, forward_cfg: Any, is_default: bool, task_id: str) -> None:  # fmt: skip
    from agalite_triton.kernels import config

    cid = config_id(candidate)
    fields = dict(sweep_kernel=kernel, size_class=cls, candidate=asdict(candidate), is_default=is_default,
                  forward_config=asdict(forward_cfg) if forward_cfg is not None else None, table=table,
                  shape=shape.as_dict(), shape_id=f"{shape.preset}/B{batch}", batch=batch,
                  seq_len=1 if kernel == "step" else session.plan.sweep_seq, dtype="float32")  # fmt: skip

    def one() -> dict[str, Any]:
        pool = session.precompiler
        if pool is not None and pool.pending(task_id):
            return dict(status="skipped", reason="its compile task had not finished in the pool (a slow compile, "
                        "or a hang): not launched in the main process")  # fmt: skip
        pre = pool.status_of(task_id) if pool is not None else None
        if pre is not None and pre["status"] in ("error", "fail"):
            return dict(status=pre["status"], detail="refused by the compile worker's check at a tiny batch",
                        worker=dict((k, pre.get(k)) for k in ("error", "max_error", "failed")))  # fmt: skip
        inp, ref = inputs.get(shape, batch, kernel)
        with config.use_table(config.table_from_json(table)):
            before = compiled.snapshot()
            if kernel == "step":
                with cases.poisoned():
                    got = cases.run_step(inp, "in_place")
                passed, detail = cases.compare(got, ref, inp.rows, inp.dtype)
            else:
                passed, detail = cases.check(inp, ref, grad=kernel == "backward")
            launched = compiled.new_kernels(before, session.device)
            if not passed:
                return dict(status="fail", detail=f"disagrees with the reference: {detail['failed']}", check=detail,
                            kernels=launched)  # fmt: skip
            fn = _timed_fn(inp, kernel)
            if session.device.type == "cuda":
                fn()  # untimed: loads the compiled kernel, allocates
                session.sync()
            timing = time_call(fn, session.device, session.plan.sweep_rep_s)
        return dict(check_max_error=detail["max_error"], kernels=launched, precompile=pre and pre.get("status"),
                    **timing)  # fmt: skip

    stage.case(f"{kernel}/{shape.preset}/B{batch}/{cid}", 0.4, one, **fields)


def run(session: Session, stage: Stage) -> None:
    from agalite_triton.kernels import config

    plan = session.plan
    torch.backends.cuda.matmul.allow_tf32 = False
    pre = session.precompiler
    if pre is not None:
        wait = 0.5 * stage.budget.remaining()
        heartbeat.beat("session/wait/precompile-sweep", wait + 120)
        counts = pre.wait(("defaults", "sweep"), timeout_s=wait)
        print(f"  [sweep] compile pool: {counts}", flush=True)
    session.before_timing(shutdown_pool=False)  # the pool compiles the CHUNK candidates meanwhile
    inputs = _Inputs(session)
    classes = _classes(plan)
    batches_of: dict[str, list[tuple[Shape, int]]] = {}
    for shape, batch in plan.sweep_shapes:
        batches_of.setdefault(config.size_class(*shape.pads), []).append((shape, batch))

    def sweep_kernel(kernel: str) -> None:
        for cls, shape in classes.items():
            forward_default = config.DEFAULT_TABLE["forward"][cls] if kernel == "backward" else None
            for cfg in _candidates(plan, kernel, cls, shape):
                table = {kernel: {cls: asdict(cfg)}}
                task_id = f"sweep/{kernel}/{cls}/{config_id(cfg)}"
                shown = cfg if forward_default is None else _with_chunk(cfg, forward_default.chunk)
                targets = list(batches_of[cls])
                if kernel == "step":
                    targets += [(shape, b) for b in plan.sweep_step_batches]
                for s, batch in targets:
                    _measure(session, stage, inputs, kernel, cls, s, batch, table, shown, forward_default,
                             cfg == config.DEFAULT_TABLE[kernel][cls], task_id)  # fmt: skip

    sweep_kernel("backward")
    refine = _refine_tasks(session, classes)  # CHUNK: compiled in the pool while the forward is timed
    sweep_kernel("forward")
    if pre is not None and refine:
        wait = 0.3 * stage.budget.remaining()
        heartbeat.beat("session/wait/precompile-refine", wait + 120)
        pre.wait(("refine",), timeout_s=wait)
    for task, cls, _shape, table, fwd, bwd in refine:
        for s, batch in batches_of[cls]:
            _measure(session, stage, inputs, "backward", cls, s, batch, table, bwd, fwd, False, task.id)
    # The step kernel takes microseconds, so host load shows in its times: the pool ends first (its
    # step candidates were compiled with the primary tasks).
    if session.precompiler is not None:
        session.precompiler.collect()
        step_results = {tid: r for tid, r in session.precompiler.results.items() if tid.startswith("sweep/step/")}
        session.precompiler.shutdown()
        session.precompiler = _Finished(step_results)
    sweep_kernel("step")
    inputs.cache.clear()
    session.precompiler = None
    galite.sweep(session, stage)

    def choose() -> dict[str, Any]:
        table, choices = tune.tuned_table(read_records(session.recorder.path))
        default = config.table_to_json(config.DEFAULT_TABLE)
        session.tuned_table = table if table != default and choices else None
        return dict(table=table, choices=choices, differs_from_default=session.tuned_table is not None)

    stage.case("tuned_table", -float("inf"), choose)


class _Finished:
    """The pool's outcomes once it has ended: a task not among them never finished there."""

    def __init__(self, results: dict[str, dict[str, Any]]) -> None:
        self.results = results

    def pending(self, task_id: str) -> bool:
        return False

    def status_of(self, task_id: str) -> dict[str, Any] | None:
        return self.results.get(task_id)

    def collect(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _with_chunk(cfg: Any, chunk: int) -> Any:
    from dataclasses import replace

    return replace(cfg, chunk=chunk)


def _refine_tasks(session: Session, classes: dict[str, Shape]) -> list[tuple]:
    """Submit the CHUNK candidates for the best ``sweep_refine_top`` backward configurations so far."""
    from agalite_triton.kernels import config

    plan = session.plan
    records = [r for r in read_records(session.recorder.path) if r.get("stage") == "sweep"
               and r.get("sweep_kernel") == "backward" and r.get("status") == "ok"]  # fmt: skip
    out = []
    for cls, shape in classes.items():
        mine = [r for r in records if r["size_class"] == cls and isinstance(r.get("median_s"), (int, float))]
        if not mine:
            continue
        best: dict[str, float] = {}
        for r in mine:
            key = config_id(config.LaunchConfig(**r["candidate"]))
            best[key] = min(best.get(key, float("inf")), r["median_s"])
        order = sorted(best, key=best.get)[: plan.sweep_refine_top]
        by_id = {config_id(config.LaunchConfig(**r["candidate"])): config.LaunchConfig(**r["candidate"]) for r in mine}
        forward = config.DEFAULT_TABLE["forward"][cls]
        for fwd, bwd in chunk_candidates(forward, [by_id[k] for k in order], tuple(plan.grid["chunks"])):
            table = {"forward": {cls: asdict(fwd)}, "backward": {cls: asdict(bwd)}}
            task = _task("backward", cls, shape, table, f"{config_id(bwd)}-refine", plan, "refine")
            out.append((task, cls, shape, table, fwd, bwd))
    if session.precompiler is not None:
        session.precompiler.submit(t[0] for t in out)
    return out
