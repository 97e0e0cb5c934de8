"""The suite itself on the GPU machine, which has no gymnasium (nor any RL framework) and cannot install
packages: collection must not abort, the modules that need a framework skip with a reason, and a kernel
test left on CPU tensors there (where the interpreter is off) is reported as skipped, not failed.
Both are simulated here in child pytest processes (frameworks blocked from import; CUDA faked present).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = '''
import importlib.abc, sys
BLOCKED = {"gymnasium", "gym", "torchrl", "tensordict", "stable_baselines3", "sb3_contrib", "envpool", "popgym"}
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU machine lacks it)", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
'''

FAKE_CUDA = """
import torch
torch.cuda.is_available = lambda: True
"""

CPU_KERNEL_TESTS = """
import torch
from agalite_triton import agalite_recurrence

def test_kernel_on_cpu_tensors():
    proj = [torch.randn(1, 2, 1, 3) for _ in range(5)] + [torch.randn(1, 2, 1, 2) for _ in range(3)]
    state = [torch.zeros(1, 2, 1, 6), torch.zeros(1, 2, 1, 3), torch.zeros(1, 1, 6)]
    agalite_recurrence(*proj, None, *state, torch.ones(1, dtype=torch.int64), backend="triton")

def test_other_runtime_errors_still_fail():
    raise RuntimeError("a real failure")
"""


def _run(args: list[str], cwd: Path, plugin_dir: Path, env_extra: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_collection_without_gymnasium_or_frameworks(tmp_path):
    (tmp_path / "block_frameworks.py").write_text(BLOCK)
    res = _run(["--collect-only", "-q", "-p", "block_frameworks", str(ROOT / "tests")], ROOT, tmp_path,
               {"TRITON_INTERPRET": "1"})  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    last = res.stdout.strip().splitlines()[-1]
    assert "tests collected" in last and "error" not in last, out[-4000:]
    for module in ("test_tmaze.py", "test_ppo_learning.py"):
        skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED") and f"tests/{module}" in ln]
        assert skipped and "gymnasium" in skipped[0], out[-4000:]


def test_cpu_kernel_tests_skip_on_a_cuda_machine(tmp_path):
    (tmp_path / "fake_cuda.py").write_text(FAKE_CUDA)
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", suite / "conftest.py")
    (suite / "test_cpu_kernels.py").write_text(CPU_KERNEL_TESTS)
    res = _run(["-q", "-rs", "-p", "fake_cuda", str(suite)], suite, tmp_path)
    out = res.stdout + res.stderr
    assert "1 failed, 1 skipped" in out, out[-4000:]
    assert "need the interpreter, which is off on a CUDA machine" in out, out[-4000:]
