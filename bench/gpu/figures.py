"""Stage ``figures``: the numbers issue 11's targets are judged on, side by side in one process.

* ``recurrence``: ``agalite_recurrence`` forward (no grad) and forward + backward at B = 1024,
  T = 128 for the paper, standard and craftax sizes, float32 and bf16: the reference backend, the
  kernels with the default launch table and, when the sweep found a better one, with the tuned table.
  Time, peak memory, and the bandwidth achieved on the floor's bytes (``floors.py``) against the
  measured copy bandwidth.
* ``rollout``: one model step of B = 4096 environments (float32), eager and replayed from a CUDA
  graph, for AGaLiTe-paper (kernels; reference eager), GTrXL-128 (``kv_cache`` and ``recompute``)
  and the LSTMs (cuDNN). Steps per second and peak memory.
* ``training``: forward + backward over B = 256, T = 128 from a stored state, float32 and bf16
  autocast, for AGaLiTe-paper, GTrXL-128 and the LSTMs. Samples per second and peak memory.

Every kernel variant is checked against the float64 oracle (recurrence) or the reference model
(tuned models) before it is timed; the first call of each case is never timed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..systems import build
from ..workloads import inference_step, training_step
from . import cases, galite
from .floors import recurrence_bytes
from .graphs import graphed_rollout
from .sizes import Shape, System
from .stage import Session, Stage, json_table, launch_config
from .timer import peak_memory, time_call

__all__ = ["run"]

DONE_PROB = 0.01


def _variants(session: Session) -> list[tuple[str, str, dict | None]]:
    """(variant, backend, table json or None): the reference, the default kernels, the tuned ones."""
    out = [("reference", "reference", None), ("triton", "triton", None)]
    if session.tuned_table is not None:
        out.append(("triton-tuned", "triton", session.tuned_table))
    return out


_table = json_table


def _timed(session: Session, fn: Callable[[], None], work: int, rep_s: float) -> dict[str, Any]:
    if session.device.type == "cuda" or not session.dry_run:
        fn()  # untimed: compiles or loads kernels, creates handles, warms the allocator
        session.sync()
    timing = time_call(fn, session.device, rep_s)
    median, p20, p80 = timing["median_s"], timing["p20_s"], timing["p80_s"]
    peak = peak_memory(fn, session.device)
    return dict(throughput=work / median, throughput_p20=work / p80, throughput_p80=work / p20, peak_bytes=peak,
                **timing)  # fmt: skip


def _recurrence(session: Session, stage: Stage, dtypes: tuple[str, ...], shapes: tuple[Shape, ...]) -> None:
    for dtype in dtypes:
        for shape in shapes:
            _recurrence_group(session, stage, shape, dtype)
            gc.collect()


def _recurrence_group(session: Session, stage: Stage, shape: Shape, dtype: str) -> None:
    """Every mode and variant at one shape and dtype, sharing one set of inputs and references."""
    plan, device = session.plan, session.device
    B, T = plan.figure_batch, plan.figure_seq
    ceiling = session.ceilings.get("copy_bytes_per_s")
    holder: dict[str, Any] = {}

    def inputs() -> cases.Inputs:
        if "inp" not in holder:
            holder["inp"] = cases.make_inputs(shape, B, T, dtype, device, seed=31, ref_rows=plan.ref_rows)
        return holder["inp"]

    def reference(backward: bool) -> dict[str, torch.Tensor]:
        key = f"ref-{backward}"
        if key not in holder:
            holder[key] = cases.reference(inputs(), grad=backward)
        return holder[key]

    for backward in (False, True):
        mode = "forward_backward" if backward else "forward"
        for variant, backend, table in _variants(session):

            def one(backward: bool = backward, backend: str = backend, table: dict | None = table) -> dict:
                inp = inputs()
                extra: dict[str, Any] = {}
                with _table(table):
                    if backend == "triton":
                        passed, detail = cases.check(inp, reference(backward), grad=backward)
                        extra["check_max_error"] = detail["max_error"]
                        if not passed:
                            return dict(status="fail", detail=f"disagrees: {detail['failed']}", check=detail)
                    result = _timed(session, cases.recurrence_fn(inp, backend, backward), B * T, plan.figure_rep_s)
                    extra["config"] = launch_config(shape.pads)
                floor = recurrence_bytes(shape, B, T, dtype, backward)
                achieved = floor / result["median_s"]
                fraction = achieved / ceiling if ceiling else None
                return dict(bytes_floor=floor, achieved_bytes_per_s=achieved, ceiling_bytes_per_s=ceiling,
                            bandwidth_fraction=fraction, **extra, **result)  # fmt: skip

            stage.case(f"recurrence/{mode}/{shape.preset}/B{B}/T{T}/{dtype}/{variant}", 3.0, one,
                       figure="recurrence", mode=mode, variant=variant, backend=backend, system=shape.preset,
                       shape=shape.as_dict(), dtype=dtype, batch=B, seq_len=T, unit="samples/s")  # fmt: skip
    holder.clear()


def _module(session: Session, system: System, mode: str | None = None) -> torch.nn.Module:
    spec = system.spec if mode is None else replace(system.spec, mode=mode)
    return build(spec, session.plan.input_dim, session.device, seed=0)


def _model_label(system: System, mode: str | None, variant: str) -> str:
    base = (system.spec if mode is None else replace(system.spec, mode=mode)).label
    return base if variant in ("eager", "") else f"{base} ({variant})"


def _rollout(session: Session, stage: Stage) -> None:
    plan, device = session.plan, session.device
    B = plan.rollout_batch
    by_role = {s.role: s for s in plan.systems}
    order: list[tuple[str, str | None, str, dict | None]] = [
        ("agalite", None, "graph", None), ("agalite", None, "eager", None),
        ("gtrxl", "kv_cache", "eager", None), ("gtrxl", "kv_cache", "graph", None),
        ("gtrxl", "recompute", "eager", None), ("gtrxl", "recompute", "graph", None),
        ("lstm-600", None, "eager", None), ("lstm-600", None, "graph", None),
        ("lstm-128", None, "eager", None), ("lstm-128", None, "graph", None),
        ("lstm-128x2", None, "eager", None), ("lstm-128x2", None, "graph", None),
        ("agalite-reference", None, "eager", None),
    ]  # fmt: skip
    if session.tuned_table is not None:
        order[2:2] = [("agalite", None, "graph", session.tuned_table), ("agalite", None, "eager", session.tuned_table)]
    for role, mode, how, table in order:
        system = by_role[role]
        variant = how + ("-tuned" if table is not None else "")

        def one(system=system, mode=mode, how=how, table=table) -> dict[str, Any]:
            module = _module(session, system, mode)
            with _table(table):
                if how == "graph":
                    fn = graphed_rollout(module, B, plan.input_dim, device, torch.float32, DONE_PROB)
                else:
                    fn = inference_step(module, B, plan.input_dim, device, torch.float32, DONE_PROB)
                result = _timed(session, fn, B, plan.figure_rep_s)
            if how == "graph" and device.type != "cuda":
                return dict(status="skipped", reason="no CUDA: the graph's body ran eagerly (stand-in)", **result)
            return result

        stage.case(f"rollout/B{B}/{_model_label(system, mode, variant)}", 4.0, one, figure="rollout", role=role,
                   system=system.spec.name, label=_model_label(system, mode, variant), mode=mode, variant=variant,
                   backend=system.spec.backend, dtype="float32", batch=B, seq_len=1, unit="steps/s",
                   config=system.spec.config)  # fmt: skip


def _training(session: Session, stage: Stage) -> None:
    plan, device = session.plan, session.device
    B, T = plan.train_batch, plan.train_seq
    by_role = {s.role: s for s in plan.systems}
    for dtype in ("float32", "bfloat16"):
        # (role, launch table, done probability, variant). ResetLSTM splits a segment at every step where
        # some environment is done (at B = 256 nearly every step): "no-dones" is its one-cuDNN-call bound.
        order: list[tuple[str, dict | None, float, str]] = [
            ("agalite", None, DONE_PROB, ""), ("gtrxl", None, DONE_PROB, ""), ("lstm-600", None, DONE_PROB, ""),
            ("lstm-600", None, 0.0, "no-dones"), ("lstm-128", None, DONE_PROB, ""), ("lstm-128x2", None, DONE_PROB, ""),
        ]  # fmt: skip
        if session.tuned_table is not None:
            order.insert(1, ("agalite", session.tuned_table, DONE_PROB, "tuned"))
        if dtype == "float32":
            order.append(("agalite-reference", None, DONE_PROB, ""))
        for role, table, done_prob, variant in order:
            system = by_role[role]

            def one(system=system, table=table, dtype=dtype, done_prob=done_prob) -> dict[str, Any]:
                extra: dict[str, Any] = {}
                if table is not None:
                    from .correctness import _model_training

                    with _table(table):
                        check = _model_training(session, min(B, 8), T, dtype)
                    extra["check"] = {k: check[k] for k in ("status", "max_error", "max_grad_rel", "min_grad_cosine")}
                    if check["status"] != "ok":
                        return dict(status="fail", detail="the tuned table's model disagrees with the reference",
                                    **extra)  # fmt: skip
                module = _module(session, system)
                with _table(table):
                    fn = training_step(module, B, T, plan.input_dim, device, cases.DTYPES[dtype], done_prob)
                    return dict(**extra, **_timed(session, fn, B * T, plan.figure_rep_s))

            label = _model_label(system, None, variant)
            stage.case(f"training/B{B}/T{T}/{dtype}/{label}", 4.0, one, figure="training", role=role,
                       system=system.spec.name, label=label, variant=variant or "default", backend=system.spec.backend,
                       dtype=dtype, batch=B, seq_len=T, done_prob=done_prob, unit="samples/s",
                       config=system.spec.config)  # fmt: skip


def run(session: Session, stage: Stage) -> None:
    session.before_timing()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not session.ceilings.get("copy_bytes_per_s"):
        stage.skip("ceilings", "no copy bandwidth measured: bandwidth fractions are left empty")
    plan = session.plan
    # The targets first (float32 recurrence at the paper and standard sizes, rollout, training), then
    # the rest of the recurrence grid.
    first = tuple(s for s in plan.figure_shapes if s.preset in ("paper", "standard"))
    _recurrence(session, stage, plan.figure_dtypes[:1], first)
    _rollout(session, stage)
    _training(session, stage)
    _recurrence(session, stage, plan.figure_dtypes, plan.figure_shapes)
    galite.figures(session, stage)
