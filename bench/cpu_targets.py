"""The reference path's CPU figures that the foundation promises (paper-size model, float32):
one-step rollout at B=1024 (in place with ``out=state``, and out of place) and forward + backward
over B=16, T=128 from a stored state.

``python -m bench.cpu_targets [--threads 2]`` prints medians (p20 / p80) from ``bench.timing``.
"""

from __future__ import annotations

import argparse

import torch

from agalite_triton import AGaLiTe

from .environment import load_average, pin_threads
from .timing import measure

INPUT_DIM = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = AGaLiTe.from_preset("paper", INPUT_DIM, backend="reference")
    print(f"torch {torch.__version__}, threads {threads}, load average at start {load_average()}")

    batch = 1024
    x = torch.randn(batch, INPUT_DIM, generator=gen)
    dones = torch.rand(batch, generator=gen) < 0.01
    with torch.inference_mode():
        state = model.initial_state(batch)
        holder = [state]

        def out_of_place() -> None:
            _, holder[0] = model(x, holder[0], dones)

        def in_place() -> None:
            model(x, state, dones, out=state)

        for name, fn in (("out of place", out_of_place), ("in place (out=state)", in_place)):
            t = measure(fn, cpu, budget_s=2.0)
            print(f"rollout B={batch} {name}: {batch / t.median_s:,.0f} steps/s "
                  f"(p20 {batch / t.p80_s:,.0f}, p80 {batch / t.p20_s:,.0f})")  # fmt: skip

    batch, steps = 16, 128
    xs = torch.randn(batch, steps, INPUT_DIM, generator=gen)
    ds = torch.rand(batch, steps, generator=gen) < 0.01
    st = model.initial_state(batch)
    st = st._replace(tilde_k=torch.rand(st.tilde_k.shape, generator=gen), s=torch.rand(st.s.shape, generator=gen))

    def train() -> None:
        model.zero_grad(set_to_none=True)
        y, _ = model(xs, st, ds)
        y.square().mean().backward()

    t = measure(train, cpu, budget_s=4.0)
    n = batch * steps
    print(f"train B={batch} T={steps}: {n / t.median_s:,.0f} samples/s "
          f"(p20 {n / t.p80_s:,.0f}, p80 {n / t.p20_s:,.0f})")  # fmt: skip
    print(f"load average at end {load_average()}")


if __name__ == "__main__":
    main()
