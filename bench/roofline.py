"""What bounds a CPU rollout step: FLOPs and bytes per step against this machine's measured sgemm rate
and copy bandwidth, beside the measured step time.

``python -m bench.roofline [--batch 1024] [--threads 2]`` measures, in one process:

* sgemm: ``torch.mm`` at every matmul shape of one AGaLiTe-paper step (and one LSTM-600 step) at the
  batch size, and a square 2048^3 product; GFLOP/s = 2 m n k / time, best of the repetitions;
* copy bandwidth: ``dst.copy_(src)`` of 64 MiB (bytes read + bytes written per second), and of 4 MiB
  (cache-resident);
* the step itself, for AGaLiTe-paper (fused and eager reference, in place), GaLiTe-tmaze (fused, in
  place), LSTM-600 and GTrXL-128 with its KV cache, as ``python -m bench`` runs them.

and prints, per system, the matmul FLOPs, the minimum bytes a step must move (the recurrent state read
and written, the weights read once, the per-layer projections written and read back), the two lower
bounds they give and the measured time. Bytes of the elementwise temporaries are not counted: the bound
is what no implementation of the same model can avoid. GaLiTe's recurrence also does elementwise work on
every memory entry (about 7 FLOPs per entry and step, printed apart from the matmuls); its state, about
0.5 MiB per environment, makes its step bound by memory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from agalite_triton import GALITE_PRESETS, PRESETS
from agalite_triton.reference import cpu_fused

from .environment import load_average, pin_threads
from .systems import GTRXL_SIZE, agalite_specs, build, galite_specs, gtrxl_specs, lstm_specs
from .workloads import inference_step

INPUT_DIM = 64
F32 = 4


def _best(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _median(fn: Callable[[], object], reps: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _layer_tail(batch: int, d: int, ffc: int) -> list[tuple[int, int, int]]:
    """The matmuls every encoder layer has after its attention: two GRU gates and the FFN."""
    return [(batch, d, 3 * d), (batch, d, 2 * d), (batch, d, d)] * 2 + [(batch, d, ffc), (batch, ffc, d)]


def agalite_matmuls(batch: int, cfg: dict[str, int], input_dim: int = INPUT_DIM) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul of one AGaLiTe step (all layers), in order."""
    d, h, dh, eta, ffc = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["eta"], cfg["d_ffc"]
    shapes = [(batch, input_dim, d)]  # embedding of the first layer
    for _ in range(cfg["n_layers"]):
        shapes += [(batch, d, 5 * h * dh + 3 * h * eta), (batch, h * dh, d)]  # in_proj, project
        shapes += _layer_tail(batch, d, ffc)
    return shapes


def galite_matmuls(batch: int, cfg: dict[str, int], input_dim: int = INPUT_DIM) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul of one GaLiTe step (all layers): in_proj, one query projection per head,
    project, then the layer's gates and FFN."""
    d, h, dh, nu, ffc = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["nu"], cfg["d_ffc"]
    shapes = [(batch, input_dim, d)]
    for _ in range(cfg["n_layers"]):
        shapes += [(batch, d, 5 * h * dh + 2 * h * nu), *[(batch, dh, dh + nu)] * h, (batch, h * dh, d)]
        shapes += _layer_tail(batch, d, ffc)
    return shapes


def galite_state_bytes(batch: int, cfg: dict[str, int]) -> int:
    """GaLiTe's memories at ``batch``: per layer and head C (D, nu D) and s (nu D), float32."""
    k = cfg["nu"] * cfg["d_head"]
    return cfg["n_layers"] * cfg["n_heads"] * (cfg["d_head"] * k + k) * F32 * batch


