"""CUDA-graph capture of a rollout step, for any of the measured cores.

A graph replays the kernels of one captured call with the same addresses, so everything the step reads
or writes lives in static buffers: the observation and dones are copied into them before each replay
(as a rollout loop would copy the environment's output), and the new state is written back into the
static state inside the graph (AGaLiTe steps in place with ``out=state``; the others return new
tensors, copied back). Before capture the body runs a few times on a side stream, as PyTorch requires:
that compiles the kernels, creates library handles and builds cached tables (the oscillator table),
none of which may happen while capturing.

On CPU there is no graph: ``graphed_rollout`` then returns the eager body (the dry run's stand-in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from agalite_triton import AGaLiTe

from ..workloads import POOL, autocast

__all__ = ["capture", "graphed_rollout", "rollout_body"]


def capture(body: Callable[[], Any], device: torch.device, warmups: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, what ``body`` returned while captured): warm-up on a side stream, then capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = body()
    torch.cuda.synchronize(device)
    return graph, result


def rollout_body(module: nn.Module, x: torch.Tensor, dones: torch.Tensor, state: Any, dtype: torch.dtype,
                 device: torch.device) -> Callable[[], torch.Tensor]:  # fmt: skip
    """One step of ``module`` from the static ``state``, written back into it; returns the features."""
    in_place = isinstance(module, AGaLiTe)

    def body() -> torch.Tensor:
        with torch.no_grad(), autocast(device, dtype):
            if in_place:
                y, _ = module(x, state, dones, out=state)
                return y
            y, new = module(x, state, dones)
            for dst, src in zip(state, new):
                if dst is not src:
                    dst.copy_(src)
            return y

    return body


def graphed_rollout(module: nn.Module, batch: int, input_dim: int, device: torch.device, dtype: torch.dtype,
                    done_prob: float, seed: int = 0) -> Callable[[], None]:  # fmt: skip
    """A callable taking one rollout step of ``batch`` environments by replaying a captured graph
    (cycling through ``POOL`` distinct observations, as ``bench.workloads.inference_step`` does)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs = torch.randn(POOL, batch, input_dim, generator=gen).to(device)
    dones = (torch.rand(POOL, batch, generator=gen) < done_prob).to(device)
    module.eval()
    with torch.no_grad():
        state = module.initial_state(batch, device)
    x_in, d_in = xs[0].clone(), dones[0].clone()
    body = rollout_body(module, x_in, d_in, state, dtype, device)
    counter = [0]
    if device.type != "cuda":
        def eager() -> None:
            i = counter[0] % POOL
            counter[0] += 1
            x_in.copy_(xs[i])
            d_in.copy_(dones[i])
            body()

        return eager
    graph, _ = capture(body, device)

    def replay() -> None:
        i = counter[0] % POOL
        counter[0] += 1
        x_in.copy_(xs[i])
        d_in.copy_(dones[i])
        graph.replay()

    return replay
