"""The session: the stages in order, each in its own try/except, within one wall-clock budget.

    environment -> [pytest starts in the background, the compile pool starts]
    correctness -> compiled -> [pytest is waited for] -> sweep -> figures -> summary.json, PNGs, table

Most valuable first: whether the kernels are right, then what they compiled to, then the tuning
(which the next run's defaults come from), then the figures. Each stage gets a weighted share of the
time left when it starts; within it, a case whose estimate no longer fits is recorded as skipped.
If a failure leaves the CUDA context unusable, the remaining stages (the broken one included; cases
already in the file are skipped) run in a fresh process appending to the same file.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import compiled, correctness, environment, figures, heartbeat, sweep
from .budget import Budget
from .precompile import Precompiler, default_tasks
from .pytest_stage import PytestJob
from .records import Recorder, read_records
from .sizes import plan_for
from .stage import CudaContextLost, Session, Stage
from .stage_list import STAGES, selected_stages
from .supervisor import CONTEXT_LOST

__all__ = ["STAGES", "run"]
# Shares of the time left; pytest runs beside the others and is capped by its own limit.
WEIGHTS = {"environment": 0.03, "correctness": 0.30, "compiled": 0.02, "sweep": 0.35, "figures": 0.30}
MODULES = {"environment": environment, "correctness": correctness, "compiled": compiled, "sweep": sweep,
           "figures": figures}  # fmt: skip


def _context(device: torch.device, dry: bool) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev: dict[str, Any] = dict(type=device.type)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev.update(name=props.name, capability=f"{props.major}.{props.minor}")
    else:
        from ..environment import _cpu_name

        dev.update(name=_cpu_name())
    return dict(dry_run=dry, device=dev, versions=dict(python=sys.version.split()[0], torch=torch.__version__,
                                                       triton=triton_version, cuda=torch.version.cuda))  # fmt: skip


def _tuned_from(path: Path) -> dict[str, Any] | None:
    for r in reversed(read_records(path)):
        if r.get("case") == "sweep/tuned_table" and r.get("status") == "ok":
            return r["table"] if r.get("differs_from_default") else None
    return None


def run(args: Any, started: float) -> int:
    dry = bool(args.dry_run)
    if not dry and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device; use --dry-run to run the stages on CPU at tiny shapes", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if not dry else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out_dir = Path(args.out)
    plan = plan_for(dry, args.workers)
    recorder = Recorder(out_dir / "gpu.jsonl", _context(device, dry), started, append=args.append)
    budget = Budget(args.budget_s, started)
    session = Session(device, plan, recorder, budget, out_dir, dry, started)
    if args.append:
        from .summary import ceilings

        measured = ceilings(read_records(recorder.path))
        session.ceilings.update({k: v for k, v in measured.items() if v is not None})
        session.tuned_table = _tuned_from(recorder.path)

    table_ctx, base_table = None, None
    if args.table:  # the session's "default" table; the sweep's candidates still vary DEFAULT_TABLE's entries
        import json

        from agalite_triton.kernels import config

        base_table = json.loads(Path(args.table).read_text())
        table_ctx = config.use_table(config.table_from_json(base_table))
        table_ctx.__enter__()

    selected = selected_stages(args)
    recorder.write("session", f"session/start/{os.getpid()}", "ok", stages=selected, budget_s=args.budget_s,
                   resumed=bool(args.resumed), table=str(args.table) if args.table else None,
                   command=" ".join(["python -m bench.gpu", *map(shlex.quote, args.argv)]))  # fmt: skip
    print(f"bench.gpu: {'DRY RUN, ' if dry else ''}stages {selected}, budget {args.budget_s:.0f} s", flush=True)

    def start_background() -> None:
        if "pytest" in selected and session.pytest_job is None:
            job = PytestJob(session)
            job.start(min(plan.pytest_timeout_s, 0.5 * args.budget_s))
            session.pytest_job = job
        if session.precompiler is None and {"correctness", "sweep", "figures"} & set(selected):
            try:
                pre = Precompiler(session, plan.pool_workers)
                pre.submit(default_tasks(plan, tuple(selected), base_table))
                if "sweep" in selected:
                    pre.submit(sweep.primary_tasks(plan))
                session.precompiler = pre
            except Exception as exc:  # without the pool the main process compiles everything itself
                recorder.failure("session", "session/precompile_pool", exc)

    def finish_pytest() -> None:
        if session.pytest_job is not None:
            print("  [pytest] waiting for the GPU tests", flush=True)
            session.pytest_job.resume(latest_deadline=budget.end - budget.reserve_s)
            stage = Stage(session, "pytest", budget.stage("pytest", 0.0, 1.0))
            session.pytest_job.finish(stage)
            session.pytest_job = None

    def before_timing(shutdown_pool: bool = True) -> None:
        """Nothing else may use the GPU or the CPU heavily while a timing runs."""
        if session.pytest_job is not None and session.pytest_job.pause():
            print("  [pytest] stopped while the timed stages run; continued afterwards", flush=True)
        if shutdown_pool and session.precompiler is not None:
            session.precompiler.shutdown()
            session.precompiler = None

    session.before_timing = before_timing
    work = [s for s in selected if s != "pytest"]
    if "environment" not in work:
        start_background()
    for i, name in enumerate(work):
        # Correctness starts at once (a kernel the pool has not reached yet is compiled here, no later
        # than waiting would give it); the figures wait for what the pool still compiles for them.
        if name == "figures" and session.precompiler is not None:
            wait = min(90.0, 0.3 * budget.remaining())
            heartbeat.beat("session/wait/precompile-defaults", wait + 120)
            counts = session.precompiler.wait(("defaults",), timeout_s=wait)
            print(f"  [precompile] defaults: {counts}", flush=True)
        weights_left = sum(WEIGHTS[s] for s in work[i:])
        stage_budget = budget.stage(name, WEIGHTS[name], weights_left)
        stage = Stage(session, name, stage_budget)
        begin = time.monotonic()
        heartbeat.beat(f"session/stage-start/{name}", stage_budget.remaining() + 180)
        print(f"[{name}] {stage_budget.remaining():.0f} s allowed, {budget.remaining():.0f} s left", flush=True)
        suffix = "@resumed" if args.resumed else ""
        try:
            if args.simulate_context_loss == name:
                raise CudaContextLost(f"simulated (--simulate-context-loss {name})")
            MODULES[name].run(session, stage)
        except CudaContextLost as exc:
            # Nothing more can run on the GPU here: the supervisor continues in a new process.
            recorder.failure("session", f"session/context_lost/{name}{suffix}", exc, stage_name=name,
                             wall_s=round(time.monotonic() - begin, 2))  # fmt: skip
            if session.precompiler is not None:
                session.precompiler.shutdown()
                session.precompiler = None
            finish_pytest()  # its own process and CUDA context: its result still counts
            return CONTEXT_LOST
        except Exception as exc:  # a stage's own failure is recorded; the next stage still runs
            recorder.failure("session", f"session/stage/{name}{suffix}", exc, stage_name=name, complete=True,
                             wall_s=round(time.monotonic() - begin, 2))  # fmt: skip
            print(f"[{name}] stage failed: {type(exc).__name__}: {exc}", flush=True)
        else:
            recorder.write("session", f"session/stage/{name}{suffix}", "ok", stage_name=name, complete=True,
                           wall_s=round(time.monotonic() - begin, 2))  # fmt: skip
        if session.precompiler is not None:
            session.precompiler.collect()
        if name == "environment":
            start_background()
    finish_pytest()
    if session.precompiler is not None:
        session.precompiler.shutdown()
    if table_ctx is not None:
        table_ctx.__exit__(None, None, None)
    heartbeat.beat("session/done", 600)
    if args.no_summary:
        return 0
    from . import summary

    summary.finish(out_dir, started, args.budget_s, lambda exc: recorder.failure("session", "session/plots", exc))
    return 0