def galite_bytes(batch: int, cfg: dict[str, int], input_dim: int = INPUT_DIM) -> int:
    """Bytes a one-step in-place GaLiTe call must move: the memories read and written, every weight read
    once, each layer's projections (in_proj and the queries) written and read back by the recurrence."""
    h, dh, nu = cfg["n_heads"], cfg["d_head"], cfg["nu"]
    weights = sum(k * n for _, k, n in galite_matmuls(1, cfg, input_dim)) * F32
    projections = cfg["n_layers"] * (5 * h * dh + 2 * h * nu + h * (dh + nu)) * F32 * batch
    return 2 * galite_state_bytes(batch, cfg) + weights + 2 * projections


def galite_recurrence_gflops(batch: int, cfg: dict[str, int]) -> float:
    """Elementwise FLOPs of GaLiTe's recurrence per step: per memory entry the decay (2), its product with
    the entry (1), the input (1) and their sum (1), and the read-out's dot product (2)."""
    k = cfg["nu"] * cfg["d_head"]
    return 7 * cfg["n_layers"] * cfg["n_heads"] * (cfg["d_head"] + 1) * k * batch / 1e9


def agalite_bytes(batch: int, cfg: dict[str, int], input_dim: int = INPUT_DIM) -> int:
    """Bytes a one-step in-place AGaLiTe call must move: the memories read and written, every weight
    read once, each layer's projection written by its matmul and read back by the recurrence."""
    d, h, dh, eta, r, layers = (cfg[k] for k in ("d_model", "n_heads", "d_head", "eta", "r", "n_layers"))
    e = eta * dh
    state = layers * (r * h * e + r * h * dh + h * e) * F32 * batch
    weights = sum(k * n for _, k, n in agalite_matmuls(1, cfg, input_dim)) * F32
    projections = layers * (5 * h * dh + 3 * h * eta) * F32 * batch
    return 2 * state + weights + 2 * projections


def lstm_matmuls(batch: int, hidden: int = 600, input_dim: int = INPUT_DIM) -> list[tuple[int, int, int]]:
    return [(batch, input_dim + hidden, 4 * hidden)]


def lstm_bytes(batch: int, hidden: int = 600, input_dim: int = INPUT_DIM) -> int:
    return (input_dim + hidden) * 4 * hidden * F32 + 2 * 2 * hidden * F32 * batch  # weights; (h, c) in and out


def gtrxl_kv_bytes(batch: int, memory: int = 128) -> int:
    """The KV cache read once per step (each layer's keys and values of M + 1 slots); weights ignored."""
    g = GTRXL_SIZE
    return g["n_layers"] * 2 * g["n_heads"] * (memory + 1) * g["d_head"] * F32 * batch


def gflops(shapes: list[tuple[int, int, int]]) -> float:
    return sum(2 * m * k * n for m, k, n in shapes) / 1e9


def sgemm_rates(shapes: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], float]:
    """GFLOP/s of torch.mm at each distinct shape (best of the repetitions)."""
    rates = {}
    for m, k, n in dict.fromkeys(shapes):
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates[(m, k, n)] = 2 * m * k * n / _best(lambda a=a, b=b: torch.mm(a, b)) / 1e9
    return rates


def copy_bandwidth(mib: int) -> float:
    """GB/s of bytes read plus bytes written by a copy of ``mib`` MiB (best of the repetitions)."""
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best(lambda: dst.copy_(src), reps=10) / 1e9


