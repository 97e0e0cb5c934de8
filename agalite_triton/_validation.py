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


def check_projections(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    has_time: bool,
    factor: str = "eta",
) -> tuple[list[int], int, int, int]:
    """The five (*lead, H, D) and three (*lead, H, ``factor``) raw projections, with a time axis
    (B, T, ...) or for one step (B, ...), and the dones. Returns (lead sizes, H, D, the factor's size)."""
    lead: tuple[str, ...] = ("B", "T") if has_time else ("B",)
    check_tensor("keys", keys, shape=(*lead, "H", "D"), dtype=FLOAT_DTYPES)
    *lead_sizes, heads, dim = keys.shape
    device, dtype = keys.device, keys.dtype
    for name, t in (("queries", queries), ("values", values), ("beta", beta), ("gamma", gamma)):
        check_tensor(name, t, shape=(*lead_sizes, heads, dim), dtype=dtype, device=device)
    check_tensor("p1", p1, shape=(*lead_sizes, heads, factor), dtype=dtype, device=device)
    width = p1.shape[-1]
    for name, t in (("p2", p2), ("p3", p3)):
        check_tensor(name, t, shape=(*lead_sizes, heads, width), dtype=dtype, device=device)
    if dones is not None:
        check_dones("dones", dones, tuple(lead_sizes), device)
    return lead_sizes, heads, dim, width


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The state is float32 whatever the input dtype; float64 inputs keep a float64 state (an oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    state_batch: int | None = None,
) -> None:
    """AGaLiTe's recurrence arguments, with a time axis (B, T, ...) or for one step (B, ...).

    ``state_batch``: the state's batch when it differs from the projections' (slots); default B."""
    lead_sizes, heads, dim, eta = check_projections(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, has_time
    )
    device, sdt = keys.device, state_dtype_for(keys.dtype)
    batch = lead_sizes[0] if state_batch is None else state_batch
    check_tensor("tilde_k", tilde_k, shape=(batch, "R", heads, eta * dim), dtype=sdt, device=device)
    r = tilde_k.shape[1]
    if r < 1:
        raise ValueError(f"tilde_k: expected R >= 1 approximation terms, got shape {tuple(tilde_k.shape)}")
    check_tensor("tilde_v", tilde_v, shape=(batch, r, heads, dim), dtype=sdt, device=device)
    check_tensor("s", s, shape=(batch, heads, eta * dim), dtype=sdt, device=device)
    check_tensor("tick", tick, shape=(batch,), dtype=torch.int64, device=device)


def check_galite_args(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    p3: torch.Tensor,
    dones: torch.Tensor | None,
    c: torch.Tensor,
    s: torch.Tensor,
    has_time: bool,
    state_batch: int | None = None,
) -> None:
    """GaLiTe's recurrence arguments: projections as AGaLiTe's (``nu`` in place of eta), memory
    c (B, H, D, K) and s (B, H, K) with K = nu * D."""
    lead_sizes, heads, dim, nu = check_projections(
        keys, queries, values, beta, gamma, p1, p2, p3, dones, has_time, factor="nu"
    )
    device, sdt = keys.device, state_dtype_for(keys.dtype)
    batch = lead_sizes[0] if state_batch is None else state_batch
    check_tensor("c", c, shape=(batch, heads, dim, nu * dim), dtype=sdt, device=device)
    check_tensor("s", s, shape=(batch, heads, nu * dim), dtype=sdt, device=device)


def check_slot_rows(
    slots: object, num_rows: int, state_batch: int, device: torch.device, check_values: bool, name: str = "slots"
) -> None:
    """``slots`` (N,) int64: distinct state rows in [0, state_batch), one per projection row.

    The value check needs a host sync, so callers skip it on CUDA unless asked (``check_values``)."""
    check_tensor(name, slots, shape=(num_rows,), dtype=torch.int64, device=device)
    assert isinstance(slots, torch.Tensor)
    if not check_values or slots.numel() == 0:
        return
    lo, hi = int(slots.min()), int(slots.max())
    if lo < 0 or hi >= state_batch:
        raise ValueError(f"{name}: expected state rows in [0, {state_batch}), got values in [{lo}, {hi}]")
    distinct = int(torch.unique(slots).numel())
    if distinct != slots.numel():
        raise ValueError(f"{name}: expected distinct state rows, got {slots.numel() - distinct} repeated")


def check_restart_args(
    restart: object,
    batch: int,
    steps: int,
    like: tuple[torch.Tensor, ...],
    names: tuple[str, ...],
    device: torch.device,
    check_values: bool,
    with_tick: bool = True,
) -> None:
    """``restart = (index (B, T) int64, *memories (N, ...), [tick (N,) int64])``: one restart row per
    memory of ``like`` (the state, named ``names``) in its dtype and per-row shape, and a tick where the
    model has one (AGaLiTe: ``(index, tilde_k, tilde_v, s, tick)``; GaLiTe: ``(index, c, s)``).

    ``index`` values in [-1, N) are checked when ``check_values`` (a host sync, skipped on CUDA)."""
    fields = ("index", *names, *(("tick",) if with_tick else ()))
    if not isinstance(restart, tuple) or len(restart) != len(fields):
        got = f"a tuple of {len(restart)}" if isinstance(restart, tuple) else type(restart).__name__
        raise TypeError(f"restart: expected a tuple ({', '.join(fields)}), got {got}")
    index, *memories = restart
    check_tensor("restart.index", index, shape=(batch, steps), dtype=torch.int64, device=device)
    n: int | str = "N"
    for name, given, state in zip(names, memories, like):
        check_tensor(f"restart.{name}", given, shape=(n, *state.shape[1:]), dtype=state.dtype, device=device)
        n = given.shape[0]
    if with_tick:
        check_tensor("restart.tick", memories[-1], shape=(n,), dtype=torch.int64, device=device)
    assert isinstance(n, int)
    if check_values and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= n:
            raise ValueError(
                f"restart.index: expected -1 (no restart) or a restart row in [0, {n}), got values in [{lo}, {hi}]"
            )
        # Several steps of one batch row may restart from the same row; two batch rows may not (the kernels'
        # backward accumulates a restart row's gradient inside the program that owns its batch row).
        rows, used = torch.nonzero(index >= 0, as_tuple=True)[0], index[index >= 0]
        if used.numel():
            first = rows.new_full((n,), index.shape[0]).scatter_reduce(0, used, rows, reduce="amin")
            last = rows.new_full((n,), -1).scatter_reduce(0, used, rows, reduce="amax")
            shared = torch.nonzero((last >= 0) & (first != last)).flatten()
            if shared.numel():
                k = int(shared[0])
                raise ValueError(
                    f"restart.index: expected each restart row used by one batch row, got row {k} used by batch rows "
                    f"{int(first[k])} and {int(last[k])}"
                )
