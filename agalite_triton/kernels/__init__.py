"""Triton kernels for the AGaLiTe and GaLiTe recurrences.

``AVAILABLE`` says whether they can run in this process; ``WHY`` says why not when they cannot.
``triton_recurrence`` is the kernel backend of :func:`agalite_triton.agalite_recurrence` (forward,
backward and a one-step path); ``agalite_step_`` is the in-place one-step API for rollouts;
``triton_galite_recurrence`` and ``galite_step_`` are GaLiTe's counterparts (``galite_*.py``). Every
launch takes its configuration (warps, pipelining stages, checkpoint interval, backward split) from
the table in ``config``; ``codegen_check`` compiles every kernel for sm_90 without a GPU and reports
registers, spills and blocks per SM.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    AVAILABLE = False
    WHY = f"triton is not importable ({exc})"
else:
    from .galite_op import triton_galite_recurrence
    from .galite_step import galite_step_
    from .recurrence_op import triton_recurrence
    from .step import agalite_step_

    AVAILABLE = True
    WHY = ""

__all__ = ["AVAILABLE", "WHY", "agalite_step_", "galite_step_", "triton_galite_recurrence", "triton_recurrence"]
