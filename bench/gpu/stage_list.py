"""The session's stages in running order, and the selection the command line makes (no torch here:
the supervisor uses it too)."""

from __future__ import annotations

from typing import Any

__all__ = ["STAGES", "selected_stages"]

STAGES = ("environment", "correctness", "pytest", "compiled", "sweep", "figures")


def selected_stages(args: Any) -> list[str]:
    chosen = [s for s in STAGES if (not args.only or s in args.only) and s not in (args.skip or [])]
    return [s for s in chosen if not (args.no_pytest and s == "pytest")]