def _steps(batch: int) -> dict[str, float]:
    cpu = torch.device("cpu")
    systems: dict[str, Any] = {}
    agalite = build(agalite_specs(["paper"], ["reference"])[0], INPUT_DIM, cpu)
    systems["AGaLiTe-paper [reference]"] = inference_step(agalite, batch, INPUT_DIM, cpu, torch.float32, 0.01)
    fused_step = systems["AGaLiTe-paper [reference]"]

    def eager() -> None:
        with cpu_fused.forced(False):
            fused_step()

    systems["AGaLiTe-paper [reference, eager]"] = eager
    galite = build(galite_specs(["reference"])[0], INPUT_DIM, cpu)
    systems["GaLiTe-tmaze [reference]"] = inference_step(galite, batch, INPUT_DIM, cpu, torch.float32, 0.01)
    lstm = build(lstm_specs()[2], INPUT_DIM, cpu)
    systems["LSTM-600"] = inference_step(lstm, batch, INPUT_DIM, cpu, torch.float32, 0.01)
    gtrxl = build(gtrxl_specs([128], ["kv_cache"])[0], INPUT_DIM, cpu)
    systems["GTrXL-128 [kv_cache]"] = inference_step(gtrxl, batch, INPUT_DIM, cpu, torch.float32, 0.01)
    # Interleaved rounds, so that a busy moment of a shared machine slows every system alike.
    times: dict[str, list[float]] = {k: [] for k in systems}
    for fn in systems.values():
        for _ in range(3):
            fn()
    for _ in range(5):
        for name, fn in systems.items():
            times[name].append(_median(fn, reps=6, warmup=1))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)
    batch, cfg, gcfg = args.batch, PRESETS["paper"], GALITE_PRESETS["galite-tmaze"]
    print(f"torch {torch.__version__}, threads {threads}, B = {batch}, load average at start {load_average()}")
    ag_shapes, ga_shapes, lstm_shapes = agalite_matmuls(batch, cfg), galite_matmuls(batch, gcfg), lstm_matmuls(batch)
    rates = sgemm_rates(ag_shapes + ga_shapes + lstm_shapes + [(2048, 2048, 2048)])
    for (m, k, n), rate in rates.items():
        print(f"  sgemm {m}x{k} @ {k}x{n}: {rate:6.1f} GFLOP/s")
    bw_dram, bw_cache = copy_bandwidth(64), copy_bandwidth(4)
    print(f"  copy bandwidth (read + write): 64 MiB {bw_dram:.1f} GB/s, 4 MiB {bw_cache:.1f} GB/s")

    def mm_time(shapes: list[tuple[int, int, int]]) -> float:
        return sum(2 * m * k * n / (rates[(m, k, n)] * 1e9) for m, k, n in shapes)

    steps = _steps(batch)
    rows = [
        ("AGaLiTe-paper", gflops(ag_shapes), mm_time(ag_shapes), agalite_bytes(batch, cfg)),
        ("GaLiTe-tmaze", gflops(ga_shapes), mm_time(ga_shapes), galite_bytes(batch, gcfg)),
        ("LSTM-600", gflops(lstm_shapes), mm_time(lstm_shapes), lstm_bytes(batch)),
        ("GTrXL-128 [kv_cache]", None, None, gtrxl_kv_bytes(batch)),
    ]
    print(f"{'system':34s} {'GFLOP':>7s} {'mm at measured rate':>20s} {'MB moved':>9s} "
          f"{'at 64 MiB copy bw':>18s} {'measured step':>14s}")  # fmt: skip
    for name, gf, mm_s, nbytes in rows:
        for label, measured in steps.items():
            if not label.startswith(name):
                continue
            gf_s = "-" if gf is None else f"{gf:.2f}"
            mm_ms = "-" if mm_s is None else f"{mm_s * 1e3:.1f} ms"
            print(f"{label:34s} {gf_s:>7s} {mm_ms:>20s} {nbytes / 1e6:9.1f} {nbytes / (bw_dram * 1e9) * 1e3:15.1f} ms"
                  f" {measured * 1e3:11.1f} ms")  # fmt: skip
    state_s = 2 * galite_state_bytes(batch, gcfg) / (bw_dram * 1e9)
    measured = steps["GaLiTe-tmaze [reference]"]
    bound = "memory" if galite_bytes(batch, gcfg) / (bw_dram * 1e9) > mm_time(ga_shapes) else "the matmuls"
    print(f"GaLiTe-tmaze: recurrence {galite_recurrence_gflops(batch, gcfg):.2f} GFLOP elementwise; its state "
          f"({galite_state_bytes(batch, gcfg) / 2**20:.0f} MiB) read + written once at the 64 MiB copy bandwidth: "
          f"{state_s * 1e3:.1f} ms; the measured step is {measured / state_s:.2f}x that; bound by {bound}")
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
