"""``import agalite_triton`` never imports an RL framework: the adapters are optional extras."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("torchrl", "tensordict", "stable_baselines3", "sb3_contrib", "envpool", "gymnasium", "popgym", "gym", "ray")


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, agalite_triton, agalite_triton.recurrence, agalite_triton.rl\n"
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"imported: {proc.stdout.strip()}"
