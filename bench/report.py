"""Turn a result document into tables (rich for the terminal, markdown for the README) and the ratio
sentences the README states."""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_bytes", "fmt_rate", "fused_line", "markdown_tables", "print_report", "ratio_lines", "sections"]

TITLES = {
    "inference": "Rollout inference: one step of B environments (steps/s)",
    "training": "Training: forward + backward over (B, T) from a stored state (samples/s)",
    "recurrence_forward": "agalite_recurrence alone, forward (samples/s = B*T/s)",
    "recurrence_forward_backward": "agalite_recurrence alone, forward + backward (samples/s)",
}


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    ratio = f" ({r['ratio']:.2f}x)" if r["ratio"] is not None else ""
    return fmt_rate(r["throughput"]) + ratio


def sections(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One table per (workload, dtype): rows are systems in running order, columns batch sizes.

    Each cell is the median throughput and, in brackets, its ratio to the reference system (AGaLiTe at
    the paper's size for models; the reference backend for the recurrence); the last columns give the
    state bytes per environment and the peak memory at the largest batch.
    """
    out = []
    results = doc["results"]
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r["workload"], r["dtype"]) not in seen:
            seen.append((r["workload"], r["dtype"]))
    for workload, dtype in seen:
        rows_for = [r for r in results if r["workload"] == workload and r["dtype"] == dtype]
        batches = sorted({r["batch"] for r in rows_for})
        labels = list(dict.fromkeys(r["label"] for r in rows_for))
        ratio_to = next((r["ratio_to"] for r in rows_for if r["ratio_to"]), None)
        seq = rows_for[0]["seq_len"]
        headers = ["system", *(f"B={b}" for b in batches), "state/env", f"peak mem @B={batches[-1]}"]
        rows = []
        for label in labels:
            by_batch = {r["batch"]: r for r in rows_for if r["label"] == label}
            last = by_batch.get(batches[-1])
            any_row = next(iter(by_batch.values()))
            rows.append([label, *(_cell(by_batch.get(b)) for b in batches),
                         fmt_bytes(any_row["state_bytes_per_env"]),
                         fmt_bytes(last["peak_bytes"] if last else None)])  # fmt: skip
        title = TITLES.get(workload, workload) + f", {dtype}" + (f", T={seq}" if workload != "inference" else "")
        out.append(dict(workload=workload, dtype=dtype, title=title, headers=headers, rows=rows,
                        ratio_to=ratio_to, batches=batches))  # fmt: skip
    return out


def _ratio_meaning(section: dict[str, Any]) -> str:
    if section["workload"].startswith("recurrence"):
        return "throughput / that of the same shape on the reference backend (its default path)"
    return f"throughput / that of {section['ratio_to']}"


def markdown_tables(doc: dict[str, Any]) -> str:
    parts = []
    for s in sections(doc):
        note = f" Brackets: {_ratio_meaning(s)}." if s["ratio_to"] else ""
        parts.append(f"**{s['title']}.**{note}\n")
        parts.append("| " + " | ".join(s["headers"]) + " |")
        parts.append("|" + "|".join(["---"] + ["---:"] * (len(s["headers"]) - 1)) + "|")
        parts += ["| " + " | ".join(row) + " |" for row in s["rows"]]
        parts.append("")
    return "\n".join(parts)


def _by(doc: dict[str, Any], workload: str, dtype: str) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for r in doc["results"]:
        if r["workload"] == workload and r["dtype"] == dtype and r["status"] == "ok":
            table.setdefault(r["label"], {})[r["batch"]] = r
    return table


def ratio_lines(doc: dict[str, Any]) -> list[str]:
    """Sentences: how many times the reference AGaLiTe's throughput each baseline's is, per batch, and
    every system's state bytes per environment."""
    lines = []
    for workload, what in (("inference", "rollout steps/s"), ("training", "training samples/s")):
        for dtype in doc["config"]["dtypes"]:
            table = _by(doc, workload, dtype)
            ref_label = next((r["ratio_to"] for rows in table.values() for r in rows.values() if r["ratio_to"]), None)
            if ref_label is None or ref_label not in table:
                continue
            batches = sorted(table[ref_label])
            parts = []
            for label, rows in table.items():
                if label.startswith("AGaLiTe") or label.endswith(", eager]"):
                    continue
                ratios = [fmt_ratio(rows[b]["ratio"]) if b in rows else "-" for b in batches]
                parts.append(f"{label} {' / '.join(ratios)}")
            seq = "" if workload == "inference" else f", T = {doc['config']['seq_len']}"
            if parts:
                lines.append(
                    f"{ref_label} {what} ({dtype}) as a multiple of each baseline's, at B = "
                    f"{' / '.join(map(str, batches))}{seq}: " + "; ".join(parts) + "."
                )
            for label, rows in table.items():
                eager = table.get(f"{label[:-1]}, eager]") if label.endswith("]") else None
                if not eager:
                    continue
                ratios = [_over(rows.get(b), eager.get(b)) for b in batches]
                lines.append(
                    f"{label} {what} ({dtype}), fused CPU recurrence over the eager reference, at B = "
                    f"{' / '.join(map(str, batches))}{seq}: {' / '.join(ratios)}."
                )
    state = [
        f"{s['label']} {fmt_bytes(s['state_bytes_per_env'])}"
        for s in doc["systems"]
        if s["family"] != "recurrence" and (s["family"] != "gtrxl" or s["mode"]) and s["mode"] != "eager"
    ]
    if state:
        lines.append("Recurrent state per environment (float32): " + "; ".join(state) + ".")
    return lines


def fused_line(doc: dict[str, Any]) -> str | None:
    """What the default CPU path ran and what its first call costs, or None off CPU."""
    info = doc.get("cpu_fused")
    if not info:
        return None
    if info["state"] != "ready":
        return f"Fused CPU recurrence unavailable ({info.get('reason')}): `[reference]` is the eager reference."
    how = "loaded from its cache" if info.get("cached") else "built"
    fresh = info.get("fresh_build_s")
    passed = info.get("gate_passed", True)
    built = (
        f"`agalite_triton/reference/cpu_fused.cpp`, `{' '.join(info.get('flags') or [])}`; {how} in "
        f"{info['seconds']:.2f} s in this run"
        + (f"; a fresh build takes {fresh:.1f} s, once per machine" if fresh is not None else "")
    )
    galite = info.get("galite") or {}
    if galite.get("state") == "ready":
        how = "loaded from its cache" if galite.get("cached") else "built"
        built += f"; GaLiTe's `agalite_triton/reference/galite_cpu_fused.cpp` {how} in {galite['seconds']:.2f} s"
    elif galite:
        built += f"; GaLiTe's is unavailable ({galite.get('reason')}), so GaLiTe `[reference]` ran eager"
    if not info.get("enabled", True):
        return f"AGALITE_CPU_FUSED=0 was set, so `[reference]` ran the eager reference (fused CPU recurrence: {built})."
    if not passed:
        return f"The fused CPU recurrence ({built}) failed its gate, so `[reference]` ran the eager reference."
    return (
        f"`[reference]` on CPU runs the fused CPU recurrence ({built}); `[reference, eager]` is the same "
        "reference with it off (`AGALITE_CPU_FUSED=0`)."
    )


def _load(device: dict[str, Any]) -> str:
    load = device.get("load_average") or {}
    if not load:
        return "unknown"
    return f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end (1 min)"


def _over(fused: dict[str, Any] | None, eager: dict[str, Any] | None) -> str:
    """Fused throughput as a multiple of eager's at one batch size."""
    if not fused or not eager:
        return "-"
    return f"{fused['throughput'] / eager['throughput']:.3g}x"


def fmt_ratio(ratio: float | None) -> str:
    """A baseline's record stores baseline / AGaLiTe; the sentences give AGaLiTe / baseline."""
    if not ratio:
        return "-"
    inverse = 1.0 / ratio
    return f"{inverse:.3g}x"


def print_report(doc: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: do not squeeze the tables into 80 columns
            console = Console(width=160)
    dev = doc["device"]
    console.print(
        f"[bold]{escape(dev['name'])}[/bold] ({dev['type']}, {dev['cpu_count']} CPUs, torch threads {dev['threads']}), "
        f"torch {doc['versions']['torch']}, triton {doc['versions']['triton']}, sweep {doc['config']['mode']}, "
        f"load average {_load(dev)}"
    )
    load = dev.get("load_average")
    if dev["type"] == "cpu" and load and max(load["start"][0], load["end"][0]) > 0.5 * dev["cpu_count"]:
        advice = "; with several torch threads every parallel region waits for them (try --threads 1)"
        console.print(
            "[yellow]warning[/yellow]: other jobs were running on this machine, so CPU figures are slow and noisy"
            + (advice if dev["threads"] > 1 else "")
        )
    for g in doc["gates"]:
        mark = "[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]"
        err = "" if g["max_error"] is None else f" max err {g['max_error']:.2e} (tol {g['tolerance']:.0e})"
        what = escape(f"gate {g['check']} [{g['backend']}]")
        console.print(f"{what}: {mark}{err} - {escape(g['detail'])}")
    for s in doc["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {escape(s['label'])}: {escape(s['reason'])}")
    line = fused_line(doc)
    if line:
        console.print(escape(line.replace("`", "")))
    for s in sections(doc):
        table = Table(title=s["title"], title_justify="left")
        for i, h in enumerate(s["headers"]):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in s["rows"]:
            table.add_row(*map(escape, row))
        if s["ratio_to"]:
            table.caption = escape(f"(ratio) = {_ratio_meaning(s)}")
        console.print(table)
    for line in ratio_lines(doc):
        console.print(escape(line))
    for r in doc["results"]:
        if r["status"] != "ok":
            what = escape(f"{r['workload']} {r['label']} B={r['batch']}: {r['error']}")
            console.print(f"[red]{r['status']}[/red] {what}")
