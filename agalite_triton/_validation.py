"""Argument checks that name the argument, the expected and the actual value.

Nothing is broadcast or cast silently: a wrong rank, shape, dtype or device is an error here rather
than a wrong number (or a crash) deep inside a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fmt_shape(shape: Iterable[int | str | None]) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def check_tensor(
    name: str,
    value: object,
    shape: Sequence[int | str | None] | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check ``value`` and return it. ``shape`` entries: an int (exact), or a str/None (any size)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if shape is not None:
        if value.dim() != len(shape):
            raise ValueError(
                f"{name}: expected {len(shape)} dimensions {_fmt_shape(shape)}, "
                f"got {value.dim()} with shape {tuple(value.shape)}"
            )
        for want, got in zip(shape, value.shape):
            if isinstance(want, int) and want != got:
                raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {tuple(value.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if value.dtype not in allowed:
            names = " or ".join(str(d) for d in allowed)
            raise TypeError(f"{name}: expected dtype {names}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value


def check_dones(name: str, dones: torch.Tensor, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Dones are bool or floating 0/1 (used as ``1 - done``); integer dtypes are rejected, not guessed."""
    check_tensor(name, dones, shape=shape, device=device)
    if dones.dtype != torch.bool and not dones.is_floating_point():
        raise TypeError(f"{name}: expected dtype torch.bool or a floating dtype (0/1), got {dones.dtype}")
    return dones


def same_device(value: torch.Tensor | None, device: torch.device) -> bool:
    return value is None or value.device == device


def check_recurrence_args(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    tilde_k: torch.Tensor,
    tilde_v: torch.Tensor,
    s: torch.Tensor,
    tick: torch.Tensor,
    has_time: bool,
) -> None:
    """The recurrence's arguments, with a time axis (B, T, ...) or for one step (B, ...)."""
    lead: tuple[str, ...] = ("B", "T") if has_time else ("B",)
    check_tensor("keys", keys, shape=(*lead, "H", "D"), dtype=FLOAT_DTYPES)
    *lead_sizes, heads, dim = keys.shape
    device, dtype = keys.device, keys.dtype
    for name, t in (("queries", queries), ("values", values), ("beta", beta), ("gamma", gamma)):
        check_tensor(name, t, shape=(*lead_sizes, heads, dim), dtype=dtype, device=device)
    check_tensor("p1", p1, shape=(*lead_sizes, heads, "eta"), dtype=dtype, device=device)
    eta = p1.shape[-1]
    for name, t in (("p2", p2), ("p3", p3)):
        check_tensor(name, t, shape=(*lead_sizes, heads, eta), dtype=dtype, device=device)
    if dones is not None:
        check_dones("dones", dones, tuple(lead_sizes), device)
    # The state is float32 whatever the input dtype; float64 inputs keep a float64 state (an oracle).
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    batch = lead_sizes[0]
    check_tensor("tilde_k", tilde_k, shape=(batch, "R", heads, eta * dim), dtype=sdt, device=device)
    r = tilde_k.shape[1]
    if r < 1:
        raise ValueError(f"tilde_k: expected R >= 1 approximation terms, got shape {tuple(tilde_k.shape)}")
    check_tensor("tilde_v", tilde_v, shape=(batch, r, heads, dim), dtype=sdt, device=device)
    check_tensor("s", s, shape=(batch, heads, eta * dim), dtype=sdt, device=device)
    check_tensor("tick", tick, shape=(batch,), dtype=torch.int64, device=device)
