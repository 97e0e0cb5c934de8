"""pytest-benchmark micro-benchmarks of ``agalite_recurrence`` at the paper's shape (not part of the test
run: ``pytest bench/``). The harness with every shape and peak memory is ``python -m bench --only recurrence``."""

from __future__ import annotations

import pytest
import torch

from bench.recurrence import recurrence_shapes, recurrence_step
from bench.run import available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 64 if DEVICE.type == "cuda" else 4


@pytest.mark.parametrize("backend", available_backends(DEVICE))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_recurrence_paper_shape(benchmark, backend, backward):
    shape = recurrence_shapes(["paper"])[0]
    fn = recurrence_step(shape, BATCH, 128, backend, DEVICE, torch.float32, backward)
    if DEVICE.type == "cuda":

        def timed() -> None:
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)
