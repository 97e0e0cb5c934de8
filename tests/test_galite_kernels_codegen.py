"""GaLiTe's kernels lower to sm_90 machine code as the JIT compiles them at launch (codegen_check, as
tests/test_kernel_codegen.py does for AGaLiTe's), and the default table keeps the occupancy targets at
the galite-tmaze size (D = 64, nu = 2): no spills in any kernel, forward and step at least 2 blocks per
SM, the backward at least 1 (README, "Launch configuration"). float32 only, to keep the compile time
down: bf16 loads and stores 16-bit values into the same float32 arithmetic (the README's table has both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agalite_triton import kernels

from .test_kernel_codegen import STRIDE_PREFIXES, _has_nvidia_backend

pytestmark = [
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
    pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (with its ptxas) is not installed"),
]

SCRIPT = """
import json
from agalite_triton.kernels.codegen_check import GALITE_CASES, compile_report
main = ("galite_forward", "galite_forward_infer", "galite_backward", "galite_step")
records = compile_report(presets=("galite-tmaze",), dtypes=("fp32",), cases=main, jobs=2)
records += compile_report(presets=("gA",), dtypes=("fp32",), cases=GALITE_CASES[4:], jobs=2)
print("RECORDS", json.dumps(records))
"""


@pytest.fixture(scope="module")
def records() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RECORDS "))
    return json.loads(line[len("RECORDS ") :])


def test_every_galite_kernel_variant_compiles_with_int64_strides(records):
    assert len(records) == 4 + 4
    assert {r["kernel"] for r in records} == {"_galite_forward_kernel", "_galite_backward_kernel", "_galite_step_kernel"}
    for rec in records:
        assert rec["registers"] is not None and rec["arch"] == "sm_90", rec
        strides = {k: v for k, v in rec["signature"].items() if k.startswith(STRIDE_PREFIXES + ("ic_", "oc_", "part_"))}
        assert strides and set(strides.values()) == {"i64"}, (rec["case"], strides)


def test_galite_tmaze_occupancy_of_the_default_table(records):
    for rec in records:
        if rec["preset"] != "galite-tmaze":
            continue
        assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, rec
        assert rec["blocks_per_sm"] >= (1 if rec["case"] == "galite_backward" else 2), rec
