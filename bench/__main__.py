"""``python -m bench``: AGaLiTe against GTrXL and LSTM on the device present.

Prints the tables, writes ``bench/results/<device>-<date>.json`` and ``.png``, and with ``--readme``
rewrites the README's benchmark block.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .environment import device_slug, pick_device, pin_threads
from .readme import ROOT, update_readme
from .report import print_report
from .run import run_bench
from .sweep import WORKLOADS, default_sweep

RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _without_note(argv: list[str]) -> list[str]:
    """The command line as recorded: the note is shown on its own, so it is left out of the command."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            kept.append(arg)
    return kept


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--full", action="store_true", help="the whole sweep (every GTrXL memory, every batch size)")
    p.add_argument("--only", type=_names, help=f"comma-separated workloads from {','.join(WORKLOADS)}")
    p.add_argument("--batch", type=_ints, help="comma-separated batch sizes for every selected workload")
    p.add_argument("--memory", type=_ints, help="comma-separated GTrXL memory sizes M")
    p.add_argument("--systems", type=_names, help="keep systems whose name contains one of these (comma-separated)")
    p.add_argument("--presets", type=_names, help="AGaLiTe presets / recurrence shapes (paper is the reference)")
    p.add_argument("--seq-len", type=int, help="T of the training and recurrence workloads (default 128)")
    p.add_argument("--budget", type=float, help="seconds of timed repetitions per measurement")
    p.add_argument("--rounds", type=int, help="time the sweep this many times over, pooling samples (CPU default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, normally the cores)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"directory for the JSON and PNG (default {RESULTS})")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--note", default="", help="a sentence stored in the JSON and shown in the README block")
    p.add_argument("--readme", nargs="?", type=Path, const=ROOT / "README.md",
                   help="rewrite the benchmark block of this README (default: the repository's README.md)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    pin_threads(args.threads)
    sweep = default_sweep(device, full=args.full).narrowed(
        only=args.only, batches=args.batch, memories=args.memory, systems=args.systems,
        presets=args.presets, seq_len=args.seq_len, budget_s=args.budget, rounds=args.rounds,
    )  # fmt: skip
    command = " ".join(["python -m bench", *map(shlex.quote, _without_note(sys.argv[1:] if argv is None else argv))])
    doc = run_bench(sweep, device, command=command, note=args.note, progress=not args.no_progress)

    stem = f"{device_slug(doc['device'])}-{dt.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_plot and doc["results"]:
        from .plot import plot

        doc["plot"] = plot(doc, args.out / f"{stem}.png").name
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print_report(doc)
    print(f"wrote {json_path}" + (f" and {doc['plot']}" if doc.get("plot") else ""))
    if args.readme is not None:
        update_readme(args.readme, doc, json_path)
        print(f"rewrote the benchmark block of {args.readme}")
    return doc


if __name__ == "__main__":
    main()
