"""The launch configuration of every kernel: one table, the single source of truth.

Each kernel's warps, software-pipelining stages, checkpoint interval and backward split are looked up
here per *size class* (the size of a head's largest register tile, ``tilde_k``: R_PAD * ETA_PAD * D_PAD
values) at launch time, so a tuning sweep can replace the table (``use_table``) and its result can
become the default (``table_to_json`` / ``table_from_json``). The configuration is fixed per launch,
never autotuned: the one-step kernel updates live state in place, which an autotuner re-running the
kernel would corrupt.

Fields:
    num_warps:  warps per program.
    num_stages: ``tl.range(..., num_stages=)`` of the time loops (1: no software pipelining). The step
                kernel has no loop and ignores it.
    chunk:      steps between two forward checkpoints, also the backward's recompute interval. The
                forward's entry decides it when it saves checkpoints, and the chunk travels with them to
                the backward (the backward entry's ``chunk`` is not read), so changing the table between
                a forward and its backward is safe.
    split:      programs per (b, h) in the backward, each owning ETA_PAD / split rows of the feature
                map (partial gradients summed afterwards, no atomics). At most ETA_PAD is used: for a
                size whose ETA_PAD is smaller the launcher takes ETA_PAD. Forward and step ignore it.
    rows:       GaLiTe kernels: value rows of the (D, K) memory per program (the sequence kernels launch
                ceil(D / rows) programs per (b, h); the step kernel walks its rows in blocks of this
                many). At most D_PAD is used. The AGaLiTe kernels ignore it.

GaLiTe's kernels (``galite_*``) are classed by a head's memory, D_PAD * NU_PAD * D_PAD values
(``get_config(kernel, d_pad, nu_pad, d_pad)``), the same bounds as AGaLiTe's tilde_k.

The defaults were chosen without a GPU from ptxas's register, spill and shared-memory figures for
sm_90 (``python -m agalite_triton.kernels.codegen_check``): at the paper size (R=2, eta=4, D=64) the
backward fits two blocks per SM without spills and the forward and step kernels at least four.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

__all__ = [
    "DEFAULT_TABLE",
    "KERNELS",
    "SIZE_CLASSES",
    "LaunchConfig",
    "active_table",
    "get_config",
    "size_class",
    "table_from_json",
    "table_to_json",
    "use_table",
]

KERNELS = ("forward", "backward", "step", "galite_forward", "galite_backward", "galite_step")

# Upper bounds (inclusive) of R_PAD * ETA_PAD * D_PAD per class; the last class is unbounded.
_CLASS_BOUNDS = (256, 512, 1024, 2048, 4096)
SIZE_CLASSES = tuple(f"tile{n}" for n in _CLASS_BOUNDS) + ("tile_max",)


@dataclass(frozen=True)
class LaunchConfig:
    num_warps: int
    num_stages: int = 1
    chunk: int = 16
    split: int = 1
    rows: int = 16

    def __post_init__(self) -> None:
        for name in ("num_warps", "num_stages", "chunk", "split", "rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaunchConfig.{name}: expected a positive int, got {value!r}")
        for name in ("num_warps", "split", "rows"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"LaunchConfig.{name}: expected a power of two, got {value}")
        if self.num_warps > 32:
            raise ValueError(f"LaunchConfig.num_warps: expected at most 32, got {self.num_warps}")


Table = dict[str, dict[str, LaunchConfig]]


def size_class(r_pad: int, eta_pad: int, d_pad: int) -> str:
    """The table key for padded sizes (powers of two, as the launchers compute them)."""
    for name, value in (("r_pad", r_pad), ("eta_pad", eta_pad), ("d_pad", d_pad)):
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"size_class: {name} must be a positive power of two, got {value!r}")
    tile = r_pad * eta_pad * d_pad
    for bound, name in zip(_CLASS_BOUNDS, SIZE_CLASSES):
        if tile <= bound:
            return name
    return SIZE_CLASSES[-1]


def _row(
    warps: tuple[int, ...], splits: tuple[int, ...] | None = None, rows: tuple[int, ...] | None = None
) -> dict[str, LaunchConfig]:
    splits = splits or (1,) * len(SIZE_CLASSES)
    rows = rows or (16,) * len(SIZE_CLASSES)
    return {name: LaunchConfig(w, split=sp, rows=rw) for name, w, sp, rw in zip(SIZE_CLASSES, warps, splits, rows)}


# Classes of the presets: paper and fast tile512, craftax tile1024, standard and optimized tile2048.
# Chosen from codegen_check's sm_90 figures under Triton 3.9 and 3.6 (fp32 and bf16), for the most
# resident programs without spills; see the README's "Launch configuration" and bench.gpu's sweep.
DEFAULT_TABLE: Table = {
    "forward": _row((2, 2, 4, 2, 4, 4)),
    "backward": _row((2, 2, 2, 2, 4, 4), splits=(1, 1, 2, 4, 8, 8)),
    "step": _row((2, 2, 4, 4, 4, 4)),
    # GaLiTe (classed by a head's D_PAD * NU_PAD * D_PAD memory): galite-tmaze (D=64, nu=2) is tile_max,
    # the fixtures' gC (D=16, nu=3) tile1024 and gA (D=8, nu=2) tile256.
    "galite_forward": _row((2, 2, 2, 4, 4, 4), rows=(8, 8, 16, 16, 16, 16)),
    "galite_backward": _row((4, 2, 2, 2, 2, 2), rows=(8, 4, 4, 4, 4, 4)),
    "galite_step": _row((2, 2, 2, 4, 4, 4), rows=(8, 8, 16, 16, 16, 16)),
}

_active: Table = DEFAULT_TABLE


def _check_table(table: Table) -> Table:
    if not isinstance(table, dict):
        raise TypeError(f"table: expected a dict kernel -> size class -> LaunchConfig, got {type(table).__name__}")
    for kernel, row in table.items():
        if kernel not in KERNELS:
            raise ValueError(f"table: unknown kernel {kernel!r}, expected one of {KERNELS}")
        if not isinstance(row, dict):
            raise TypeError(f"table[{kernel!r}]: expected a dict size class -> LaunchConfig, got {type(row).__name__}")
        for cls, cfg in row.items():
            if cls not in SIZE_CLASSES:
                raise ValueError(f"table[{kernel!r}]: unknown size class {cls!r}, expected one of {SIZE_CLASSES}")
            if not isinstance(cfg, LaunchConfig):
                raise TypeError(f"table[{kernel!r}][{cls!r}]: expected a LaunchConfig, got {type(cfg).__name__}")
    return table


def active_table() -> Table:
    """The table launches read now (``DEFAULT_TABLE`` outside ``use_table``)."""
    return _active


def get_config(kernel: str, r_pad: int, eta_pad: int, d_pad: int) -> LaunchConfig:
    """The configuration a launch of ``kernel`` at these padded sizes uses. An entry missing from a
    table installed by ``use_table`` (a sweep may set only the entries it varies) is the default's."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    cls = size_class(r_pad, eta_pad, d_pad)
    cfg = _active.get(kernel, {}).get(cls)
    return cfg if cfg is not None else DEFAULT_TABLE[kernel][cls]


