"""The process ``python -m bench.gpu`` starts first: it runs the session in a child process, watches
it, and writes the summary at the end. It never touches CUDA (nor imports torch), so it survives what
the session may not:

* a lost CUDA context (an illegal address is sticky): the child records it and exits with code 75;
* a hang (a kernel that never returns): the child's heartbeat (``heartbeat.py``) goes stale past the
  case's limit, the supervisor ends the child, records the case as ``timeout``;
* a crash (a segfault in a driver or compiler): the child dies, the supervisor records the case it
  was on as ``error``.

Each time, a new child continues the stages not yet complete, appending to the same ``gpu.jsonl``
and skipping every case already in it, the culprit included; the budget left carries over. When the
session is done (or the budget is spent), the supervisor writes ``summary.json``, the PNGs and the
table from the file alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import heartbeat
from .proctree import end_tree
from .records import Recorder, read_records

__all__ = ["CONTEXT_LOST", "run"]

CONTEXT_LOST = 75  # the child's exit code after a lost CUDA context (EX_TEMPFAIL)
MAX_CHILDREN = 5
ROOT = Path(__file__).resolve().parents[2]


def _recorder(path: Path, started: float) -> Recorder:
    """A recorder whose context (dry_run, device, versions) is that of the records already written."""
    last = read_records(path)
    ctx: dict[str, Any] = {}
    if last:
        ctx = {k: last[-1][k] for k in ("dry_run", "device", "versions") if k in last[-1]}
    return Recorder(path, ctx, started, append=True)


def remaining_stages(path: Path, selected: list[str]) -> list[str]:
    records = read_records(path)
    complete = {r.get("stage_name") for r in records if r.get("stage") == "session" and r.get("complete")}
    if any(r.get("case") == "pytest/gpu_tests" for r in records):
        complete.add("pytest")
    return [s for s in selected if s not in complete]


def _pytest_pid(hb: Path) -> int | None:
    try:
        return int(Path(f"{hb}.pytest").read_text().strip())
    except (OSError, ValueError):
        return None


def _forward_termination(proc: subprocess.Popen, out: Path) -> None:
    """A SIGTERM / SIGINT / SIGHUP to this process (a time limit) ends the session's tree, then leaves
    a summary of what the file holds (no plots: there may be no time) before this one exits."""

    def handler(signum: int, frame: Any) -> None:
        end_tree(proc.pid, grace_s=1.0)
        try:
            from . import summary

            summary.write_summary(out, dict(ended_by_signal=signum))
        except Exception:  # nothing more can be done in a dying process
            pass
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def _watch(proc: subprocess.Popen, hb: Path, hard_deadline: float) -> tuple[int | None, str | None, dict | None]:
    """(exit code or None if ended by us, why we ended it, the last heartbeat)."""
    while True:
        code = proc.poll()
        beat = heartbeat.read(hb)
        if code is not None:
            return code, None, beat
        if beat and time.time() - beat["since"] > beat["limit_s"]:
            why = f"no progress for {time.time() - beat['since']:.0f} s (limit {beat['limit_s']:.0f} s)"
        elif time.monotonic() > hard_deadline:
            why = "the session's budget is spent"
        else:
            time.sleep(0.5)
            continue
        end_tree(proc.pid)
        proc.wait()
        return None, why, beat


def run(args: Any, started: float) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu.jsonl"
    if not args.append and path.exists():
        path.unlink()
    tmp = Path(tempfile.mkdtemp(prefix="agalite-gpu-"))
    hb = tmp / "heartbeat.json"
    from .stage_list import selected_stages  # no torch: the list and its filtering only

    selected = selected_stages(args)
    deadline = started + args.budget_s
    code: int | None = 0
    for attempt in range(MAX_CHILDREN):
        stages = remaining_stages(path, selected) if attempt else selected
        left = deadline - time.monotonic()
        if not stages or (attempt and left < 20):
            break
        cmd = [sys.executable, "-m", "bench.gpu", "--supervised", "--no-summary", "--out", str(out),
               "--budget-s", f"{left:.0f}", "--only", ",".join(stages)]  # fmt: skip
        if attempt or args.append:
            cmd += ["--append", "--resumed"] if attempt else ["--append"]
        for flag, value in (("--table", args.table), ("--workers", args.workers)):
            if value:
                cmd += [flag, str(value)]
        if args.dry_run:
            cmd.append("--dry-run")
        if args.simulate_context_loss and attempt == 0:
            cmd += ["--simulate-context-loss", args.simulate_context_loss]
        env = dict(os.environ, **{heartbeat.ENV: str(hb)})
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        hb.unlink(missing_ok=True)
        # Same process session as this one: whatever ends the command ends the session's processes too.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        _forward_termination(proc, out)
        code, why, beat = _watch(proc, hb, deadline + 60)
        if code in (0, 2):  # done, or no CUDA (the child said why)
            break
        pytest_pid = _pytest_pid(hb)
        if pytest_pid:  # its result died with the child; a new child runs it again
            end_tree(pytest_pid)
        rec = _recorder(path, started)
        culprit = (beat or {}).get("case") or f"session/unknown/{attempt}"
        if code == CONTEXT_LOST:
            reason = "the session lost its CUDA context (recorded by it)"
        else:
            reason = why or f"the session process died with exit code {code}"
            if not rec.done(culprit):
                rec.write(culprit.split("/", 1)[0], culprit, "timeout" if why else "error", error=reason,
                          detected_by="supervisor")  # fmt: skip
        rec.write("session", f"session/continued/{attempt + 1}", "ok", reason=reason, last_case=culprit,
                  remaining=remaining_stages(path, selected))  # fmt: skip
        print(f"bench.gpu: {reason}, during {culprit}; continuing in a new process", flush=True)
        if why == "the session's budget is spent":
            break
    shutil.rmtree(tmp, ignore_errors=True)
    if args.no_summary:
        return 0 if code in (0, None, CONTEXT_LOST) else code
    from . import summary

    def plot_failed(exc: Exception) -> None:
        _recorder(path, started).failure("session", "session/plots", exc)

    summary.finish(out, started, args.budget_s, plot_failed)
    return 0 if code in (0, None, CONTEXT_LOST) else code
