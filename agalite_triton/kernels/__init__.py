"""Triton kernels for the AGaLiTe recurrence.

``AVAILABLE`` says whether they can run in this process; ``WHY`` says why not when they cannot.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    AVAILABLE = False
    WHY = "the kernels are not built yet"
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    AVAILABLE = False
    WHY = f"triton is not importable ({exc})"
