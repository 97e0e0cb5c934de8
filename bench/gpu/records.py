"""The session's output file: one JSON object per line in ``gpu.jsonl``, written as each case ends.

Every line is flushed and fsync'ed before the next case starts, so a run killed at its time limit
leaves everything measured until then. Each record carries what it needs to be read on its own: the
stage, a case id unique in the file, a status, whether it was a dry run, the device and the versions.
A later process may append to the same file (after a lost CUDA context, see ``session.py``); it skips
every case id already written.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "STATUSES", "Recorder", "read_records"]

SCHEMA = "agalite-bench-gpu/1"
# ok: ran and (where checked) agreed with the reference; fail: ran and disagreed; error: raised;
# oom: out of device memory; skipped: not run, with the reason; timeout: cut off by its time limit.
STATUSES = ("ok", "fail", "error", "oom", "skipped", "timeout")


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings (JSON has no NaN), tuples lists, unknowns str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a ``gpu.jsonl`` (a line cut off by a kill is ignored)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Recorder:
    """Appends records to ``path``; ``context`` (device, versions, dry_run) is copied into each."""

    def __init__(self, path: Path, context: dict[str, Any], started: float, append: bool = False) -> None:
        self.path = path
        self.context = context
        self.started = started
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done_cases: set[str] = set()
        if append:
            self.done_cases = {r["case"] for r in read_records(path) if "case" in r}
            if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                with open(path, "a") as f:  # a line cut off by a kill: end it, so that it stays alone
                    f.write("\n")
        elif path.exists():
            path.unlink()
        self.written = 0

    def done(self, case: str) -> bool:
        """Whether ``case`` is already in the file (written by this or an earlier process of the run)."""
        return case in self.done_cases

    def write(self, stage: str, case: str, status: str, **fields: Any) -> dict[str, Any]:
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
        record = dict(schema=SCHEMA, stage=stage, case=case, status=status, **self.context)
        record.update(fields)
        record["elapsed_s"] = round(time.monotonic() - self.started, 3)
        record = _clean(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_cases.add(case)
        self.written += 1
        return record

    def skip(self, stage: str, case: str, reason: str, **fields: Any) -> dict[str, Any]:
        return self.write(stage, case, "skipped", reason=reason, **fields)

    def failure(self, stage: str, case: str, exc: BaseException, status: str = "error", **fields: Any) -> dict:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.write(stage, case, status, error=f"{type(exc).__name__}: {exc}"[:2000],
                          traceback=tb[-6000:], **fields)  # fmt: skip
