"""``python -m bench.gpu --out DIR [--budget-s 480] [--dry-run]``: the prepared GPU session.

The command runs a supervisor (``supervisor.py``) that runs the session in a child process and writes
the summary. TRITON_INTERPRET decides, when a kernel is defined, whether it runs compiled or interpreted, so it is
set (dry run) or removed (real run) here, before anything imports Triton.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .stage_list import STAGES as _STAGES

STARTED = time.monotonic()


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(names) - set(_STAGES))
    if unknown:
        raise argparse.ArgumentTypeError(f"expected stages from {list(_STAGES)}, got {unknown}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="folder for gpu.jsonl, summary.json, pytest.log and the PNGs")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole session (480)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--only", type=_names, help=f"comma-separated stages from {','.join(_STAGES)}")
    p.add_argument("--skip", type=_names, help="comma-separated stages to leave out")
    p.add_argument("--table", help="a launch table JSON (python -m bench.gpu.tune's output) to run with")
    p.add_argument("--workers", type=int, help="compile-pool processes (default 12 on a GPU, 2 in a dry run)")
    p.add_argument("--append", action="store_true", help="append to DIR/gpu.jsonl, skipping cases it holds")
    p.add_argument("--no-summary", action="store_true", help="write no summary.json / PNGs / table")
    p.add_argument("--no-pytest", action="store_true", help="do not run the GPU tests")
    p.add_argument("--no-supervisor", action="store_true",
                   help="run the session in this process (no watchdog, no continuation after a crash or hang)")
    p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)  # the supervisor's child
    p.add_argument("--resumed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--simulate-context-loss", help=argparse.SUPPRESS)  # tests the continuation path
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"--workers: expected a positive int, got {args.workers}")
    if args.budget_s <= 0:
        raise SystemExit(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    if not (args.supervised or args.no_supervisor):
        from .supervisor import run as supervise  # holds no CUDA context: survives the session's crashes

        return supervise(args, STARTED)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        # The oracle on CPU tensors would take the fused C++ path (built at first use); on the GPU the
        # reference is the eager one, so the dry run runs that one too.
        os.environ.setdefault("AGALITE_CPU_FUSED", "0")
    elif os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench.gpu: TRITON_INTERPRET was set; removed for the real run (use --dry-run for CPU)", file=sys.stderr)
    if "triton" in sys.modules and not args.dry_run:
        print("bench.gpu: warning: triton was imported before TRITON_INTERPRET could be set", file=sys.stderr)
    from . import heartbeat

    heartbeat.beat("session/init", 240.0)  # imports and CUDA start-up, before the first case
    from .session import run

    return run(args, STARTED)


if __name__ == "__main__":
    sys.exit(main())
