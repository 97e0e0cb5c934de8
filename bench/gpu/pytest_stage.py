"""Stage ``pytest``: the GPU-marked tests of the suite, in a subprocess with a time limit.

The job starts right after the environment stage and runs in the background while the stages that
time nothing run (correctness, the compile report, the sweep's parallel compiles). If it is still
running when the first timing starts, it is stopped (SIGSTOP to its process tree) until the timed stages are over, then
continued and waited for up to its limit (extended by the time it was stopped): it never competes
with a timing, and never holds the timed stages up.

Only the test files that use the ``gpu`` marker are collected (the GPU machine has no gymnasium, and
an unrelated file that cannot be imported must not cost the run), with
``--continue-on-collection-errors``. The log goes to ``pytest.log`` beside the records; the outcome of
every test is read from a JUnit XML file kept outside the output folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from . import heartbeat
from .proctree import end_tree, signal_tree
from .stage import Session, Stage

__all__ = ["PytestJob", "gpu_test_files"]

ROOT = Path(__file__).resolve().parents[2]


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files (relative to the repository root) that mark some test ``gpu``."""
    files = []
    for path in sorted((root / "tests").glob("test_*.py")):
        text = path.read_text(errors="replace")
        if "mark.gpu" in text:
            files.append(str(path.relative_to(root)))
    return files


def _junit_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return dict(junit=None)
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for tc in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = tc.find(tag)
            if node is not None:
                name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
                failed.append(dict(test=name, kind=tag, message=(node.get("message") or "")[:400]))
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return dict(**totals, failed=failed[:60])


class PytestJob:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.deadline = 0.0
        self.tmp = Path(tempfile.mkdtemp(prefix="agalite-gpu-pytest-"))
        self.junit = self.tmp / "junit.xml"
        self.log_path = session.out_dir / "pytest.log"
        self.command: list[str] = []
        self.files: list[str] = []
        self.paused_at: float | None = None
        self.paused_s = 0.0

    def start(self, limit_s: float) -> None:
        self.files = gpu_test_files()
        cmd = [sys.executable, "-m", "pytest", *self.files, "-m", "gpu", "-q", "-rA", "-o", "addopts=",
               "-p", "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={self.junit}"]  # fmt: skip
        if importlib.util.find_spec("xdist") is not None and self.session.device.type == "cuda":
            cmd += ["-n", "4"]
        env = dict(os.environ)
        if self.session.dry_run:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.command = cmd
        self.started = time.monotonic()
        self.deadline = self.started + limit_s
        log = open(self.log_path, "w")
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        # In the command's process session (see proctree.py): ending the command ends pytest too.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.ended: float | None = None
        proc = self.proc

        def watch() -> None:  # when pytest itself ended, not when the session came to look
            proc.wait()
            self.ended = time.monotonic()

        threading.Thread(target=watch, daemon=True).start()
        beat_file = os.environ.get(heartbeat.ENV)
        if beat_file:  # so that the supervisor can end it if this process dies
            Path(f"{beat_file}.pytest").write_text(str(self.proc.pid))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> bool:
        """Stop pytest (SIGSTOP to its process group) while the session times something: two processes
        sharing the GPU would corrupt every timing. Whatever it had queued on the GPU still completes."""
        if not self.running() or self.paused_at is not None:
            return False
        signal_tree(self.proc.pid, signal.SIGSTOP)
        self.paused_at = time.monotonic()
        return True

    def resume(self, latest_deadline: float) -> None:
        """Continue it; the time it spent stopped is added to its limit, up to ``latest_deadline``."""
        if self.paused_at is None or self.proc is None:
            return
        stopped = time.monotonic() - self.paused_at
        self.paused_s += stopped
        self.paused_at = None
        self.deadline = min(self.deadline + stopped, max(latest_deadline, time.monotonic()))
        signal_tree(self.proc.pid, signal.SIGCONT)

    def finish(self, stage: Stage) -> None:
        """Wait for the job (until its deadline), end it if it overran, and record the outcome."""

        def outcome() -> dict[str, Any]:
            assert self.proc is not None
            timed_out = False
            try:
                self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                self.kill()
            wall = (self.ended or time.monotonic()) - self.started - self.paused_s
            summary = _junit_summary(self.junit)
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            code = self.proc.returncode
            if timed_out:
                status = "timeout"
            elif code == 0 and summary.get("tests"):
                status = "ok"
            else:
                status = "fail"
            return dict(status=status, returncode=code, run_s=round(wall, 1), paused_s=round(self.paused_s, 1),
                        files=self.files,
                        command=" ".join(self.command), log="pytest.log", log_tail=tail, **summary)  # fmt: skip

        limit = max(0.0, self.deadline - time.monotonic()) + 60
        stage.case("gpu_tests", -float("inf"), outcome, limit_s=limit)  # always recorded, whatever the budget
        shutil.rmtree(self.tmp, ignore_errors=True)

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.paused_at = None
        end_tree(self.proc.pid)  # continues a stopped tree first
        self.proc.wait()
