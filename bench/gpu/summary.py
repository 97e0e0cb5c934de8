"""``summary.json`` and the printed table: per stage what ran, issue 11's targets as measured, what
failed, and the tuned launch table.

Everything here is computed from ``gpu.jsonl`` alone, so it can be rebuilt from a file that came back
from a run cut off by its time limit: ``python -m bench.gpu.summary DIR``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .records import STATUSES, read_records

__all__ = ["build_summary", "ceilings", "finish", "main", "print_summary", "targets", "write_summary"]


def _ok(records: list[dict], **match: Any) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _fastest(rs: list[dict]) -> dict | None:
    rs = [r for r in rs if isinstance(r.get("throughput"), (int, float))]
    return max(rs, key=lambda r: r["throughput"]) if rs else None


def _target(name: str, value: float | None, threshold: float, op: str, detail: str) -> dict[str, Any]:
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return dict(target=name, value=value, threshold=threshold, op=op, met=met, detail=detail)


def _ratio(a: dict | None, b: dict | None, field: str = "throughput") -> float | None:
    if a is None or b is None or not a.get(field) or not b.get(field):
        return None
    return a[field] / b[field]


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """Issue 11's targets, from the figures (the best kernel variant: default or tuned table)."""
    out = []
    rec = [r for r in records if r.get("stage") == "figures"]
    kernel_variants = ("triton", "triton-tuned")
    for preset in ("paper", "standard"):
        for dtype in ("float32", "bfloat16"):
            fwd = _fastest([r for r in _ok(rec, figure="recurrence", mode="forward", system=preset, dtype=dtype)
                            if r.get("variant") in kernel_variants])  # fmt: skip
            where = f"{fwd['variant']}: {fwd['median_s'] * 1e3:.3f} ms" if fwd else "not measured"
            out.append(_target(f"recurrence forward {preset} {dtype}: fraction of the bandwidth floor",
                               fwd and fwd.get("bandwidth_fraction"), 0.5, ">=", where))  # fmt: skip
            both = _ok(rec, figure="recurrence", mode="forward_backward", system=preset, dtype=dtype)
            ker = _fastest([r for r in both if r.get("variant") in kernel_variants])
            ref = _fastest([r for r in both if r.get("variant") == "reference"])
            out.append(_target(f"recurrence forward+backward {preset} {dtype}: speed vs reference", _ratio(ker, ref),
                               20.0, ">=", f"{ker and ker['variant']}"))  # fmt: skip
            mem = _ratio(ref, ker, "peak_bytes")
            out.append(_target(f"recurrence forward+backward {preset} {dtype}: peak memory, reference / kernel", mem,
                               5.0, ">=", ""))  # fmt: skip
    roll = _ok(rec, figure="rollout")
    aga = _fastest([r for r in roll if r.get("role") == "agalite" and str(r.get("variant", "")).startswith("graph")])
    for label, pick, threshold in (
        ("GTrXL-128 kv_cache (eager)", lambda r: r.get("role") == "gtrxl" and r.get("mode") == "kv_cache"
         and r.get("variant") == "eager", 2.0),
        ("GTrXL-128 kv_cache (faster of eager and graph)", lambda r: r.get("role") == "gtrxl"
         and r.get("mode") == "kv_cache", 2.0),
        ("GTrXL-128 recompute (eager)", lambda r: r.get("role") == "gtrxl" and r.get("mode") == "recompute"
         and r.get("variant") == "eager", 5.0),
        ("LSTM-600 (faster of eager and graph)", lambda r: r.get("role") == "lstm-600", 1.0),
    ):  # fmt: skip
        base = _fastest([r for r in roll if pick(r)])
        out.append(_target(f"rollout B=4096, AGaLiTe graph vs {label}", _ratio(aga, base), threshold, ">=",
                           f"{aga and aga['label']} vs {base and base['label']}"))  # fmt: skip
    train = _ok(rec, figure="training")
    for dtype in ("float32", "bfloat16"):
        a = _fastest([r for r in train if r.get("role") == "agalite" and r.get("dtype") == dtype])
        g = _fastest([r for r in train if r.get("role") == "gtrxl" and r.get("dtype") == dtype])
        lstm = _fastest([r for r in train if r.get("role") == "lstm-600" and r.get("dtype") == dtype
                         and r.get("variant") == "default"])  # with dones, as the others run  # fmt: skip
        out.append(_target(f"training {dtype}: samples/s vs GTrXL-128", _ratio(a, g), 1.5, ">=", ""))
        out.append(_target(f"training {dtype}: peak memory vs GTrXL-128", _ratio(a, g, "peak_bytes"), 0.5, "<=", ""))
        out.append(_target(f"training {dtype}: samples/s vs LSTM-600", _ratio(a, lstm), 1.0, ">=", ""))
    a32 = _fastest([r for r in train if r.get("role") == "agalite" and r.get("dtype") == "float32"])
    a16 = _fastest([r for r in train if r.get("role") == "agalite" and r.get("dtype") == "bfloat16"])
    out.append(_target("training: bf16 autocast vs float32 samples/s", _ratio(a16, a32), 1.5, ">=", ""))
    corr = [r for r in records if r.get("stage") == "correctness" and r.get("status") != "skipped"]
    bad = [r for r in corr if r.get("status") != "ok"]
    out.append(_target("correctness: cases that disagree or fail", float(len(bad)) if corr else None, 0.0, "<=",
                       f"{len(corr)} cases run"))  # fmt: skip
    bitwise = [r for r in corr if "/bitwise/" in r.get("case", "")]
    out.append(_target("bitwise re-runs that differ", float(sum(r["status"] != "ok" for r in bitwise))
                       if bitwise else None, 0.0, "<=", f"{len(bitwise)} compared"))  # fmt: skip
    tests = [r for r in records if r.get("stage") == "pytest"]
    failed = None
    if tests and isinstance(tests[-1].get("tests"), int):
        failed = float(tests[-1].get("failures", 0) + tests[-1].get("errors", 0))
    counted = f"{tests[-1].get('passed')} passed, {tests[-1].get('skipped')} skipped" if tests else ""
    out.append(_target("GPU tests failing", failed, 0.0, "<=", counted))
    return out


