"""Kernel side of ``slots`` (stepping rows of a larger state through an index) and ``restart`` (restart
memories loaded at chosen steps, gradients cut there and written to the restart memories).

The oracles are plain loops over the reference backend: gathering the slot rows and stepping them as
a batch of their own, and running each row in pieces split at its restart points. Every kernel output
is NaN-poisoned, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from agalite_triton import agalite_recurrence, kernels
from agalite_triton.kernels import config
from agalite_triton.kernels.config import SIZE_CLASSES, LaunchConfig

from .test_kernels import KERNEL_DEVICE, make_case, rel_err
from .test_restart_slots import split_oracle

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.usefixtures("poison_outputs"),
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
]
DEV = KERNEL_DEVICE


# ---------------------------------------------------------------------------------------------- slots
def slot_case(steps: int, dones_dtype=torch.bool):
    """A state of 6 rows (non-zero, distinct ticks); 3 of them stepped, unsorted."""
    proj, dones, _, _ = make_case(3, steps, 2, 5, 3, 3, dones="mixed", seed=11)
    _, _, state, tick = make_case(6, 1, 2, 5, 3, 3, seed=12, tick=[7, -(2**62), 2**62 + 3, 0, 41, -1])
    dones[1, 0] = True
    slots = torch.tensor([4, 0, 2], device=DEV)
    return proj, dones.to(dones_dtype), state, tick, slots


@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("dones_dtype", [torch.bool, torch.float32])
def test_slots_in_place_match_stepping_those_rows_alone(steps, dones_dtype):
    proj, dones, state, tick, slots = slot_case(steps, dones_dtype)
    before = [x.clone() for x in state]
    live = [x.clone() for x in state]
    with torch.no_grad():
        out, final = agalite_recurrence(*proj, dones, *live, tick, final_out=tuple(live), slots=slots,
                                        backend="triton")  # fmt: skip
        rows = [x.index_select(0, slots) for x in before]
        alone_out, alone = agalite_recurrence(*proj, dones, *rows, tick.index_select(0, slots), backend="triton")
        ref_out, ref = agalite_recurrence(*proj, dones, *rows, tick.index_select(0, slots), backend="reference")
    assert all(a is b for a, b in zip(final, live))
    # Bitwise the same kernel arithmetic as a call on those environments alone.
    assert torch.equal(out, alone_out)
    others = torch.tensor([i for i in range(6) if i not in slots.tolist()], device=DEV)
    for got, lone, want, orig in zip(live, alone, ref, before):
        assert torch.equal(got.index_select(0, slots), lone)
        assert rel_err(got.index_select(0, slots), want) <= 1e-5
        assert torch.equal(got.index_select(0, others), orig.index_select(0, others))
    assert rel_err(out, ref_out) <= 1e-5


def test_slots_into_other_buffers_leave_their_other_rows():
    proj, dones, state, tick, slots = slot_case(3)
    bufs = tuple(torch.full_like(x, -3.0) for x in state)
    with torch.no_grad():
        agalite_recurrence(*proj, dones, *state, tick, final_out=bufs, slots=slots, backend="triton")
        _, want = agalite_recurrence(*proj, dones, *(x.index_select(0, slots) for x in state),
                                     tick.index_select(0, slots), backend="reference")  # fmt: skip
    mask = torch.zeros(6, dtype=torch.bool, device=DEV)
    mask[slots] = True
    for buf, w in zip(bufs, want):
        assert rel_err(buf[slots], w) <= 1e-5
        assert (buf[~mask] == -3.0).all()


# -------------------------------------------------------------------------------------------- restart
def restart_case(steps: int = 8):
    proj, dones, state, tick = make_case(3, steps, 2, 5, 3, 3, dones="none", seed=21, tick=[5, 2**62 + 1, -9])
    _, _, rmem, _ = make_case(4, 1, 2, 5, 3, 3, seed=22)
    rtick = torch.tensor([1, -40, 2**61 + 7, 3], device=DEV)
    index = torch.full((3, steps), -1, device=DEV)
    index[0, 0], index[0, 3] = 1, 0  # t = 0 overrides the initial state; a restart on a chunk boundary
    index[1, 4], index[1, 5], index[1, 7] = 2, 3, 2  # consecutive restarts; a row used twice by one batch row
    dones = torch.zeros(3, steps, dtype=torch.bool, device=DEV)
    dones[0, 3] = dones[1, 2] = dones[2, 5] = True  # a done at a restart point, before one, in a plain row
    return proj, dones, state, tick, index, rmem, rtick


def run_with_grads(fn, proj, state, rmem, seed=3):
    leaves = [x.detach().clone().requires_grad_() for x in proj + state + rmem]
    out, final = fn(leaves[:8], leaves[8:11], leaves[11:])
    g = torch.Generator().manual_seed(seed)
    loss = sum((torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEV) * t.double()).sum()
               for t in (out, *final))  # fmt: skip
    return [out.detach(), *(f.detach() for f in final), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize(
    "table",
    [
        pytest.param({}, id="defaults"),
        # Chunks of 3: the restart at t = 3 sits on a checkpoint, the one at t = 4 inside a chunk; the
        # backward splits the feature rows over 2 programs, each accumulating its restart gradients.
        pytest.param({k: {c: LaunchConfig(2, chunk=3, split=2) for c in SIZE_CLASSES} for k in config.KERNELS},
                     id="chunk3-split2"),
    ],
)  # fmt: skip
def test_restart_kernel_matches_split_rows_with_every_gradient(table):
    proj, dones, state, tick, index, rmem, rtick = restart_case()

    def kernel(p, st, rm):
        return agalite_recurrence(*p, dones, *st, tick, restart=(index, *rm, rtick), backend="triton")

    with config.use_table(table):
        got = run_with_grads(kernel, proj, state, rmem)
    want = run_with_grads(lambda p, st, rm: split_oracle(p, dones, st, tick, index, rm, rtick), proj, state, rmem)
    names = ["out", "tk", "tv", "s"] + [f"d{i}" for i in range(8)] + ["dtk0", "dtv0", "ds0", "dtk_r", "dtv_r", "ds_r"]
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b, floor=1e-30) <= (1e-5 if name[0] != "d" else 1e-4), (name, rel_err(a, b))
    # Row 0 restarts at t = 0, so nothing reaches its initial state; row 3 of the restart memories is
    # used once (at a step right after another restart), row 2 twice.
    assert all(float(g[0].abs().max()) == 0 for g in got[12:15])
    assert all(float(g.abs().max()) > 0 for g in got[15:])


def test_restart_one_step_inference_writes_into_the_state():
    proj, dones, state, tick, index, rmem, rtick = restart_case()
    proj, dones, index = [p[:, :1] for p in proj], dones[:, :1], index[:, :1].clone()
    index[2, 0] = 3  # rows 0 and 2 restart, row 1 steps its own state
    live = [x.clone() for x in state]
    with torch.no_grad():
        out, final = agalite_recurrence(*proj, dones, *live, tick, restart=(index, *rmem, rtick),
                                        final_out=tuple(live), backend="triton")  # fmt: skip
        want_out, want = split_oracle(proj, dones, state, tick, index, rmem, rtick)
    assert all(a is b for a, b in zip(final, live))
    assert rel_err(out, want_out) <= 1e-5
    for a, b in zip(live, want):
        assert rel_err(a, b) <= 1e-5


def test_custom_ops_with_restart_and_slots_pass_opcheck():
    """Schema, fake implementations and autograd registration with the new optional arguments."""
    ops = torch.ops.agalite_triton
    proj, dones, state, tick, index, rmem, rtick = restart_case()
    leaves = [x.detach().clone().requires_grad_() for x in proj + state + rmem]
    torch.library.opcheck(ops.recurrence_fwd, (*leaves[:8], dones, *leaves[8:11], tick, 1e-5, True, 3, index,
                                               *leaves[11:], rtick))  # fmt: skip
    sproj, sdones, sstate, stick, slots = slot_case(3)
    bufs = [x.clone() for x in sstate]
    torch.library.opcheck(ops.recurrence_into, (*sproj, sdones, *sstate, stick, 1e-5, *bufs, slots))
    step = [p[:, 0] for p in sproj]
    torch.library.opcheck(ops.step_into, (*step, sdones[:, 0], *sstate, stick, 1e-5, *bufs, slots))
