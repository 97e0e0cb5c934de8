"""What the session process is doing right now, for the supervisor watching it from outside.

Before each case (and each long wait) the session writes ``{"case", "since", "limit_s"}`` to the file
named by ``AGALITE_BENCH_HEARTBEAT`` (atomically: write, then rename). A kernel that hangs blocks the
process in a CUDA call where nothing inside it can act, so the supervisor, which holds no CUDA
context, reads this file, ends the process once ``limit_s`` has passed, and records the case.
Without the variable (a session run directly) nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["ENV", "beat", "read"]

ENV = "AGALITE_BENCH_HEARTBEAT"


def beat(case: str, limit_s: float) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(case=case, since=time.time(), limit_s=limit_s, pid=os.getpid()), f)
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
