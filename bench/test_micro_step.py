"""pytest-benchmark micro-benchmarks of one rollout step of each core at the paper's size (``pytest bench/``)."""

from __future__ import annotations

import pytest
import torch

from bench.run import available_backends
from bench.systems import agalite_specs, build, gtrxl_specs, lstm_specs
from bench.workloads import inference_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPECS = [*agalite_specs(["paper"], available_backends(DEVICE)), *gtrxl_specs([128], ["recompute", "kv_cache"]),
         lstm_specs()[0]]  # fmt: skip


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_one_step(benchmark, spec, batch):
    step = inference_step(build(spec, 64, DEVICE), batch, 64, DEVICE, torch.float32, done_prob=0.01)
    if DEVICE.type == "cuda":

        def timed() -> None:
            step()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(step)
