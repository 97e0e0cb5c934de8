"""Rewrite the README's benchmark block (between ``<!-- bench:start -->`` and ``<!-- bench:end -->``) from a
result JSON. ``python -m bench --readme`` does it after a run; ``python -m bench.readme <json>`` from a
stored one."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .report import fused_line, markdown_tables, ratio_lines

__all__ = ["END", "START", "render_block", "update_readme"]

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
ROOT = Path(__file__).resolve().parent.parent


def _machine(doc: dict[str, Any]) -> str:
    dev, v = doc["device"], doc["versions"]
    if dev["type"] == "cpu":
        where = f"a {dev['cpu_count']}-core CPU ({dev['name']}), torch threads {dev['threads']}"
        load = dev.get("load_average")
        if load:
            where += (
                f", 1-minute load average {load['start'][0]:.2f} at the start and {load['end'][0]:.2f} "
                "at the end (other jobs running on the machine slow every figure)"
            )
    else:
        where = f"{dev['name']} (CUDA {v['cuda']}; host {dev['cpu_count']} CPUs)"
    return (f"{where}; torch {v['torch']}, triton {v['triton']}, Python {v['python']}; "
            f"{doc['created'][:10]}, sweep `{doc['config']['mode']}`")  # fmt: skip


def render_block(doc: dict[str, Any], json_path: Path, readme_path: Path) -> str:
    """The markdown between the markers (markers included)."""
    base = readme_path.resolve().parent
    rel_json = Path(os.path.relpath(json_path.resolve(), base)).as_posix()
    lines = [
        START,
        "## Benchmark: AGaLiTe vs GTrXL and LSTM",
        "",
        'Reproduce (after `pip install -e ".[bench]"`): `python -m bench` runs the quick sweep below on the device',
        "present and writes `bench/results/<device>-<date>.{json,png}`; `python -m bench --full` runs every size;",
        "`python -m bench --readme` also rewrites this block. Field meanings: `bench/results/README.md`.",
        "",
        f"Measured: `{doc['command']}` on {_machine(doc)}.",
    ]
    if doc.get("note"):
        lines.append(f"Note: {doc['note']}")
    lines += [
        "",
        f"Timing: {doc['timing_method']}. Peak memory: {doc['memory_method']}, above what was live before.",
        "AGaLiTe backends timed: " + (", ".join(doc["backends"]) or "none") + " (each gated against the reference "
        "before timing). GTrXL is matched to the paper's AGaLiTe size (4 layers, d=128, 4x64 heads, FFN 128); "
        "`recompute` recomputes the memory's keys and values every step (the paper's baseline), `kv_cache` keeps "
        "them in a ring buffer; training runs the whole segment either way.",
    ]
    if fused_line(doc):
        lines.append(fused_line(doc))
    lines.append("")
    lines += [f"- {line}" for line in ratio_lines(doc)]
    lines += ["", markdown_tables(doc)]
    if doc.get("plot"):
        rel_png = Path(os.path.relpath((json_path.parent / doc["plot"]).resolve(), base)).as_posix()
        lines.append(f"![throughput against batch size]({rel_png})")
        lines.append("")
    lines += [f"Raw numbers: [{rel_json}]({rel_json}).", END]
    return "\n".join(lines)


def update_readme(readme_path: Path, doc: dict[str, Any], json_path: Path) -> None:
    """Replace the marker block of ``readme_path``; everything outside it is left byte for byte."""
    text = readme_path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"readme_path: {readme_path} has no '{START}' ... '{END}' block")
    readme_path.write_text(text[:start] + render_block(doc, json_path, readme_path) + text[end + len(END) :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__)
    parser.add_argument("json", type=Path, help="a result file written by python -m bench")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README to rewrite")
    args = parser.parse_args(argv)
    update_readme(args.readme, json.loads(args.json.read_text()), args.json)


if __name__ == "__main__":
    main()