@contextmanager
def use_table(table: Table) -> Iterator[Table]:
    """Launch with ``table`` inside the block (entries it lacks fall back to the defaults)."""
    global _active
    previous = _active
    _active = _check_table(table)
    try:
        yield table
    finally:
        _active = previous


def table_to_json(table: Table) -> dict:
    """A JSON-serialisable copy: kernel -> size class -> {num_warps, num_stages, chunk, split}."""
    _check_table(table)
    return {kernel: {cls: asdict(cfg) for cls, cfg in row.items()} for kernel, row in table.items()}


def table_from_json(obj: dict) -> Table:
    """The inverse of ``table_to_json``; unknown kernels, classes or fields are errors."""
    if not isinstance(obj, dict):
        raise TypeError(f"obj: expected a dict, got {type(obj).__name__}")
    table: Table = {}
    for kernel, row in obj.items():
        if not isinstance(row, dict):
            raise TypeError(f"obj[{kernel!r}]: expected a dict, got {type(row).__name__}")
        table[kernel] = {}
        for cls, fields in row.items():
            if not isinstance(fields, dict):
                raise TypeError(f"obj[{kernel!r}][{cls!r}]: expected a dict of fields, got {type(fields).__name__}")
            try:
                table[kernel][cls] = LaunchConfig(**fields)
            except TypeError as exc:
                raise ValueError(f"obj[{kernel!r}][{cls!r}]: {exc}") from None
    return _check_table(table)
