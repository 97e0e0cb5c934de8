"""The one-step kernel: T single steps equal one T-step call, in place and out of place, and the model
runs on the kernel backend step by step and over sequences."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from agalite_triton import AGaLiTe, agalite_recurrence, kernels
from agalite_triton.kernels import agalite_step_, launch
from agalite_triton.kernels.step import step_forward

from .test_kernels import KERNEL_DEVICE, make_case, rel_err

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.usefixtures("poison_outputs"),
    pytest.mark.skipif(not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.WHY}"),
]
CUDA = torch.cuda.is_available()
# The kernel device: CUDA where there is a GPU (natively compiled kernels), else CPU (the interpreter).
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu) if CUDA else "cpu"]


def sequence_reference(proj, dones, state, tick):
    with torch.no_grad():
        return agalite_recurrence(*proj, dones, *state, tick, backend="reference")


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_steps_equal_one_sequence_call(device):
    steps = 9
    proj, dones, state, tick = make_case(3, steps, 2, 5, 3, 7, device=device, dones="mixed", tick=[4, 2**40 + 1, -3])
    dones[0, 0] = dones[1, steps - 1] = True
    out_seq, final_seq = sequence_reference(proj, dones, state, tick)

    # The state lives inside a stacked (L, B, ...) buffer, as in AGaLiTeState: only layer 1 may change.
    stacked = [torch.stack([torch.full_like(x, 7.0), x.clone(), torch.full_like(x, -7.0)]) for x in state]
    live = [x[1] for x in stacked]
    outs = []
    with torch.no_grad():
        for t in range(steps):
            step_proj = [p[:, t] for p in proj]
            outs.append(agalite_step_(*step_proj, dones[:, t], *live, tick + t))
    out_steps = torch.stack(outs, dim=1)
    assert rel_err(out_steps, out_seq) <= 1e-5
    for got, want in zip(live, final_seq):
        assert rel_err(got, want) <= 1e-5
    for x in stacked:
        assert (x[0] == 7.0).all() and (x[2] == -7.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_t1_calls_equal_one_sequence_call(device):
    """agalite_recurrence with T = 1 and no grad takes the out-of-place step kernel."""
    steps = 7
    proj, dones, state, tick = make_case(2, steps, 2, 6, 4, 3, device=device, dones="consecutive")
    out_seq, final_seq = sequence_reference(proj, dones, state, tick)
    cur = [x.clone() for x in state]
    before = [x.clone() for x in cur]
    outs = []
    with torch.no_grad():
        for t in range(steps):
            out, new = agalite_recurrence(
                *[p[:, t : t + 1] for p in proj], dones[:, t : t + 1], *cur, tick + t, backend="triton"
            )
            for a, b in zip(cur, before):  # out of place: the argument state is untouched
                assert torch.equal(a, b)
            outs.append(out)
            cur = list(new)
            before = [x.clone() for x in cur]
    assert rel_err(torch.cat(outs, dim=1), out_seq) <= 1e-5
    for got, want in zip(cur, final_seq):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("steps", [1, 5])
def test_final_out_buffers_receive_the_state(steps):
    """triton_recurrence(final_out=...) writes the final state into the caller's buffers (slots of a
    stacked state, as a rollout passes them) and returns them; the argument state is untouched."""
    proj, dones, state, tick = make_case(2, steps, 2, 5, 3, 3, dones="first")
    out_ref, final_ref = sequence_reference(proj, dones, state, tick)
    stacked = [torch.full((2, *x.shape), float("nan"), device=x.device) for x in state]
    slots = tuple(x[1] for x in stacked)
    before = [x.clone() for x in state]
    with torch.no_grad():
        out, final = kernels.triton_recurrence(*proj, dones, *state, tick, final_out=slots)
    assert all(a is b for a, b in zip(final, slots))
    assert rel_err(out, out_ref) <= 1e-5
    for got, want in zip(slots, final_ref):
        assert rel_err(got, want) <= 1e-5
    for x in stacked:
        assert torch.isnan(x[0]).all()
    for a, b in zip(state, before):
        assert torch.equal(a, b)


def test_step_without_dones_and_zero_state():
    proj, _, state, tick = make_case(2, 1, 3, 5, 2, 2, dones="none", init="zero")
    out_ref, final_ref = sequence_reference(proj, None, state, tick)
    live = [x.clone() for x in state]
    with torch.no_grad():
        out = agalite_step_(*[p[:, 0] for p in proj], None, *live, tick)
    assert out.dtype == proj[0].dtype and out.shape == (2, 3, 5)
    assert rel_err(out, out_ref[:, 0]) <= 1e-5
    for got, want in zip(live, final_ref):
        assert rel_err(got, want) <= 1e-5


def test_step_validation_names_the_argument():
    proj, _, state, tick = make_case(2, 1, 2, 5, 3, 2, dones="none")
    step_proj = [p[:, 0] for p in proj]
    with pytest.raises(ValueError, match="values"):
        agalite_step_(*step_proj[:2], step_proj[2][:, :, :4], *step_proj[3:], None, *state, tick)
    with pytest.raises(ValueError, match="dones"):
        agalite_step_(*step_proj, torch.zeros(3, dtype=torch.bool), *state, tick)
    with pytest.raises(TypeError, match="tick"):
        agalite_step_(*step_proj, None, *state, tick.float())
    strided = torch.zeros(state[1].shape + (2,), device=state[1].device)[..., 0]
    with pytest.raises(ValueError, match="tilde_v.*stride"):
        agalite_step_(*step_proj, None, state[0], strided, state[2], tick)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_step_is_cuda_graph_capturable():
    proj, dones, state, tick = make_case(4, 1, 2, 64, 4, 2, device="cuda", dones="mixed")
    step_proj = [p[:, 0].contiguous() for p in proj]
    d = dones[:, 0].clone()
    live = [x.clone() for x in state]
    ref_state = [x.clone() for x in state]
    agalite_step_(*step_proj, d, *[x.clone() for x in state], tick)  # warm-up: compile, cache the table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = agalite_step_(*step_proj, d, *live, tick)
    for _ in range(3):
        graph.replay()
        want, ref_state = agalite_recurrence(*[p.unsqueeze(1) for p in step_proj], d[:, None], *ref_state, tick,
                                             backend="reference")  # fmt: skip
        assert rel_err(out, want[:, 0]) <= 1e-5
        for got, exp in zip(live, ref_state):
            assert rel_err(got, exp) <= 1e-5


def tiny_model(backend: str, r: int = 3) -> AGaLiTe:
    torch.manual_seed(0)
    model = AGaLiTe(6, d_model=16, n_layers=2, n_heads=2, d_head=6, d_ffc=20, eta=3, r=r, backend=backend)
    return model.to(KERNEL_DEVICE)


def test_model_on_kernel_backend_matches_reference():
    """AGaLiTe(backend='triton'): sequence outputs, final state and parameter gradients match."""
    ref, ker = tiny_model("reference"), tiny_model("triton")
    x = torch.randn(2, 9, 6, device=KERNEL_DEVICE)
    dones = torch.zeros(2, 9, dtype=torch.bool, device=KERNEL_DEVICE)
    dones[1, 4] = True
    state = ref.initial_state(2, device=KERNEL_DEVICE)
    y_ref, s_ref = ref(x, state, dones)
    y_ker, s_ker = ker(x, state, dones)
    assert rel_err(y_ker, y_ref) <= 1e-5
    for a, b in zip(s_ker, s_ref):
        assert rel_err(a, b) <= 1e-5
    y_ref.square().sum().backward()
    y_ker.square().sum().backward()
    for (name, p_ref), p_ker in zip(ref.named_parameters(), ker.parameters()):
        assert rel_err(p_ker.grad, p_ref.grad) <= 1e-4, name


def test_model_single_steps_on_kernel_backend_match_sequence():
    ref, ker = tiny_model("reference", r=7), tiny_model("triton", r=7)
    x = torch.randn(3, 6, 6, device=KERNEL_DEVICE)
    dones = torch.zeros(3, 6, dtype=torch.bool, device=KERNEL_DEVICE)
    dones[0, 2] = dones[2, 5] = True
    with torch.no_grad():
        y_seq, s_seq = ref(x, ref.initial_state(3, device=KERNEL_DEVICE), dones)
        state = ker.initial_state(3, device=KERNEL_DEVICE)
        ys = []
        for t in range(6):
            y, state = ker(x[:, t], state, dones[:, t])
            ys.append(y)
    assert rel_err(torch.stack(ys, dim=1), y_seq) <= 1e-5
    for a, b in zip(state, s_seq):
        assert rel_err(a, b) <= 1e-5


def test_model_in_place_steps_on_kernel_backend_match_reference():
    """model(x, state, dones, out=state): the kernels write the new memory over the one they read."""
    ref, ker = tiny_model("reference", r=3), tiny_model("triton", r=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, generator=g).to(KERNEL_DEVICE)
    dones = (torch.rand(3, 5, generator=g) < 0.3).to(KERNEL_DEVICE)
    start = ref.initial_state(3, device=KERNEL_DEVICE)
    start = start._replace(tilde_k=torch.rand(start.tilde_k.shape, generator=g).to(KERNEL_DEVICE),
                           tick=torch.tensor([1, 9, 2**40], device=KERNEL_DEVICE))  # fmt: skip
    with torch.no_grad():
        y_seq, s_seq = ref(x, start, dones)
        state, ys = start.clone(), []
        for t in range(5):
            y, returned = ker(x[:, t], state, dones[:, t], out=state)
            assert returned is state
            ys.append(y)
        whole = start.clone()
        y_whole, _ = ker(x, whole, dones, out=whole)
    assert rel_err(torch.stack(ys, dim=1), y_seq) <= 1e-5 and rel_err(y_whole, y_seq) <= 1e-5
    for a, b, c in zip(state, whole, s_seq):
        assert rel_err(a, c) <= 1e-5 and rel_err(b, c) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_whole_model_step_is_cuda_graph_capturable():
    """An acting step of the model (every layer's one-step kernel, the tick advance) replays from a
    CUDA graph and matches eager single steps of the reference backend."""
    model, ref = tiny_model("triton").cuda(), tiny_model("reference").cuda()
    xs = torch.randn(4, 3, 6, device="cuda")
    dones = torch.tensor([[True, False, False], [False, True, False], [False, False, True]] + [[False] * 3],
                         device="cuda")  # fmt: skip
    x_in, d_in = xs[:, 0].clone(), dones[:, 0].clone()
    state = model.initial_state(4, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile the kernels, cache the oscillator tables
            model(x_in, state, d_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_out, state_out = model(x_in, state, d_in)
        ref_state = ref.initial_state(4, device="cuda")
        for t in range(3):
            x_in.copy_(xs[:, t])
            d_in.copy_(dones[:, t])
            graph.replay()
            y_ref, ref_state = ref(xs[:, t], ref_state, dones[:, t])
            assert rel_err(y_out, y_ref) <= 1e-5
            for a, b in zip(state_out[:3], ref_state[:3]):
                assert rel_err(a, b) <= 1e-5
            assert torch.equal(state_out.tick, ref_state.tick)
            for dst, src in zip(state, state_out):
                dst.copy_(src)


class _AtenOps(TorchDispatchMode):
    """Records every aten op that runs on tensors (kernel launches of Triton are not aten ops)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands in for a Triton kernel: counts launches and hides the launch itself (the interpreter's
    copies of the arguments) from the op recorder."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches += 1
            with _disable_current_modes():
                return launch(*args, **kwargs)

        return run


# Allocation of the read-out and views: nothing that launches a device kernel.
_NO_LAUNCH_OPS = {"empty", "new_empty", "select", "view", "unsqueeze", "slice", "as_strided", "expand", "alias"}


@pytest.mark.parametrize("dones_kind", ["bool_column", "float", "none"])
def test_one_step_launches_only_the_step_kernel(dones_kind, monkeypatch):
    """Dones (a bool column of (B, T) dones, or floats) and the raw tick go to the kernel as they are:
    no conversion, copy or remainder op runs beside the step kernel, in the launcher and in the T = 1
    dispatch of triton_recurrence (the model's acting path) alike."""
    from agalite_triton.kernels import step as step_module

    monkeypatch.setattr(launch, "POISON_OUTPUTS", False)  # the NaN fill is a test-only op
    counted = _CountedKernel(step_module._step_kernel)
    monkeypatch.setattr(step_module, "_step_kernel", counted)
    proj, dones, state, tick = make_case(3, 2, 2, 5, 3, 3, dones="mixed", tick=[-(2**63), 2**63 - 1, -7])
    col = {"bool_column": dones[:, :1], "float": dones[:, :1].float(), "none": None}[dones_kind]
    live = [x.clone() for x in state]
    with torch.no_grad():
        want, want_state = sequence_reference([p[:, :1] for p in proj], col, state, tick)
        with _AtenOps() as rec:
            out = step_forward(*(p[:, 0] for p in proj), None if col is None else col[:, 0], *live, tick, 1e-5,
                               in_place=True)[0]  # fmt: skip
        assert set(rec.ops) <= _NO_LAUNCH_OPS, rec.ops
        assert counted.launches == 1
        assert rel_err(out, want[:, 0]) <= 1e-5
        for a, b in zip(live, want_state):
            assert rel_err(a, b) <= 1e-5
        with _AtenOps() as rec:
            kernels.triton_recurrence(*(p[:, :1] for p in proj), col, *live, tick, final_out=tuple(live))
        assert set(rec.ops) - {"step_into"} <= _NO_LAUNCH_OPS, rec.ops
        assert counted.launches == 2


def test_step_tick_residue_in_kernel_for_extreme_ticks():
    """tick mod P taken in the kernel: negative ticks, -2**63 and 2**63 - 1 (where tick + 1 overflows),
    read through a strided view of the ticks (the kernels take the tick's stride)."""
    ticks = [-(2**63), 2**63 - 1, -1, -15, 0, 13]
    proj, dones, state, tick = make_case(6, 1, 1, 3, 2, 8, dones="none", tick=ticks)  # R = 8: P = 14
    tick = torch.stack([tick, torch.zeros_like(tick)], 1)[:, 0]
    assert tick.stride() == (2,)
    with torch.no_grad():
        want, want_state = sequence_reference(proj, None, state, tick)
        out, got_state = kernels.triton_recurrence(*proj, None, *state, tick)
    assert rel_err(out, want) <= 1e-5
    for a, b in zip(got_state, want_state):
        assert rel_err(a, b) <= 1e-5


def test_oscillator_table_first_built_under_graph_capture_raises(monkeypatch):
    """Building the table is a host-to-device copy; during a CUDA-graph capture a clear error says to
    build it first. A table built before the capture is simply returned."""
    from agalite_triton import oscillator

    monkeypatch.setattr(oscillator, "_TABLES", {})
    built = oscillator.oscillator_table(5, "cpu")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured; build it before capturing"):
        oscillator.oscillator_table(5, "cuda")
    assert oscillator.oscillator_table(5, "cpu") is built
    fake = torch.empty(0)
    oscillator._TABLES[(5, torch.device("cuda", 0))] = fake  # as if built before the capture
    assert oscillator.oscillator_table(5, "cuda") is fake
    assert oscillator.oscillator_table(5, torch.device("cuda", 0)) is fake


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_step_capture_without_a_warm_table_raises_clearly():
    from agalite_triton import oscillator

    proj, dones, state, tick = make_case(2, 1, 2, 8, 2, 5, device="cuda", dones="mixed")
    oscillator._TABLES.pop((5, torch.device("cuda", torch.cuda.current_device())), None)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="build it before capturing"):
        with torch.cuda.graph(graph):
            agalite_step_(*[p[:, 0] for p in proj], dones[:, 0], *state, tick)
