"""The tuned launch table from a session's sweep records.

    python -m bench.gpu.tune DIR/gpu.jsonl [--out table.json]

prints (or writes) the table as ``agalite_triton.kernels.config.table_from_json`` reads it, and a
report of each choice on stderr. Per kernel and size class, among the configurations that passed the
reference check and were timed at the most sweep shapes, the one with the smallest geometric mean of
(time / best time at that shape) is chosen; a tie keeps the default. The backward's choice brings
its CHUNK, which the forward's entry carries (the forward decides the checkpoint interval); classes
the sweep did not reach keep their defaults. To make it the default, copy the values into
``DEFAULT_TABLE`` in ``agalite_triton/kernels/config.py`` (or pass the file to ``python -m bench.gpu
--table``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .records import read_records

__all__ = ["choose", "main", "tuned_table"]

_KEYS = {"forward": ("num_warps", "num_stages"), "backward": ("num_warps", "num_stages", "split", "chunk"),
         "step": ("num_warps",), "galite_forward": ("num_warps", "num_stages", "rows"),
         "galite_backward": ("num_warps", "rows", "chunk"), "galite_step": ("num_warps", "rows")}  # fmt: skip


def _key(kernel: str, candidate: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(candidate[k]) for k in _KEYS[kernel])


def choose(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One choice per (kernel, size class) swept."""
    timed: dict[tuple[str, str], dict[tuple[int, ...], dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    examples: dict[tuple[str, str, tuple[int, ...]], dict[str, Any]] = {}
    defaults: dict[tuple[str, str], tuple[int, ...]] = {}
    for r in records:
        if r.get("stage") != "sweep" or r.get("status") != "ok" or not isinstance(r.get("median_s"), (int, float)):
            continue
        kernel, cls, cand = r["sweep_kernel"], r["size_class"], r["candidate"]
        key = _key(kernel, cand)
        group = timed[(kernel, cls)]
        # Several records of one configuration at one shape (a re-run): keep the fastest median.
        previous = group[key].get(r["shape_id"])
        group[key][r["shape_id"]] = min(previous, r["median_s"]) if previous else r["median_s"]
        examples[(kernel, cls, key)] = cand
        if r.get("is_default"):
            defaults[(kernel, cls)] = key
    choices = []
    for (kernel, cls), group in sorted(timed.items()):
        best_at = defaultdict(lambda: math.inf)
        for per_shape in group.values():
            for shape, t in per_shape.items():
                best_at[shape] = min(best_at[shape], t)
        coverage = max(len(v) for v in group.values())

        def score(key: tuple[int, ...], group=group, best_at=best_at) -> float:
            ratios = [t / best_at[s] for s, t in group[key].items()]
            return math.exp(sum(map(math.log, ratios)) / len(ratios))

        eligible = [k for k, v in group.items() if len(v) == coverage]
        default_key = defaults.get((kernel, cls))
        chosen = min(eligible, key=lambda k: (round(score(k), 6), k != default_key))
        speedup = None
        if default_key in group:
            common = set(group[default_key]) & set(group[chosen])
            speedup = {s: group[default_key][s] / group[chosen][s] for s in sorted(common)}
        choices.append(dict(kernel=kernel, size_class=cls, chosen=examples[(kernel, cls, chosen)],
                            score=score(chosen), default=examples.get((kernel, cls, default_key)),
                            speedup_vs_default=speedup, configs=len(group), shapes=sorted(best_at),
                            best_median_s={s: group[chosen][s] for s in sorted(group[chosen])}))  # fmt: skip
    return choices


def tuned_table(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(table_to_json of the default table with every swept entry replaced, the choices)."""
    from agalite_triton.kernels import config

    table = {k: {c: asdict(cfg) for c, cfg in row.items()} for k, row in config.DEFAULT_TABLE.items()}
    choices = choose(records)
    chunks = {}
    for ch in choices:
        entry = dict(table[ch["kernel"]][ch["size_class"]])
        entry.update({k: int(ch["chosen"][k]) for k in _KEYS[ch["kernel"]]})
        table[ch["kernel"]][ch["size_class"]] = entry
        if ch["kernel"].endswith("backward"):
            chunks[ch["kernel"].replace("backward", "forward"), ch["size_class"]] = entry["chunk"]
    for (forward, cls), chunk in chunks.items():  # the forward's entry decides the checkpoint interval
        table[forward][cls] = dict(table[forward][cls], chunk=chunk)
    config.table_from_json(table)  # validates: what is printed is accepted
    return table, choices


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("records", type=Path, help="a session's gpu.jsonl")
    p.add_argument("--out", type=Path, help="write the table JSON here instead of printing it")
    args = p.parse_args(argv)
    records = read_records(args.records)
    table, choices = tuned_table(records)
    if not choices:
        print(f"no timed sweep records in {args.records}: the table is the default", file=sys.stderr)
    for ch in choices:
        sp = ch["speedup_vs_default"]
        sp_text = ", ".join(f"{s} {v:.2f}x" for s, v in sp.items()) if sp else "default not timed"
        chosen = {k: ch["chosen"][k] for k in _KEYS[ch["kernel"]]}
        print(f"{ch['kernel']:15s} {ch['size_class']:9s} {ch['configs']:3d} configs -> {chosen} vs default: {sp_text}",
              file=sys.stderr)  # fmt: skip
    text = json.dumps(table, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return dict(table=table, choices=choices)


if __name__ == "__main__":
    main()
