"""Wall-clock timing: warm-up, then the median (and p20 / p80) of repeated runs.

CPU: ``time.perf_counter`` around each call. CUDA: ``triton.testing.do_bench`` (CUDA events, L2
flushed between runs) when Triton is importable, else CUDA events around each call.

On a machine shared with other jobs the load drifts over a run, so a run may take its samples of
each case in several rounds spread over the whole sweep (:func:`sample` per round, then
:func:`summarise` of the pooled samples): a busy minute then slows every system alike instead of
whichever happened to be measured in it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "describe_method", "measure", "sample", "summarise"]


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    reps: int | None  # None: do_bench chose (it does not say how many)


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


def summarise(samples: list[float]) -> Timing:
    """Median, p20 and p80 of per-call times in seconds."""
    if not samples:
        raise ValueError("samples: expected at least one time, got none")
    samples = sorted(samples)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))


def sample(
    fn: Callable[[], object], device: torch.device, budget_s: float, min_reps: int = 3, max_reps: int = 200
) -> list[float]:
    """Per-call seconds of ``fn``: a warm-up, then about ``budget_s`` seconds of calls (at least ``min_reps``)."""
    if device.type == "cuda":

        def call() -> float:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3

    else:

        def call() -> float:
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin

    # Warm-up: at least one call, more while they are cheap (allocator, caches, lazy init).
    start = time.perf_counter()
    call()
    while time.perf_counter() - start < min(0.25 * budget_s, 0.1):
        call()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() - start < budget_s):
        samples.append(call())
    return samples


def _do_bench() -> Callable[..., list[float]] | None:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def describe_method(device: torch.device, rounds: int = 1) -> str:
    """How :func:`measure` (or ``rounds`` pooled rounds of :func:`sample`) times calls, for the result file."""
    if device.type == "cuda" and rounds == 1 and _do_bench() is not None:
        how = "triton.testing.do_bench"
    elif device.type == "cuda":
        how = "CUDA events around each call"
    else:
        how = f"time.perf_counter around each call, torch.set_num_threads({torch.get_num_threads()})"
    spread = f", samples taken in {rounds} rounds over the sweep and pooled" if rounds > 1 else ""
    return f"{how}, after warm-up{spread}; median, p20 and p80 of the repetitions"


def measure(fn: Callable[[], object], device: torch.device, budget_s: float = 0.5, min_reps: int = 3) -> Timing:
    """Time ``fn`` on ``device`` in one go: do_bench on CUDA when Triton is present, else :func:`sample`."""
    do_bench = _do_bench() if device.type == "cuda" else None
    if do_bench is not None:
        ms = do_bench(
            fn, warmup=max(1, int(budget_s * 250)), rep=max(1, int(budget_s * 1000)), quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(ms[0] / 1e3, ms[1] / 1e3, ms[2] / 1e3, None)
    return summarise(sample(fn, device, budget_s, min_reps))
