"""The two model workloads, as zero-argument callables to time.

* Rollout inference: one step for B environments, the state carried from call to call, about
  ``done_prob`` of the environments starting a new episode at each step. Throughput: B / step time.
* Training: forward and backward over a (B, T) segment from a stored initial state (new parameter
  gradients every call, as an optimiser step would see). Throughput: B * T / time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from agalite_triton import AGaLiTe, GaLiTe

from .systems import training_state

__all__ = ["autocast", "inference_step", "training_step"]

# Distinct inputs cycled through, so that no call sees the same observation as the last one.
POOL = 8


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast for low-precision runs; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _random_inputs(
    lead: tuple[int, int], input_dim: int, done_prob: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Observations (*lead, input_dim) ~ N(0, 1) and dones (*lead) with probability ``done_prob``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*lead, input_dim, generator=gen)
    return x.to(device), (torch.rand(*lead, generator=gen) < done_prob).to(device)


def inference_step(
    module: nn.Module,
    batch: int,
    input_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    done_prob: float,
    seed: int = 0,
) -> Callable[[], None]:
    xs, dones = _random_inputs((POOL, batch), input_dim, done_prob, seed, device)
    module.eval()
    with torch.inference_mode():
        holder = [module.initial_state(batch, device)]
    counter = [0]
    # AGaLiTe and GaLiTe step their state in place (``out=state``), as GTrXL's kv_cache does: a rollout
    # loop that allocates no state per step. The recompute GTrXL and the LSTM return new states.
    in_place = isinstance(module, (AGaLiTe, GaLiTe))

    def step() -> None:
        i = counter[0] % POOL
        counter[0] += 1
        with torch.inference_mode(), autocast(device, dtype):
            if in_place:
                module(xs[i], holder[0], dones[i], out=holder[0])
            else:
                _, holder[0] = module(xs[i], holder[0], dones[i])

    return step


def training_step(
    module: nn.Module,
    batch: int,
    seq_len: int,
    input_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    done_prob: float,
    seed: int = 0,
) -> Callable[[], None]:
    x, dones = _random_inputs((batch, seq_len), input_dim, done_prob, seed, device)
    state = training_state(module, batch, device, seed)
    module.train()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            y, _ = module(x, state, dones)
        y.float().square().mean().backward()

    return step
