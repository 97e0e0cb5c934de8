"""One benchmark run: gate the backends, time every selected case, and collect the result document
(the schema is in bench/results/README.md)."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from agalite_triton import AGaLiTe, GaLiTe, agalite_recurrence
from agalite_triton.backend import triton_available
from agalite_triton.reference import cpu_fused, galite_cpu_fused

from . import gate
from .environment import describe_device, load_average, versions
from .memory import CPU_METHOD, CUDA_METHOD, peak_bytes
from .recurrence import RecurrenceShape, recurrence_shapes, recurrence_step
from .sweep import Sweep
from .systems import REFERENCE_SYSTEM, SystemSpec, agalite_specs, build, galite_specs, gtrxl_specs, lstm_specs
from .timing import Timing, describe_method, measure, sample, summarise
from .workloads import inference_step, training_step

__all__ = ["SCHEMA", "Case", "available_backends", "plan", "run_bench"]

SCHEMA = "agalite-bench/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    """One measurement: a workload, a system (or recurrence shape), a dtype and a batch size."""

    workload: str  # "inference" | "training" | "recurrence_forward" | "recurrence_forward_backward"
    system: dict[str, Any]  # name, family, mode, backend, label, config, state_bytes_per_env
    dtype: str
    batch: int
    seq_len: int  # steps per call: 1 for inference
    make: Callable[[], Callable[[], None]]  # builds the callable when the case runs

    @property
    def unit(self) -> str:
        return "steps/s" if self.workload == "inference" else "samples/s"


def available_backends(device: torch.device) -> list[str]:
    """The reference always; the Triton kernels on CUDA when they are importable."""
    if device.type == "cuda" and triton_available():
        return ["reference", "triton"]
    return ["reference"]


def _system_info(spec: SystemSpec, module: torch.nn.Module) -> dict[str, Any]:
    return dict(
        name=spec.name, family=spec.family, mode=spec.mode, backend=spec.backend, label=spec.label,
        config=dict(spec.config), params=sum(p.numel() for p in module.parameters()),
        state_bytes_per_env=int(module.state_bytes_per_env),
    )  # fmt: skip


def _shape_info(shape: RecurrenceShape, backend: str, mode: str | None = None) -> dict[str, Any]:
    H, D, E, R = shape.heads, shape.head_dim, shape.eta * shape.head_dim, shape.r
    tags = ", ".join(t for t in (backend, mode) if t)
    return dict(
        name=shape.name, family="recurrence", mode=mode, backend=backend, label=f"{shape.name} [{tags}]",
        config=shape.config, params=0, state_bytes_per_env=4 * (R * H * E + R * H * D + H * E) + 8,
    )  # fmt: skip


def _eager(make: Callable[[], Callable[[], None]]) -> Callable[[], Callable[[], None]]:
    """``make`` whose callable runs with the fused CPU recurrence switched off (building included)."""

    def made() -> Callable[[], None]:
        with cpu_fused.forced(False):
            fn = make()

        def call() -> None:
            with cpu_fused.forced(False):
                fn()

        return call

    return made


def _model_fn(
    workload: str, spec: SystemSpec, batch: int, dtype: str, sweep: Sweep, device: torch.device
) -> Callable[[], None]:
    module = build(spec, sweep.input_dim, device, sweep.seed)
    args = (sweep.input_dim, device, DTYPES[dtype], sweep.done_prob, sweep.seed)
    if workload == "inference":
        return inference_step(module, batch, *args)
    return training_step(module, batch, sweep.seq_len, *args)


def _side_by_side(device: torch.device, backends: list[str]) -> bool:
    """Whether the eager CPU reference is timed beside the default one: only where the default is the
    fused recurrence (built, and neither switched off nor forced off after a failed gate)."""
    return (
        device.type == "cpu"
        and "reference" in backends
        and cpu_fused.enabled()
        and cpu_fused.build_info()["state"] == "ready"
    )


def plan(sweep: Sweep, device: torch.device, backends: list[str]) -> list[Case]:
    """Every case of ``sweep`` for the backends that passed the gate, in running order.

    On CPU, AGaLiTe and the recurrence at the paper's size, and GaLiTe, also run on the eager reference
    (``[reference, eager]``, the fused CPU recurrence off) right after the default ``[reference]``."""
    presets, memories, T = list(sweep.presets), list(sweep.gtrxl_memories), sweep.seq_len
    side_by_side = _side_by_side(device, backends)
    eager = ("paper",) if side_by_side else ()
    galite_eager = side_by_side and galite_cpu_fused.build_info()["state"] == "ready"
    models = [*agalite_specs(presets, backends, eager), *galite_specs(backends, galite_eager)]
    workloads = {
        "inference": ([*models, *gtrxl_specs(memories, ["recompute", "kv_cache"]), *lstm_specs()],
                      sweep.inference_batches, 1),
        "training": ([*models, *gtrxl_specs(memories, [None]), *lstm_specs()], sweep.training_batches, T),
    }  # fmt: skip
    cases: list[Case] = []
    for workload, (specs, batches, steps) in workloads.items():
        if workload not in sweep.workloads:
            continue
        for spec in filter(lambda s: sweep.keeps(s.name), specs):
            # Sizes only (parameters, state bytes): the module is built for real when the case runs.
            info = _system_info(spec, build(spec, sweep.input_dim, torch.device("meta"), sweep.seed))
            for dtype, b in itertools.product(sweep.dtypes, batches):
                make = functools.partial(_model_fn, workload, spec, b, dtype, sweep, device)
                cases.append(Case(workload, info, dtype, b, steps, _eager(make) if spec.mode == "eager" else make))
    if "recurrence" in sweep.workloads:
        shapes = [s for s in recurrence_shapes(presets) if sweep.keeps(s.name)]
        paths = [(b, None) for b in backends]
        if side_by_side:
            paths.insert(paths.index(("reference", None)) + 1, ("reference", "eager"))
        for backward, shape, (backend, mode), dtype, b in itertools.product(
            (False, True), shapes, paths, sweep.dtypes, sweep.recurrence_batches
        ):
            if mode == "eager" and shape.name != "recurrence-paper":
                continue
            workload = "recurrence_forward_backward" if backward else "recurrence_forward"
            make = functools.partial(recurrence_step, shape, b, T, backend, device, DTYPES[dtype], backward,
                                     sweep.done_prob, sweep.seed)  # fmt: skip
            info = _shape_info(shape, backend, mode)
            cases.append(Case(workload, info, dtype, b, T, _eager(make) if mode == "eager" else make))
    return cases


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _empty_record(case: Case) -> dict[str, Any]:
    return dict(
        workload=case.workload, system=case.system["name"], label=case.system["label"],
        family=case.system["family"], mode=case.system["mode"], backend=case.system["backend"],
        dtype=case.dtype, batch=case.batch, seq_len=case.seq_len, unit=case.unit, status="ok", error=None,
        median_s=None, p20_s=None, p80_s=None, reps=None, throughput=None, throughput_p20=None,
        throughput_p80=None, peak_bytes=None, state_bytes_per_env=case.system["state_bytes_per_env"],
        ratio=None, ratio_to=None,
    )  # fmt: skip


def _fill(record: dict[str, Any], timing: Timing) -> None:
    samples = record["batch"] * record["seq_len"]
    record.update(
        median_s=timing.median_s, p20_s=timing.p20_s, p80_s=timing.p80_s, reps=timing.reps,
        throughput=samples / timing.median_s,
        # The 20th percentile of throughput comes from the 80th percentile of time, and vice versa.
        throughput_p20=samples / timing.p80_s, throughput_p80=samples / timing.p20_s,
    )  # fmt: skip


def _measure_all(cases: list[Case], device: torch.device, sweep: Sweep, progress: bool) -> list[dict[str, Any]]:
    """Every case, ``sweep.rounds`` times over (pooling the samples of each); peak memory in the last round.

    One round uses :func:`measure` (do_bench on CUDA). A case that fails (out of memory, an error) is
    recorded as such and not retried; the sweep goes on.
    """
    records = [_empty_record(c) for c in cases]
    pooled: list[list[float]] = [[] for _ in cases]
    rounds, budget = sweep.rounds, sweep.budget_s / sweep.rounds
    with _progress(progress, len(cases) * rounds) as advance:
        for r in range(rounds):
            for case, record, times in zip(cases, records, pooled):
                advance(f"{case.workload} {case.system['label']} B={case.batch} {case.dtype} ({r + 1}/{rounds})")
                if record["status"] != "ok":
                    continue
                fn = None
                try:
                    fn = case.make()
                    if rounds == 1:
                        _fill(record, measure(fn, device, budget))
                    else:
                        times += sample(fn, device, budget, min_reps=-(-3 // rounds))
                    if r == rounds - 1:
                        record["peak_bytes"], _ = peak_bytes(fn, device)
                except Exception as exc:  # one failing case must not lose a long sweep; it is reported instead
                    record.update(status="oom" if _is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}")
                finally:
                    del fn
                    if device.type == "cuda":
                        gc.collect()
                        torch.cuda.empty_cache()
    if rounds > 1:
        for record, times in zip(records, pooled):
            if record["status"] == "ok":
                _fill(record, summarise(times))
    return records


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A callable announcing the next step: a rich progress bar, or nothing."""
    if not show:
        yield lambda description: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("benchmark", total=total)
        started = [False]

        def advance(description: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=description)

        yield advance


