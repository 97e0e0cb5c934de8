"""Bytes the recurrence must move at the least, the bandwidth floor its times are compared with.

Each input read once and each output written once (METHOD.md's count): the eight projections, the
dones (bool) and ticks, the initial state read and the final state written (float32), the read-out
written. Forward + backward adds the read-out's gradient read and the gradients of the projections and
of the initial state written. What the kernels move on top (checkpoints, the backward's recomputation
scratch, re-reading the projections in the backward) is the gap, not the floor.
"""

from __future__ import annotations

from .sizes import Shape

__all__ = ["recurrence_bytes"]

_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def recurrence_bytes(shape: Shape, batch: int, seq_len: int, dtype: str, backward: bool) -> int:
    e = _ELEMENT[dtype]
    B, T, H, D, eta, R = batch, seq_len, shape.heads, shape.head_dim, shape.eta, shape.r
    E = eta * D
    projections = B * T * H * (5 * D + 3 * eta) * e
    readout = B * T * H * D * e
    state = B * H * (R * E + R * D + E) * 4
    forward = projections + B * T + B * 8 + 2 * state + readout
    if not backward:
        return forward
    return forward + readout + projections + state
