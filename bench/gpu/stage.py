"""What every stage shares: the session (device, plan, output, budget, results other stages need) and
``Stage.case``, which runs one case in its own try/except and records what happened.

A case that raises is recorded with its traceback and the stage goes on. If the exception left the
CUDA context unusable (an illegal address is sticky: every later CUDA call fails too), the stage is
abandoned with ``CudaContextLost`` and the session continues the remaining stages in a fresh process.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import heartbeat
from .budget import Budget, StageBudget
from .records import Recorder
from .sizes import Plan

__all__ = ["CudaContextLost", "Session", "Stage", "cuda_alive", "is_oom", "json_table", "launch_config"]


class CudaContextLost(RuntimeError):
    """The process's CUDA context is broken; nothing more can run on the GPU in this process."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
        return True
    except Exception:  # any failure here means the context is gone
        return False


def launch_config(shape_pads: tuple[int, int, int]) -> dict[str, Any] | None:
    """The launch configuration every kernel would use now at these padded sizes (None without Triton)."""
    try:
        from dataclasses import asdict

        from agalite_triton.kernels import config
    except ImportError:
        return None
    cls = config.size_class(*shape_pads)
    return dict(size_class=cls, **{k: asdict(config.get_config(k, *shape_pads)) for k in config.KERNELS})


@contextlib.contextmanager
def json_table(table: dict | None) -> Iterator[None]:
    """Launch with a table given as ``table_to_json`` writes it (None: the active table) inside the block."""
    if table is None:
        yield
        return
    from agalite_triton.kernels import config

    with config.use_table(config.table_from_json(table)):
        yield


@dataclass
class Session:
    device: torch.device
    plan: Plan
    recorder: Recorder
    budget: Budget
    out_dir: Path
    dry_run: bool
    started: float
    ceilings: dict[str, float] = field(default_factory=dict)  # copy_bytes_per_s, matmul_*_flops
    tuned_table: dict[str, Any] | None = None  # table_to_json of the sweep's best, when it found one
    precompiler: Any = None  # precompile.Precompiler, when running
    pytest_job: Any = None  # pytest_stage.PytestJob, when running
    notes: dict[str, Any] = field(default_factory=dict)
    # Called by a stage before its first timing: pauses the GPU tests, ends the compile pool (or not).
    before_timing: Callable[..., None] = field(default=lambda shutdown_pool=True: None)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Stage:
    def __init__(self, session: Session, name: str, budget: StageBudget) -> None:
        self.session = session
        self.name = name
        self.budget = budget
        self.started = time.monotonic()

    @property
    def rec(self) -> Recorder:
        return self.session.recorder

    def full_id(self, case: str) -> str:
        return f"{self.name}/{case}"

    def skip(self, case: str, reason: str, **fields: Any) -> None:
        cid = self.full_id(case)
        if not self.rec.done(cid):
            self.rec.skip(self.name, cid, reason, **fields)

    def case(self, case: str, estimate_s: float, fn: Callable[[], dict[str, Any] | None], limit_s: float = 120.0,
             **fields: Any) -> dict | None:  # fmt: skip
        """Run ``fn`` (which returns the record's fields, ``status`` among them if not ``ok``) unless the
        case is already recorded or its estimate does not fit the stage's budget; record the outcome.
        ``limit_s``: past this the supervisor takes the case for hung (a first compile takes seconds;
        a hung kernel never returns)."""
        cid = self.full_id(case)
        if self.rec.done(cid):
            return None
        if not self.budget.fits(estimate_s):
            self.rec.skip(self.name, cid, f"budget: needs about {estimate_s:.1f} s, "
                          f"{max(0.0, self.budget.remaining()):.1f} s left in the stage", **fields)  # fmt: skip
            return None
        begin = time.monotonic()
        heartbeat.beat(cid, limit_s)
        try:
            result = dict(fn() or {})
        except Exception as exc:  # one failing case must not end the session; it is recorded instead
            wall = round(time.monotonic() - begin, 3)
            self.rec.failure(self.name, cid, exc, status="oom" if is_oom(exc) else "error", wall_s=wall, **fields)
            print(f"  [{self.name}] {case}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            self._recover()
            return None
        status = result.pop("status", "ok")
        merged = {**fields, **result, "wall_s": round(time.monotonic() - begin, 3)}  # what the case found wins
        record = self.rec.write(self.name, cid, status, **merged)
        if status not in ("ok", "skipped"):
            print(f"  [{self.name}] {case}: {status} {str(result.get('detail', ''))[:300]}", flush=True)
        return record

    def _recover(self) -> None:
        gc.collect()
        if self.session.device.type != "cuda":
            return
        if not cuda_alive(self.session.device):
            raise CudaContextLost(f"the CUDA context is unusable after a failure in stage {self.name}")
        torch.cuda.empty_cache()
