"""Initialisation as the original: orthogonal kernels with gain sqrt(2), zero biases.

Where this package fuses several of the original's Dense layers into one ``nn.Linear``, each block
that was its own Dense is initialised as its own orthogonal matrix, so the distribution matches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

GAIN = math.sqrt(2.0)


@torch.no_grad()
def orthogonal_blocks(linear: nn.Linear, block_rows: Sequence[int]) -> None:
    """Orthogonal init of consecutive row blocks of ``linear.weight`` (out, in); zero bias."""
    if sum(block_rows) != linear.weight.shape[0]:
        raise ValueError(f"block_rows: expected them to sum to {linear.weight.shape[0]}, got {list(block_rows)}")
    start = 0
    for rows in block_rows:
        nn.init.orthogonal_(linear.weight[start : start + rows], gain=GAIN)
        start += rows
    if linear.bias is not None:
        linear.bias.zero_()
