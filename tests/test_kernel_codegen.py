"""The kernels lower to sm_90 machine code (TTIR -> PTX -> cubin with Triton's bundled ptxas).

The interpreter never lowers the kernels, so without this a code-generation error would first show on
a GPU. No GPU is needed; it runs in a child process because this one imported Triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from agalite_triton import kernels

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"

pytestmark = [
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
    pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (bundled ptxas) is not installed"),
]

SCRIPT = """
from agalite_triton.kernels.codegen_check import compile_all
reports = compile_all(sizes=((2, 4, 64), (1, 1, 4)), dtypes=("bf16", "fp32"))
reports += compile_all(sizes=((4, 4, 8),), dtypes=("fp64",))
assert len(reports) == 15, reports
assert all(r.registers is not None for r in reports), reports
print("compiled", len(reports))
"""


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled 15" in res.stdout
