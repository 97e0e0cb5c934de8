"""The launch-configuration table: its API, and that every knob it holds changes speed, never results.

The chunk a forward checkpointed at travels with its checkpoints: changing the table between a forward
and its backward (as a tuning sweep does) gives bitwise the same gradients and writes nothing out of
bounds (outputs are NaN-poisoned, so an unwritten element shows). The backward's split of the feature
rows across programs only reorders sums over eta, and the pipelining stages change nothing in results.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from agalite_triton import agalite_recurrence, kernels
from agalite_triton.kernels import config
from agalite_triton.kernels.config import DEFAULT_TABLE, KERNELS, SIZE_CLASSES, LaunchConfig
from agalite_triton.presets import PRESETS

from .test_kernels import make_case, rel_err

pytestmark = pytest.mark.usefixtures("poison_outputs")
needs_kernels = pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}")


def uniform(**fields) -> dict:
    """A table that sets ``fields`` for every kernel and size class (other fields at their defaults)."""
    return {k: {c: LaunchConfig(**{"num_warps": DEFAULT_TABLE[k][c].num_warps, **fields}) for c in SIZE_CLASSES}
            for k in KERNELS}  # fmt: skip


def test_table_covers_every_kernel_and_class_and_round_trips_through_json():
    assert set(DEFAULT_TABLE) == set(KERNELS)
    assert all(set(row) == set(SIZE_CLASSES) for row in DEFAULT_TABLE.values())
    text = json.dumps(config.table_to_json(DEFAULT_TABLE))
    assert config.table_from_json(json.loads(text)) == DEFAULT_TABLE

    def pad(n: int) -> int:
        return 1 << (n - 1).bit_length()

    classes = {name: config.size_class(pad(p["r"]), pad(p["eta"]), pad(p["d_head"])) for name, p in PRESETS.items()}
    assert classes == {"paper": "tile512", "fast": "tile512", "craftax": "tile1024", "standard": "tile2048",
                       "optimized": "tile2048"}  # fmt: skip


def test_use_table_overrides_falls_back_and_restores():
    custom = {"backward": {"tile512": LaunchConfig(8, num_stages=3, chunk=4, split=2)}}
    before = config.get_config("backward", 2, 4, 64)
    with config.use_table(custom):
        assert config.get_config("backward", 2, 4, 64) == LaunchConfig(8, 3, 4, 2)
        assert config.get_config("forward", 2, 4, 64) == DEFAULT_TABLE["forward"]["tile512"]  # not in custom
    assert config.get_config("backward", 2, 4, 64) == before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LaunchConfig(3), "num_warps: expected a power of two"),
        (lambda: LaunchConfig(4, num_stages=0), "num_stages: expected a positive int"),
        (lambda: LaunchConfig(4, split=3), "split: expected a power of two"),
        (lambda: config.get_config("sideways", 2, 4, 64), "kernel: expected one of"),
        (lambda: config.size_class(3, 4, 64), "r_pad must be a positive power of two"),
        (lambda: config.use_table({"forward": {"tile7": LaunchConfig(4)}}).__enter__(), "unknown size class"),
        (lambda: config.table_from_json({"step": {"tile512": {"num_warps": 2, "warps": 4}}}), r"obj\['step'\]"),
    ],
)
def test_bad_configuration_is_a_clear_error(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def _table(table: config.Table | None) -> contextlib.AbstractContextManager:
    # None keeps whatever table is active (a caller's use_table); use_table({}) would reset it to the defaults.
    return contextlib.nullcontext() if table is None else config.use_table(table)


def grads_of(case, fwd_table: config.Table | None = None, bwd_table: config.Table | None = None) -> list[torch.Tensor]:
    """Outputs, final state and every gradient, the forward launched under ``fwd_table``, the backward under
    ``bwd_table``."""
    proj, dones, state, tick = case
    leaves = [x.detach().requires_grad_() for x in proj + state]
    with _table(fwd_table):
        out, final = agalite_recurrence(*leaves[:8], dones, *leaves[8:], tick, backend="triton")
    loss = (out.double() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum()
    loss = loss + sum((f.double() * (i + 1)).sum() for i, f in enumerate(final))
    with _table(bwd_table):
        return [out.detach(), *(f.detach() for f in final), *torch.autograd.grad(loss, leaves)]


@needs_kernels
@pytest.mark.interpret
def test_chunk_changed_between_forward_and_backward_gives_identical_results():
    """Forward checkpoints every 3 steps; the table then says 32 (and other warps) for the backward."""
    case = make_case(2, 11, 2, 5, 3, 2, dones="mixed", seed=7)
    want = grads_of(case)
    got = grads_of(case, fwd_table=uniform(chunk=3), bwd_table=uniform(chunk=32, num_warps=8))
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"tensor {i} differs when the chunk changes between forward and backward"


@needs_kernels
@pytest.mark.interpret
@pytest.mark.parametrize("split", [2, 4])
def test_backward_split_matches_unsplit(split):
    """ETA_PAD = 4: split 2 gives each program two feature rows, split 4 one (eta = 3: one is padding)."""
    case = make_case(2, 6, 2, 5, 3, 3, dones="mixed", seed=8)
    want = grads_of(case)
    with config.use_table({"backward": {c: LaunchConfig(2, split=split) for c in SIZE_CLASSES}}):
        got = grads_of(case)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= 1e-6, (i, rel_err(a, b))


@needs_kernels
@pytest.mark.interpret
def test_pipelining_stages_change_no_result():
    case = make_case(1, 5, 2, 4, 2, 2, dones="first", seed=9)
    want = grads_of(case)
    with config.use_table(uniform(num_stages=3)):
        got = grads_of(case)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
