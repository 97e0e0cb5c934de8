"""Peak memory of one call of a workload, above what was already allocated when it started.

Both devices report the same quantity, ``peak_bytes``: the highest amount of tensor memory the call
held at once on top of what was live before it (parameters, the input state and inputs are live
before; the new state, activations, saved tensors and gradients count).

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call, after
  ``reset_peak_memory_stats``.
* CPU: torch has no CPU allocator statistics, and process RSS or tracemalloc do not see the
  allocator's tensors faithfully (RSS keeps freed pages, tracemalloc sees no ATen allocations). So the
  call runs once under the autograd profiler with ``profile_memory=True``, which records every
  allocation and free of torch's CPU allocator; the peak is the maximum of their running sum in time
  order. Memory allocated outside torch (Python objects, oneDNN scratch) is not counted.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator

import torch

__all__ = ["CPU_METHOD", "CUDA_METHOD", "peak_bytes"]

CUDA_METHOD = "torch.cuda.max_memory_allocated above the allocation at the start"
CPU_METHOD = "torch profiler (profile_memory=True): peak running sum of torch CPU allocator events"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # Kineto logs each profiler start/stop straight to file descriptor 2, past Python's sys.stderr.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Callable[[], object]) -> int | None:
    # torch.autograd.profiler.profile leaves its results raw (torch.profiler.profile post-processes
    # them into an event tree on exit, ten times slower); the raw events are all this needs.
    from torch.autograd.profiler import profile

    with _quiet_stderr(), profile(profile_memory=True, use_kineto=True) as prof:
        fn()
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return None
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """(peak bytes above the starting allocation, method); None when it cannot be measured here."""
    if device.type == "cuda":
        gc.collect()  # tensors held only by dead reference cycles would count as live at the start
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, CUDA_METHOD
    if device.type == "cpu":
        return _cpu_peak(fn), CPU_METHOD
    return None, f"not measured on {device.type}"
