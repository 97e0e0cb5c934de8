"""Parallel compilation: a pool of worker processes that launch every kernel variant the session will
need once, at a tiny batch, so that Triton compiles it and stores it in its on-disk cache; the main
process then loads each from the cache in milliseconds instead of compiling it for seconds.

Each worker makes the very same public call the main process will make (same T, head sizes, dtype,
gradient or not, launch table), differing only in the batch size, which no kernel specialises on
(it only sets the grid). So the compile key is the same and the cache hit is exact. A sweep task
also checks its configuration against the reference at that small batch, so a configuration that
miscompiles or crashes is known before the main process ever launches it; a worker whose CUDA
context broke answers every later task with ``worker_lost``, and the main process then simply
compiles those itself.

Tasks run in submission order: the defaults (what correctness and the figures launch) first, then
the sweep's candidates. Records of stage ``precompile`` say how long each took and what failed.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["Precompiler", "Task", "run_task"]

_WORKER: dict[str, Any] = {"dead": None}


@dataclass(frozen=True)
class Task:
    id: str
    group: str  # "defaults" | "sweep" | "refine"
    kind: str  # "recurrence" | "step" | "model_step" | "model_train" | "gates"
    shape: dict[str, Any] | None = None  # Shape fields
    seq_len: int = 1
    dtype: str = "float32"
    grad: bool = False
    table: dict[str, Any] | None = None  # table_to_json of the (partial) table to launch with
    check: bool = False
    model: dict[str, Any] | None = None  # AGaLiTe sizes for the model kinds
    input_dim: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _sticky(device: Any) -> bool:
    from .stage import cuda_alive

    return not cuda_alive(device)


def _execute(task: Task, device: Any) -> dict[str, Any]:
    import torch

    from . import cases
    from .sizes import Shape

    if task.kind == "gates":
        from .. import gate

        results = [gate.gate_recurrence("triton", device), gate.gate_model("triton", device)]
        return dict(passed=all(r.passed for r in results))
    if task.kind in ("model_step", "model_train"):
        from agalite_triton import AGaLiTe

        from ..systems import training_state
        from ..workloads import autocast

        model = AGaLiTe(task.input_dim, **(task.model or {}), backend="triton").to(device)
        batch = 2
        if task.kind == "model_step":
            model.eval()
            with torch.no_grad():
                state = model.initial_state(batch, device)
                x = torch.randn(batch, task.input_dim, device=device)
                model(x, state, torch.zeros(batch, dtype=torch.bool, device=device), out=state)
        else:
            x = torch.randn(batch, task.seq_len, task.input_dim, device=device)
            dones = torch.zeros(batch, task.seq_len, dtype=torch.bool, device=device)
            with autocast(device, cases.DTYPES[task.dtype]):
                y, _ = model(x, training_state(model, batch, device), dones)
            y.float().square().mean().backward()
        return {}
    shape = Shape(**task.shape)
    inp = cases.make_inputs(shape, 2, task.seq_len, task.dtype, device, seed=1, ref_rows=2)
    if task.kind == "recurrence":
        if not task.check:
            cases.run_recurrence(inp, task.grad)
            return {}
        passed, detail = cases.check(inp, cases.reference(inp, task.grad), task.grad)
        return dict(passed=passed, max_error=detail["max_error"], failed=detail["failed"])
    if task.kind == "step":
        ref = cases.reference(inp, grad=False) if task.check else None
        passed, worst = True, 0.0
        for how in ("in_place", "final_out", "out_of_place"):
            got = cases.run_step(inp, how)
            if ref is not None:
                ok, detail = cases.compare(got, ref, inp.rows, inp.dtype)
                passed, worst = passed and ok, max(worst, detail["max_error"])
        return dict(passed=passed, max_error=worst) if task.check else {}
    raise ValueError(f"task.kind: unknown {task.kind!r}")


def run_task(task_dict: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point: run one task, return its outcome (never raises)."""
    import contextlib

    import torch

    task = Task(**task_dict)
    if _WORKER["dead"] is not None:
        return dict(id=task.id, status="worker_lost", error=_WORKER["dead"], pid=os.getpid())
    device = torch.device("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
    begin = time.perf_counter()
    try:
        table_ctx: Any = contextlib.nullcontext()
        if task.table is not None:
            from agalite_triton.kernels import config

            table_ctx = config.use_table(config.table_from_json(task.table))
        with table_ctx:
            result = _execute(task, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # reported to the main process, which records it
        message = f"{type(exc).__name__}: {exc}"[:2000]
        if device.type == "cuda" and _sticky(device):
            _WORKER["dead"] = message
        return dict(id=task.id, status="error", error=message, traceback=traceback.format_exc()[-4000:],
                    seconds=time.perf_counter() - begin, pid=os.getpid())  # fmt: skip
    status = "fail" if result.get("passed") is False else "ok"
    return dict(id=task.id, status=status, seconds=time.perf_counter() - begin, pid=os.getpid(), **result)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Precompiler:
    """The pool and its futures; results are recorded as they are collected."""

    def __init__(self, session: Any, workers: int) -> None:
        self.session = session
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
        self.futures: dict[str, tuple[Task, cf.Future]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.closed = False

    def submit(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            if task.id in self.futures or self.closed:
                continue
            self.futures[task.id] = (task, self.pool.submit(run_task, task.as_dict()))

    def _record(self, task: Task, result: dict[str, Any]) -> None:
        self.results[task.id] = result
        rec = self.session.recorder
        cid = f"precompile/{task.id}"
        if rec.done(cid):
            return
        status = {"worker_lost": "error", "cancelled": "skipped"}.get(result["status"], result["status"])
        fields = {k: v for k, v in result.items() if k not in ("id", "status")}
        rec.write("precompile", cid, status, group=task.group, kind=task.kind, shape=task.shape,
                  seq_len=task.seq_len, dtype=task.dtype, grad=task.grad, table=task.table, **fields)  # fmt: skip

    def collect(self) -> None:
        """Record every finished task not yet recorded (does not wait)."""
        for tid, (task, fut) in list(self.futures.items()):
            if tid not in self.results and fut.done():
                self._record(task, self._outcome(task, fut))

    @staticmethod
    def _outcome(task: Task, fut: cf.Future) -> dict[str, Any]:
        if fut.cancelled():
            return dict(id=task.id, status="cancelled", reason="cancelled when the pool was shut down")
        exc = fut.exception()
        if exc is not None:  # the worker process died (a broken pool)
            return dict(id=task.id, status="error", error=f"{type(exc).__name__}: {exc}")
        return fut.result()

    def wait(self, groups: tuple[str, ...], timeout_s: float) -> dict[str, int]:
        """Wait until every task of ``groups`` is done or ``timeout_s`` passes; counts by status."""
        pending = [f for t, f in self.futures.values() if t.group in groups]
        if pending:
            cf.wait(pending, timeout=max(0.0, timeout_s))
        self.collect()
        counts: dict[str, int] = {}
        for tid, (task, _fut) in self.futures.items():
            if task.group in groups:
                status = self.results[tid]["status"] if tid in self.results else "pending"
                counts[status] = counts.get(status, 0) + 1
        return counts

    def pending(self, task_id: str) -> bool:
        """Submitted and not finished: still compiling, or hung in its worker."""
        self.collect()
        return task_id in self.futures and task_id not in self.results

    def status_of(self, task_id: str) -> dict[str, Any] | None:
        self.collect()
        return self.results.get(task_id)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.collect()
        # Workers still compiling would keep running: end them, they have nothing left to give.
        for proc in processes:
            try:
                proc.terminate()
            except Exception:  # already gone
                pass
        for tid, (task, _fut) in self.futures.items():
            if tid not in self.results:
                self._record(task, dict(id=tid, status="cancelled", reason="the pool was shut down first"))


def default_tasks(plan: Any, stages: tuple[str, ...], table: dict[str, Any] | None = None) -> list[Task]:
    """What the correctness stage and the figures launch with the default table (or ``table``, the
    session's ``--table``), one task per compile key (shape, T, dtype, gradient or not; the model
    paths, whose projections are strided views)."""
    from dataclasses import asdict as as_dict

    tasks: list[Task] = []
    seen: set[str] = set()

    def add(task: Task) -> None:
        if task.id not in seen:
            seen.add(task.id)
            tasks.append(replace(task, table=table) if table is not None else task)

    recurrence: list[tuple[Any, int, str]] = []
    if "correctness" in stages:
        recurrence += [(c.shape, c.seq_len, c.dtype) for c in (*plan.correctness, *plan.training)]
        if "recurrence" in plan.gates or "model" in plan.gates:
            add(Task(id="defaults/gates", group="defaults", kind="gates"))
    if "figures" in stages:
        recurrence += [(s, plan.figure_seq, d) for s in plan.figure_shapes for d in plan.figure_dtypes]
    for shape, steps, dtype in recurrence:
        for grad in (True, False):
            add(Task(id=f"defaults/recurrence/{shape.preset}/T{steps}/{dtype}/{'grad' if grad else 'nograd'}",
                     group="defaults", kind="recurrence", shape=as_dict(shape), seq_len=steps, dtype=dtype, grad=grad))
    if "correctness" in stages:
        for c in plan.step:
            add(Task(id=f"defaults/step/{c.shape.preset}/{c.dtype}", group="defaults", kind="step",
                     shape=as_dict(c.shape), dtype=c.dtype))
    model = dict(model=plan.model_config, input_dim=plan.input_dim, group="defaults")
    add(Task(id="defaults/model_step", kind="model_step", **model))
    trains = [(t, d) for _, t, d in plan.model_check] if "correctness" in stages else []
    if "figures" in stages:
        trains += [(plan.train_seq, d) for d in ("float32", "bfloat16")]
    for steps, dtype in trains:
        add(Task(id=f"defaults/model_train/T{steps}/{dtype}", kind="model_train", seq_len=steps, dtype=dtype, **model))
    return [t for t in tasks if plan.pool_kinds is None or t.kind in plan.pool_kinds]
