"""The benchmark's baselines: GTrXL (recompute and kv_cache modes) and the done-resetting LSTM."""

from __future__ import annotations

import pytest
import torch

from bench.baselines import GTrXL, GTrXLKVState, GTrXLState, ResetLSTM

IN = 6
SIZES = dict(d_model=16, n_layers=2, n_heads=2, d_head=8, d_ff=12)


def _gtrxl(memory: int, seed: int = 0) -> GTrXL:
    torch.manual_seed(seed)
    model = GTrXL(IN, **SIZES, memory=memory)
    with torch.no_grad():
        # Push every parameter off its initial value, so that a mis-used one (u, v, the gate bias) shows.
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _steps(model: GTrXL, state, x: torch.Tensor, dones: torch.Tensor | None):
    outs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = model(x[:, t], state, None if dones is None else dones[:, t])
            outs.append(y)
    return torch.stack(outs, dim=1), state


def _data(B: int, T: int, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, IN, generator=gen), torch.rand(B, T, generator=gen) < p


def test_gtrxl_kv_cache_matches_recompute_across_dones_and_wrap():
    M, T = 4, 23  # the ring of M + 1 slots wraps four times
    model = _gtrxl(M)
    x, dones = _data(3, T, 0.15, 1)
    dones[0, 6] = dones[1, 0] = dones[2, T - 1] = True
    y_kv, kv = _steps(model, model.cache_state(3), x, dones)
    y_re, mem = _steps(model, model.memory_state(3), x, dones)
    assert isinstance(kv, GTrXLKVState) and isinstance(mem, GTrXLState)
    assert (y_kv - y_re).abs().max().item() <= 1e-5
    assert torch.equal(kv.since_done, mem.since_done)
    assert int(kv.head) == T % (M + 1)
    # The difference the test can see: the episodes differ, and the outputs are not all the same.
    assert y_re.std().item() > 0.1


def test_gtrxl_segment_equals_stepping_with_memory():
    M = 5
    model = _gtrxl(M, seed=1)
    x, dones = _data(3, 19, 0.15, 2)
    dones[1, 11] = True
    # Memory from an earlier segment, then a segment longer than the memory.
    _, start = model(x[:, :7], model.memory_state(3), dones[:, :7])
    with torch.no_grad():
        y_seg, end_seg = model(x[:, 7:], start, dones[:, 7:])
    y_step, end_step = _steps(model, start, x[:, 7:], dones[:, 7:])
    y_kv, _ = _steps(model, model.cache_state(3), x, dones)
    assert (y_seg - y_step).abs().max().item() <= 1e-5
    assert (end_seg.memory - end_step.memory).abs().max().item() <= 1e-5
    assert torch.equal(end_seg.since_done, end_step.since_done)
    assert (y_seg - y_kv[:, 7:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["recompute", "kv_cache", "segment"])
def test_gtrxl_done_forgets_the_past(mode):
    M, T, k = 4, 12, 6
    model = _gtrxl(M, seed=2)
    x1, _ = _data(2, T, 0.0, 3)
    x2, _ = _data(2, T, 0.0, 4)
    x2[:, k:] = x1[:, k:]  # different histories, the same episode from step k on
    dones = torch.zeros(2, T, dtype=torch.bool)
    dones[:, k] = True
    outs = []
    for x in (x1, x2):
        if mode == "segment":
            with torch.no_grad():
                y, _ = model(x, model.memory_state(2), dones)
        else:
            model.mode = mode
            y, _ = _steps(model, model.initial_state(2), x, dones)
        outs.append(y)
    assert (outs[0][:, k:] - outs[1][:, k:]).abs().max().item() <= 1e-5
    assert (outs[0][:, :k] - outs[1][:, :k]).abs().max().item() > 1e-3  # before the done they differ


def test_gtrxl_forward_backward_and_no_gradient_into_memory():
    model = _gtrxl(4, seed=3)
    x, dones = _data(2, 9, 0.1, 5)
    x.requires_grad_(True)
    state = model.memory_state(2)
    memory = torch.randn_like(state.memory).requires_grad_(True)
    y, new = model(x, GTrXLState(memory, torch.full_like(state.since_done, 4)), dones)
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert memory.grad is None  # the memory is carried without gradient
    assert not new.memory.requires_grad


def test_gtrxl_kv_cache_steps_with_autograd_on():
    # With autograd on, the ring is updated out of place, so backward through several steps works.
    model = _gtrxl(3, seed=4)
    x, dones = _data(2, 6, 0.2, 6)
    state = model.cache_state(2)
    before = state.keys.clone()
    loss = 0
    for t in range(6):
        y, state = model(x[:, t], state, dones[:, t])
        loss = loss + y.square().sum()
    loss.backward()
    assert model.layers[0].u.grad is not None and model.layers[0].u.grad.abs().sum() > 0
    assert torch.equal(model.cache_state(2).keys, before)  # the initial ring was not written


def test_gtrxl_state_bytes():
    model = GTrXL(IN, **SIZES, memory=7)
    L, d, H, Dh = SIZES["n_layers"], SIZES["d_model"], SIZES["n_heads"], SIZES["d_head"]
    assert model.state_bytes_per_env == 4 * L * 7 * d + 8
    model.mode = "kv_cache"
    assert model.state_bytes_per_env == 2 * 4 * L * H * 8 * Dh + 8


def test_gtrxl_bad_inputs_name_the_argument():
    model = GTrXL(IN, **SIZES, memory=4)
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.randn(2, 3, IN + 1))
    with pytest.raises(ValueError, match="dones: expected shape"):
        model(torch.randn(2, 3, IN), None, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="state.memory: expected shape"):
        model(torch.randn(3, IN), model.memory_state(2))
    with pytest.raises(ValueError, match="state.keys: expected shape"):
        model(torch.randn(3, IN), model.cache_state(2))
    with pytest.raises(ValueError, match="mode"):
        GTrXL(IN, mode="cached")


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_resets_and_matches_stepping(layers):
    torch.manual_seed(0)
    lstm = ResetLSTM(IN, 10, layers)
    x, dones = _data(3, 15, 0.2, 7)
    dones[2, 9] = True
    state = lstm.initial_state(3)
    state = type(state)(torch.randn_like(state.h), torch.randn_like(state.c))
    y_seq, end_seq = lstm(x, state, dones)
    outs, s = [], state
    with torch.no_grad():
        for t in range(15):
            y, s = lstm(x[:, t], s, dones[:, t])
            outs.append(y)
    assert (y_seq - torch.stack(outs, 1)).abs().max().item() <= 1e-5
    assert (end_seq.h - s.h).abs().max().item() <= 1e-5
    # After environment 2's done at step 9, its outputs are those of a fresh start.
    fresh, _ = lstm(x[2:, 9:], lstm.initial_state(1))
    assert (y_seq[2:, 9:] - fresh).abs().max().item() <= 1e-5
    y_seq.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lstm.parameters())
    assert lstm.state_bytes_per_env == 2 * 4 * layers * 10


def test_lstm_bad_state_names_the_argument():
    lstm = ResetLSTM(IN, 10)
    with pytest.raises(ValueError, match="state.h: expected shape"):
        lstm(torch.randn(2, IN), lstm.initial_state(3))
