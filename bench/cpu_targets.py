"""The reference path's CPU figures that the foundation promises (paper-size model, float32):
one-step rollout at B=1024 (in place with ``out=state``, and out of place) and forward + backward
over B=16, T=128 from a stored state, each with the fused CPU recurrence (the default) and eager
(``AGALITE_CPU_FUSED=0``).

``--model galite``: GaLiTe's (``galite-tmaze``, float32): one-step rollout in place at B=64 and B=1024
and forward + backward over B=16, T=128, fused and eager, beside GTrXL-128 (with its KV cache for the
rollout) in the same run, with tuned malloc thresholds only; and the time a copy of GaLiTe's state at
B=1024 takes (read + write once at the measured 64 MiB copy bandwidth), the floor of a memory-bound step.

``python -m bench.cpu_targets [--threads 2]`` times each workload in a fresh process, once with
glibc's default malloc settings and once with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
raised. Why both: glibc starts by serving every block over 128 KiB with a fresh mmap and adapts
only to the largest block freed so far (up to 32 MiB). A process whose largest temporaries are
a few MiB, like a pure rollout loop stepping in place, keeps returning them to the kernel and
page-faulting them back every step. A process that has freed larger blocks, like one that has run a
training update, is fast without any setting. Fresh processes make the figures independent of
what ran before.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from agalite_triton import AGaLiTe, GaLiTe

from .environment import load_average, pin_threads
from .roofline import copy_bandwidth
from .systems import build, gtrxl_specs, training_state
from .timing import Timing, measure
from .workloads import inference_step

INPUT_DIM = 32
CASES = ("rollout-in-place", "rollout-out-of-place", "train")
PATHS = ("fused", "eager")
GALITE_CASES = ("rollout-64", "rollout-1024", "train")
TRAIN_B, TRAIN_T = 16, 128
GALITE_PATHS = ("fused", "eager", "gtrxl")
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def run_case(case: str, path: str = "fused") -> str:
    """Time one workload in this process (``path``: the fused CPU recurrence or eager); one line of results."""
    if path == "eager":
        os.environ["AGALITE_CPU_FUSED"] = "0"
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = AGaLiTe.from_preset("paper", INPUT_DIM, backend="reference")
    if case.startswith("rollout"):
        batch = 1024
        x = torch.randn(batch, INPUT_DIM, generator=gen)
        dones = torch.rand(batch, generator=gen) < 0.01
        with torch.inference_mode():
            holder = [model.initial_state(batch)]

            def step() -> None:
                if case == "rollout-in-place":
                    model(x, holder[0], dones, out=holder[0])
                else:
                    _, holder[0] = model(x, holder[0], dones)

            t = measure(step, cpu, budget_s=3.0)
        n, unit = batch, "env-steps/s"
    else:
        st = model.initial_state(TRAIN_B)
        st = st._replace(tilde_k=torch.rand(st.tilde_k.shape, generator=gen), s=torch.rand(st.s.shape, generator=gen))
        t = _time_training(model, st, gen)
        n, unit = TRAIN_B * TRAIN_T, "samples/s"
    return f"{n / t.median_s:,.0f} {unit} (p20 {n / t.p80_s:,.0f}, p80 {n / t.p20_s:,.0f})"


def _time_training(model: torch.nn.Module, state: object, gen: torch.Generator) -> Timing:
    """Forward + backward over a (TRAIN_B, TRAIN_T) segment from ``state``, new gradients every call."""
    xs = torch.randn(TRAIN_B, TRAIN_T, INPUT_DIM, generator=gen)
    ds = torch.rand(TRAIN_B, TRAIN_T, generator=gen) < 0.01

    def train() -> None:
        model.zero_grad(set_to_none=True)
        y, _ = model(xs, state, ds)
        y.square().mean().backward()

    return measure(train, torch.device("cpu"), budget_s=5.0)


def run_galite_case(case: str, path: str) -> str:
    """Time one GaLiTe workload in this process (``path``: fused, eager, or GTrXL-128 as the baseline)."""
    if path == "eager":
        os.environ["AGALITE_CPU_FUSED"] = "0"
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    if path == "gtrxl":
        model = build(gtrxl_specs([128], ["kv_cache" if case.startswith("rollout") else None])[0], INPUT_DIM, cpu)
    else:
        model = GaLiTe.from_preset("galite-tmaze", INPUT_DIM, backend="reference")
    floor = ""
    if case.startswith("rollout"):
        batch = int(case.split("-")[1])
        step = inference_step(model, batch, INPUT_DIM, cpu, torch.float32, 0.01)
        t = measure(step, cpu, budget_s=3.0)
        n, unit = batch, "env-steps/s"
        if isinstance(model, GaLiTe) and batch >= 1024:
            # The floor of a memory-bound step, in this process right after it: the state read and written once.
            src = [torch.full_like(x, 0.5) for x in model.initial_state(batch).memories()]  # pages touched
            dst = [torch.empty_like(x) for x in src]
            copy = measure(lambda: [d.copy_(x) for d, x in zip(dst, src)], cpu, budget_s=2.0)
            floor = f"; state copy {copy.median_s * 1e3:.1f} ms, step / copy {t.median_s / copy.median_s:.2f}"
    else:
        t = _time_training(model, training_state(model, TRAIN_B, cpu), torch.Generator().manual_seed(0))
        n, unit = TRAIN_B * TRAIN_T, "samples/s"
    rates = f"{n / t.median_s:,.0f} {unit} (p20 {n / t.p80_s:,.0f}, p80 {n / t.p20_s:,.0f}"
    return f"{rates}; median {t.median_s * 1e3:.1f} ms{floor})"


def galite_state_floor_s(batch: int = 1024) -> tuple[float, float]:
    """(seconds to read and write GaLiTe's state at ``batch`` once at the measured copy bandwidth, GB/s)."""
    bandwidth = copy_bandwidth(64)
    nbytes = GaLiTe.from_preset("galite-tmaze", INPUT_DIM).state_bytes_per_env * batch
    return 2 * nbytes / (bandwidth * 1e9), bandwidth


def _galite_main(threads: int) -> None:
    from agalite_triton.reference import galite_cpu_fused

    info = galite_cpu_fused.build_info()
    print(f"torch {torch.__version__}, threads {threads}, load average at start {load_average()}")
    print(f"GaLiTe fused CPU recurrence: {info['state']}, {info['seconds']:.2f} s to build or load in this process")
    floor, bandwidth = galite_state_floor_s()
    print(f"copy bandwidth (64 MiB, read + write) {bandwidth:.1f} GB/s: GaLiTe state at B=1024 "
          f"read + written once in {floor * 1e3:.1f} ms")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "AGALITE_CPU_FUSED"} | TUNED_MALLOC
    for case in GALITE_CASES:
        for path in GALITE_PATHS:
            cmd = [sys.executable, "-m", "bench.cpu_targets", "--threads", str(threads), "--model", "galite",
                   "--case", case, "--path", path]  # fmt: skip
            line = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
            print(f"galite {case:14s} {path:6s} {line}")
    print(f"load average at end {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("agalite", "galite"), default="agalite")
    parser.add_argument("--case", choices=CASES + GALITE_CASES, help="time one workload in this process (internal)")
    parser.add_argument("--path", choices=GALITE_PATHS, default="fused", help="with --case: the path to time")
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    if args.case:
        print(run_galite_case(args.case, args.path) if args.model == "galite" else run_case(args.case, args.path))
        return
    if args.model == "galite":
        _galite_main(threads)
        return
    from agalite_triton.reference import cpu_fused

    info = cpu_fused.build_info()
    print(f"torch {torch.__version__}, threads {threads}, load average at start {load_average()}")
    print(f"fused CPU recurrence: {info['state']}, {info['seconds']:.2f} s to build or load in this process")
    for label, extra_env in (("glibc malloc defaults", {}), ("tuned malloc thresholds", TUNED_MALLOC)):
        env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC and k != "AGALITE_CPU_FUSED"} | extra_env
        for case in CASES:
            for path in PATHS:
                cmd = [sys.executable, "-m", "bench.cpu_targets", "--threads", str(threads), "--case", case,
                       "--path", path]  # fmt: skip
                line = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
                print(f"{label:24s} {case:22s} {path:6s} {line}")
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
