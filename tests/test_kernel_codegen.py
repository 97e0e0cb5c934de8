"""The kernels lower to sm_90 machine code as the JIT compiles them at launch (codegen_check: the real
launchers on model-shaped CPU tensors, the JIT's own argument specialisation, Triton's own ptxas).

The interpreter never lowers the kernels, so without this a code-generation error would first show on
a GPU. No GPU is needed; it runs in a child process because this one imported Triton in interpreter
mode. Checked here: every kernel variant compiles; every stride argument is 64-bit (so t * stride cannot
wrap for time-major views with stride * T >= 2**31); the occupancy the default table promises at the
paper size (backward >= 2 blocks per SM without spills, forward and step >= 4); and that the
``num_stages`` knob really pipelines the time loops (asynchronous copies in the PTX).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agalite_triton import kernels


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = [
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
    pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend (with its ptxas) is not installed"),
]

SCRIPT = """
import json
from agalite_triton.kernels.codegen_check import KERNEL_CASES, compile_report
from agalite_triton.kernels.config import KERNELS, SIZE_CLASSES, LaunchConfig
records = compile_report(presets=("paper",), dtypes=("fp32",), cases=KERNEL_CASES, jobs=2)
records += compile_report(presets=("paper",), dtypes=("bf16",), cases=("forward", "backward", "step"))
records += compile_report(presets=("standard",), dtypes=("bf16",), cases=("backward",))
records += compile_report(presets=("craftax",), dtypes=("fp32",), cases=("backward",))
records += compile_report(presets=((4, 4, 8),), dtypes=("fp64",), cases=("forward", "backward", "step"))
staged = {k: {c: LaunchConfig(2, num_stages=2) for c in SIZE_CLASSES} for k in KERNELS}
for rec in compile_report(presets=("paper",), dtypes=("fp32",), cases=("forward", "backward"), table=staged):
    records.append(dict(rec, case=rec["case"] + "_staged"))
print("RECORDS", json.dumps(records))
"""

STRIDE_PREFIXES = ("sd_", "se_", "sn_", "sdo_", "itk_", "itv_", "is_", "otk_", "otv_", "os_", "split_stride", "stk_t", "ssl")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RECORDS "))
    return json.loads(line[len("RECORDS ") :])


def test_every_kernel_variant_compiles_for_sm90(records):
    assert len(records) == 8 + 3 + 1 + 1 + 3 + 2
    assert all(r["registers"] is not None and r["arch"] == "sm_90" for r in records), records


def test_every_stride_argument_is_int64(records):
    for rec in records:
        strides = {k: v for k, v in rec["signature"].items() if k.startswith(STRIDE_PREFIXES)}
        assert strides, rec["kernel"]
        assert set(strides.values()) == {"i64"}, (rec["kernel"], strides)


def test_paper_size_occupancy_of_the_default_table(records):
    """The targets the default table was chosen for (README, "Launch configuration")."""
    by = {(r["preset"], r["dtype"], r["case"]): r for r in records}
    for dtype in ("fp32", "bf16"):
        bwd = by["paper", dtype, "backward"]
        assert bwd["spill_stores"] == 0 and bwd["blocks_per_sm"] >= 2, bwd
        for case in ("forward", "step"):
            assert by["paper", dtype, case]["blocks_per_sm"] >= 4, by["paper", dtype, case]
    # The sizes that need the backward split: no spills there either.
    assert by["standard", "bf16", "backward"]["split"] == 4
    assert by["craftax", "fp32", "backward"]["split"] == 2
    for key in (("standard", "bf16", "backward"), ("craftax", "fp32", "backward")):
        assert by[key]["spill_stores"] == 0 and by[key]["blocks_per_sm"] >= 2, by[key]


def test_num_stages_pipelines_the_time_loops(records):
    for rec in records:
        if rec["case"].endswith("_staged"):
            assert rec["num_stages"] == 2 and rec["async_copies"] > 0, rec
        elif rec["case"] in ("forward", "backward"):
            assert rec["num_stages"] == 1 and rec["async_copies"] == 0, rec