def _reference_label(record: dict[str, Any], best_backend: str) -> str:
    if record["workload"].startswith("recurrence"):
        return f"{record['system']} [reference]"
    return f"{REFERENCE_SYSTEM} [{best_backend}]"


def add_ratios(records: list[dict[str, Any]], best_backend: str) -> None:
    """``ratio``: throughput over that of ``ratio_to`` at the same workload, dtype and batch.

    Models are compared with AGaLiTe at the paper's size on the best gated backend; a recurrence shape
    with the reference backend at the same shape.
    """
    ok = {(r["workload"], r["label"], r["dtype"], r["batch"]): r for r in records if r["status"] == "ok"}
    for r in records:
        ref_label = _reference_label(r, best_backend)
        ref = ok.get((r["workload"], ref_label, r["dtype"], r["batch"]))
        if r["status"] == "ok" and ref is not None:
            r["ratio"], r["ratio_to"] = r["throughput"] / ref["throughput"], ref_label


def _fused_info(device: torch.device) -> dict[str, Any] | None:
    """The fused CPU recurrence in this run: how it was built or loaded, and how long a fresh build takes
    (the first-call cost of a process on a machine without the cached library); how GaLiTe's was built or
    loaded under ``galite``. None off CPU."""
    if device.type != "cpu":
        return None
    keep = ("state", "seconds", "cached", "compiler", "flags", "reason", "path")
    info, galite = cpu_fused.build_info(), galite_cpu_fused.build_info()
    out = {k: info[k] for k in keep if k in info}
    # One fresh build timed (AGaLiTe's): GaLiTe's comes from the same compiler and flags.
    out.update(enabled=cpu_fused.enabled(), fresh_build_s=cpu_fused.fresh_build_seconds())
    out["galite"] = {k: galite[k] for k in keep if k in galite}
    return out


