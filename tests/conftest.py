"""Test-session setup shared by every test module.

Triton picks the interpreter when a kernel is *defined*, so ``TRITON_INTERPRET=1`` must be set before
any kernel module is imported: without a GPU the kernels then run on the CPU with the same semantics.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Exact float32 matmuls on GPUs so that kernel-vs-reference tolerances mean what they say.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
