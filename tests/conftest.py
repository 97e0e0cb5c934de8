"""Test-session setup shared by every test module.

Triton picks the interpreter when a kernel is *defined*, so ``TRITON_INTERPRET=1`` must be set before
any kernel module is imported: without a GPU the kernels then run on the CPU with the same semantics.
With a GPU the kernels are compiled natively and the kernel tests run on CUDA tensors; the interpreter
cannot be on at the same time, so a kernel call on CPU tensors there (a CPU-only variant of a test) is
reported as skipped with that reason rather than failed.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Exact float32 matmuls on GPUs so that kernel-vs-reference tolerances mean what they say.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


# resolve_backend's error for backend="triton" on CPU tensors without the interpreter.
_CPU_KERNELS_NEED_INTERPRETER = "needs TRITON_INTERPRET=1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    excinfo = call.excinfo
    if (
        report.when == "call"
        and report.failed
        and torch.cuda.is_available()
        and excinfo is not None
        and excinfo.errisinstance(RuntimeError)
        and _CPU_KERNELS_NEED_INTERPRETER in str(excinfo.value)
    ):
        report.outcome = "skipped"
        reason = "Triton kernels on CPU tensors need the interpreter, which is off on a CUDA machine"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")


@pytest.fixture
def one_thread():
    """One torch thread inside the test, restored after: the RL tests compare replays with the rollouts
    they replay, to within float32 rounding or bitwise, and the thread count can change the rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Kernel outputs allocated NaN-filled, so an element a kernel forgets to write fails the comparison.
    Kernel test modules opt in with ``pytest.mark.usefixtures("poison_outputs")``."""
    from agalite_triton.kernels import launch  # here: conftest itself imports no kernel module

    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