def _fused_against_eager(model: AGaLiTe | GaLiTe) -> float:
    """Worst error of ``model`` stepped in place (the rollout path) over steps with dones, fused against eager."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 6, generator=gen)
    dones = torch.rand(3, 9, generator=gen) < 0.2
    runs = []
    for on in (True, False):
        with torch.inference_mode(), cpu_fused.forced(on):
            state, ys = model.initial_state(3), []
            for t in range(9):
                ys.append(model(x[:, t], state, dones[:, t], out=state)[0])
            runs.append([*ys, *state.memories()])
    return gate._worst(runs[0], runs[1])


def _gate_fused(device: torch.device) -> list[gate.GateResult]:
    """The default CPU path (fused) against the eager reference: the recurrence forward and backward, and
    small AGaLiTe and GaLiTe models stepped in place (the rollout path) over steps with dones."""

    def fused_recurrence(*args: Any) -> Any:
        with cpu_fused.forced(True):
            return agalite_recurrence(*args, backend="reference")

    with cpu_fused.forced(False):
        checks = [gate.gate_recurrence("reference", device, impl=fused_recurrence)]

    torch.manual_seed(7)
    model = AGaLiTe(input_dim=6, d_model=32, n_layers=2, n_heads=2, d_head=8, d_ffc=24, eta=3, r=3)
    checks.append(gate._judge("model", "reference", gate.AGALITE_TOL, functools.partial(_fused_against_eager, model)))
    if galite_cpu_fused.build_info()["state"] == "ready":
        checks.append(gate._judge("galite-model", "reference", gate.AGALITE_TOL, functools.partial(
            _fused_against_eager, GaLiTe(input_dim=6, d_model=32, n_layers=2, n_heads=2, d_head=7, d_ffc=24, nu=3)
        )))  # fmt: skip
    return [
        gate.GateResult(c.check, "reference (fused CPU)", c.passed, c.max_error, c.tolerance,
                        c.detail.replace("the reference", "the eager reference"))
        for c in checks
    ]  # fmt: skip


def run_bench(
    sweep: Sweep,
    device: torch.device,
    command: str = "python -m bench",
    note: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Gate, measure and return the result document (not yet written anywhere)."""
    started = time.perf_counter()
    load_at_start = load_average()
    if device.type == "cuda":
        # fp32 means fp32: no TF32 in matmuls or cuDNN (LSTM).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    gates: list[gate.GateResult] = []
    passing: list[str] = []
    for backend in available_backends(device):
        checks = [gate.gate_recurrence(backend, device), gate.gate_model(backend, device)]
        gates += checks
        if all(c.passed for c in checks):
            passing.append(backend)
    fused = _fused_info(device)
    if fused is not None and fused["state"] == "ready":
        checks = _gate_fused(device)
        gates += checks
        fused["gate_passed"] = all(c.passed for c in checks)
    gtrxl_gate = gate.gate_gtrxl(device)
    gates.append(gtrxl_gate)
    skipped = [
        dict(label=f"{g.check} [{g.backend}]", reason=f"failed the correctness gate: {g.detail}")
        for g in gates if not g.passed
    ]  # fmt: skip

    with contextlib.ExitStack() as stack:
        if fused is not None and not fused.get("gate_passed", True):
            # The default CPU path disagrees with the eager reference: time the eager one only.
            stack.enter_context(cpu_fused.forced(False))
        cases = plan(sweep, device, passing)
        if not gtrxl_gate.passed:
            cases = [c for c in cases if c.system["mode"] != "kv_cache"]
        records = _measure_all(cases, device, sweep, progress)
    add_ratios(records, "triton" if "triton" in passing else "reference")

    systems = {c.system["label"]: c.system for c in cases}
    device_info = describe_device(device)
    device_info["load_average"] = dict(start=load_at_start, end=load_average()) if load_at_start else None
    return dict(
        schema=SCHEMA,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        note=note,
        device=device_info,
        versions=versions(),
        config=sweep.as_dict(),
        timing_method=describe_method(device, sweep.rounds),
        memory_method=CUDA_METHOD if device.type == "cuda" else CPU_METHOD,
        backends=passing,
        cpu_fused=fused,
        gates=[g.as_dict() for g in gates],
        skipped=skipped,
        systems=list(systems.values()),
        results=records,
        elapsed_s=time.perf_counter() - started,
    )
