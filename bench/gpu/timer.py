"""Timing and peak memory of one callable, as the session records them.

On CUDA: ``triton.testing.do_bench`` through ``bench.timing.measure`` (CUDA events, L2 flushed
between calls, median / p20 / p80), after one untimed call that the caller makes first (compiles
and caches stay out of the numbers). On CPU (the dry run) the stand-in is a single ``time.perf_counter``
call, and peak memory is not measured (the profiler would cost another interpreted call;
``tests/test_bench.py`` covers it): the dry run checks that every case runs, not its speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..memory import peak_bytes
from ..timing import describe_method, measure, summarise

__all__ = ["time_call", "peak_memory"]


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> dict[str, Any]:
    """{median_s, p20_s, p80_s, reps, timing_method} of ``fn``."""
    if device.type == "cuda":
        # do_bench repeats for ``rep`` ms: a call slower than a fifth of the budget would be timed only
        # once or twice, so the budget grows to five calls (up to 3 s) for slow cases (the reference).
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        one = begin.elapsed_time(end) / 1e3
        t = measure(fn, device, budget_s=min(3.0, max(budget_s, 0.01, 5 * one)))
        method = describe_method(device)
    else:  # the caller has made the untimed call (or the check did)
        begin = time.perf_counter()
        fn()
        t = summarise([time.perf_counter() - begin])
        method = "dry-run stand-in: one time.perf_counter call"
    return dict(median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, reps=t.reps, timing_method=method)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes one call holds above what was live before it (``bench.memory.peak_bytes``); None on CPU."""
    if device.type != "cuda":
        return None
    return peak_bytes(fn, device)[0]