def ceilings(records: list[dict]) -> dict[str, float | None]:
    """The environment stage's measured ceilings (None where not measured)."""
    env = {r["case"].split("/", 1)[1]: r for r in records if r.get("stage") == "environment" and r["status"] == "ok"}
    return dict(
        copy_bytes_per_s=env.get("copy_bandwidth", {}).get("bytes_per_s"),
        matmul_bfloat16_flops_per_s=env.get("matmul_bfloat16", {}).get("flops_per_s"),
        matmul_float32_flops_per_s=env.get("matmul_float32", {}).get("flops_per_s"),
        launch_overhead_s=env.get("launch_overhead", {}).get("per_launch_s"),
    )  # fmt: skip


def build_summary(records: list[dict], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    stages: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        stages[r.get("stage", "?")][r.get("status", "?")] += 1
    problems = [dict(case=r["case"], status=r["status"], error=r.get("error") or r.get("detail"))
                for r in records if r.get("status") in ("fail", "error", "oom", "timeout")]  # fmt: skip
    measured = ceilings(records)
    tuned = [r for r in records if r.get("case") == "sweep/tuned_table" and r["status"] == "ok"]
    stage_walls: dict[str, float] = defaultdict(float)
    for r in records:
        if r.get("stage") == "session" and r.get("stage_name") and isinstance(r.get("wall_s"), (int, float)):
            stage_walls[r["stage_name"]] += r["wall_s"]
    pytest_runs = [r for r in records if r.get("stage") == "pytest" and isinstance(r.get("run_s"), (int, float))]
    if pytest_runs:
        stage_walls["pytest"] = pytest_runs[-1]["run_s"]
    first = records[0] if records else {}
    return dict(
        schema="agalite-bench-gpu-summary/1", dry_run=first.get("dry_run"), device=first.get("device"),
        versions=first.get("versions"), records=len(records),
        stages={s: dict(c) for s, c in stages.items()}, stage_wall_s=dict(stage_walls), ceilings=measured,
        targets=targets(records), problems=problems[:80], problem_count=len(problems),
        tuned_table=tuned[-1].get("table") if tuned else None,
        tuned_choices=tuned[-1].get("choices") if tuned else None,
        **(extra or {}),
    )  # fmt: skip


def write_summary(out_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = build_summary(read_records(out_dir / "gpu.jsonl"), extra)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def finish(out_dir: Path, started: float, budget_s: float, on_plot_error: Callable[[Exception], None]) -> None:
    """The end of a session: the plots, summary.json and the printed summary (``started``: monotonic)."""
    from . import plots

    path = out_dir / "gpu.jsonl"
    written: list[str] = []
    try:
        written = plots.plot_all(read_records(path), out_dir)
    except Exception as exc:  # the numbers matter more than the pictures
        on_plot_error(exc)
    doc = write_summary(out_dir, dict(elapsed_s=round(time.monotonic() - started, 1), plots=written,
                                      budget_s=budget_s))  # fmt: skip
    print_summary(doc)
    print(f"bench.gpu: wrote {path} ({doc['records']} records), summary.json, {written} "
          f"in {time.monotonic() - started:.0f} s", flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def print_summary(summary: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(json.dumps({k: summary[k] for k in ("stages", "targets", "problem_count")}, indent=1))
        return
    console = Console(width=140)
    t = Table(title=f"bench.gpu: {summary.get('records')} records{' (dry run)' if summary.get('dry_run') else ''}")
    t.add_column("stage")
    for s in STATUSES:
        t.add_column(s, justify="right")
    t.add_column("wall s", justify="right")
    for stage, counts in summary["stages"].items():
        t.add_row(stage, *(str(counts.get(s, "")) for s in STATUSES), _fmt(summary["stage_wall_s"].get(stage)))
    console.print(t)
    c = summary["ceilings"]
    console.print(f"ceilings: copy {_fmt(c['copy_bytes_per_s'] and c['copy_bytes_per_s'] / 1e12)} TB/s, "
                  f"bf16 mm {_fmt(c['matmul_bfloat16_flops_per_s'] and c['matmul_bfloat16_flops_per_s'] / 1e12)} "
                  f"TFLOP/s, fp32 mm {_fmt(c['matmul_float32_flops_per_s'] and c['matmul_float32_flops_per_s'] / 1e12)}"
                  f" TFLOP/s, launch {_fmt(c['launch_overhead_s'] and c['launch_overhead_s'] * 1e6)} us")  # fmt: skip
    tt = Table(title="issue 11 targets")
    for col in ("target", "value", "need", "met", "detail"):
        tt.add_column(col)
    for x in summary["targets"]:
        met = {True: "yes", False: "NO", None: "-"}[x["met"]]
        tt.add_row(x["target"], _fmt(x["value"]), f"{x['op']} {x['threshold']:g}", met, str(x["detail"])[:40])
    console.print(tt)
    if summary.get("tuned_choices"):
        for ch in summary["tuned_choices"]:
            sp = ch.get("speedup_vs_default") or {}
            console.print(f"tuned {ch['kernel']} {ch['size_class']}: {ch['chosen']} "
                          + ", ".join(f"{s} {v:.2f}x" for s, v in sp.items()))  # fmt: skip
    for p in summary["problems"][:15]:
        console.print(f"[{p['status']}] {p['case']}: {str(p['error'])[:160]}")
    if summary["problem_count"] > 15:
        console.print(f"... {summary['problem_count'] - 15} more problems in summary.json")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.gpu.summary DIR (the folder holding gpu.jsonl)")
    print_summary(write_summary(Path(args[0])))


if __name__ == "__main__":
    main()
