import pytest
import torch

from agalite_triton import AGaLiTe, AGaLiTeState
from agalite_triton.rl import SegmentStates

# Bit-exactness needs every matmul to compute each row the same way in the rollout (num_envs rows) and
# in the replay (rows * segment_len rows). The model's scan and elementwise ops do, whatever the shapes;
# MKL's CPU sgemm does not for very small row counts (measured with torch 2.13 / MKL 2024.2: a row
# differs when M <= 3 at 1 thread and M in 1-3, 5-7, 9-11 at 2 threads), so the rollout here uses 16
# envs; test_small_rollout_batch_matches_to_rounding covers the small-batch case.
NUM_ENVS, NUM_STEPS, SEGMENT_LEN, INPUT_DIM = 16, 24, 8, 5


def _model() -> AGaLiTe:
    # Two layers, so the second layer's input depends on the first layer's replayed state too.
    torch.manual_seed(0)
    return AGaLiTe(INPUT_DIM, d_model=16, n_layers=2, n_heads=2, d_head=8, d_ffc=24, eta=2, r=3,
                   backend="reference").eval()


def _rollout_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_STEPS, NUM_ENVS, INPUT_DIM, generator=gen)
    dones = torch.rand(NUM_STEPS, NUM_ENVS, generator=gen) < 0.2
    # Include a done at a segment start and one at the very first step.
    dones[SEGMENT_LEN, 0] = True
    dones[0, 1] = True
    return x, dones


def _rollout(model, state, x, dones, segs, step_fn):
    outputs = []
    for step in range(x.shape[0]):
        segs.record(step, state)
        y, state = step_fn(model, x[step], state, dones[step])
        outputs.append(y)
    return torch.stack(outputs), state


def _replay_all(model, segs, x, dones, outputs, to_model_state, exact=True):
    gen = torch.Generator().manual_seed(2)
    checked = 0
    for env_idx, seg_idx in segs.minibatches(3, gen):
        init = to_model_state(segs.initial_states(env_idx, seg_idx))
        y, _ = model(segs.rows(x, env_idx, seg_idx), init, segs.rows(dones, env_idx, seg_idx))
        expected = segs.rows(outputs, env_idx, seg_idx)
        assert y.shape == expected.shape
        if exact:
            assert torch.equal(y, expected), f"max diff {(y - expected).abs().max().item()}"
        else:
            torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
        checked += env_idx.numel()
    assert checked == segs.num_rows


def _state_with_history(model: AGaLiTe, num_envs: int = NUM_ENVS) -> AGaLiTeState:
    # A non-zero memory and distinct ticks per env, so a wrong row or tick cannot pass unnoticed.
    gen = torch.Generator().manual_seed(3)
    warm = torch.randn(num_envs, 7, INPUT_DIM, generator=gen)
    with torch.no_grad():
        _, state = model(warm, model.initial_state(num_envs))
    return state._replace(tick=state.tick + torch.arange(num_envs) * 5)


@torch.no_grad()
def test_replay_from_stored_states_is_bit_exact():
    model = _model()
    x, dones = _rollout_data()
    segs = SegmentStates(NUM_ENVS, NUM_STEPS, SEGMENT_LEN)
    outputs, _ = _rollout(model, _state_with_history(model), x, dones, segs,
                          lambda m, xt, st, dt: m(xt, st, dt))
    _replay_all(model, segs, x, dones, outputs, lambda st: st)


@torch.no_grad()
def test_replay_from_packed_states_is_bit_exact():
    model = _model()
    x, dones = _rollout_data(seed=4)
    segs = SegmentStates(NUM_ENVS, NUM_STEPS, SEGMENT_LEN)

    def step(m, xt, packed, dt):
        y, st = m(xt, m.unpack_state(packed), dt)
        return y, m.pack_state(st)

    outputs, _ = _rollout(model, model.pack_state(_state_with_history(model)), x, dones, segs, step)
    _replay_all(model, segs, x, dones, outputs, model.unpack_state)


@torch.no_grad()
def test_replay_after_in_place_rollout_is_bit_exact():
    # model(..., out=state) overwrites the state each step, so record() must keep a copy.
    model = _model()
    x, dones = _rollout_data(seed=5)
    segs = SegmentStates(NUM_ENVS, NUM_STEPS, SEGMENT_LEN)
    outputs, _ = _rollout(model, _state_with_history(model), x, dones, segs,
                          lambda m, xt, st, dt: m(xt, st, dt, out=st))
    _replay_all(model, segs, x, dones, outputs, lambda st: st)


@torch.no_grad()
def test_small_rollout_batch_matches_to_rounding():
    # With 6 envs the rollout's one-step matmuls go through sgemm's small-M path (see the note at the
    # top), so replay agrees only to float32 rounding; everything else is as above.
    model = _model()
    x, dones = _rollout_data()
    x, dones = x[:, :6], dones[:, :6]
    segs = SegmentStates(6, NUM_STEPS, SEGMENT_LEN)
    outputs, _ = _rollout(model, _state_with_history(model, 6), x, dones, segs,
                          lambda m, xt, st, dt: m(xt, st, dt))
    _replay_all(model, segs, x, dones, outputs, lambda st: st, exact=False)


@torch.no_grad()
def test_replay_fails_without_dones_or_from_zero_state():
    # The equality above must be able to fail: dropping the dones, or restarting each segment from
    # zero memory (the earlier port's mistake), changes the outputs.
    model = _model()
    x, dones = _rollout_data()
    segs = SegmentStates(NUM_ENVS, NUM_STEPS, SEGMENT_LEN)
    outputs, _ = _rollout(model, _state_with_history(model), x, dones, segs,
                          lambda m, xt, st, dt: m(xt, st, dt))
    env_idx, seg_idx = torch.arange(NUM_ENVS), torch.ones(NUM_ENVS, dtype=torch.long)
    expected = segs.rows(outputs, env_idx, seg_idx)
    init = segs.initial_states(env_idx, seg_idx)
    y_no_dones, _ = model(segs.rows(x, env_idx, seg_idx), init)
    assert not torch.equal(y_no_dones, expected)
    y_zero, _ = model(segs.rows(x, env_idx, seg_idx), model.initial_state(NUM_ENVS),
                      segs.rows(dones, env_idx, seg_idx))
    assert not torch.equal(y_zero, expected)


def test_gradients_flow_from_replay():
    model = _model().train()
    x, dones = _rollout_data()
    segs = SegmentStates(NUM_ENVS, NUM_STEPS, SEGMENT_LEN)
    with torch.no_grad():
        _rollout(model, model.initial_state(NUM_ENVS), x, dones, segs, lambda m, xt, st, dt: m(xt, st, dt))
    env_idx, seg_idx = segs.minibatches(2, torch.Generator().manual_seed(0))[0]
    y, _ = model(segs.rows(x, env_idx, seg_idx), segs.initial_states(env_idx, seg_idx),
                 segs.rows(dones, env_idx, seg_idx))
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    stored = segs.initial_states(env_idx, seg_idx)
    assert not any(t.requires_grad for t in stored)


def _toy_step(x: torch.Tensor, h: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.9 * h * (1.0 - done.float()).unsqueeze(-1) + x)


def test_tensor_state_rows_and_layouts():
    # A batch-first tensor state (e.g. an LSTM's (h, c) stacked) goes through the same plumbing.
    num_envs, num_steps, seg = 3, 6, 2
    segs = SegmentStates(num_envs, num_steps, seg)
    x = torch.randn(num_steps, num_envs, 4)
    dones = torch.rand(num_steps, num_envs) < 0.3
    h = torch.randn(num_envs, 4)
    hs = []
    for step in range(num_steps):
        segs.record(step, h)
        h = _toy_step(x[step], h, dones[step])
        hs.append(h)
    hs = torch.stack(hs)
    env_idx, seg_idx = torch.tensor([2, 0, 1, 2]), torch.tensor([1, 2, 0, 0])
    init = segs.initial_states(env_idx, seg_idx)
    xr, dr = segs.rows(x, env_idx, seg_idx), segs.rows(dones, env_idx, seg_idx)
    assert xr.shape == (4, seg, 4) and dr.shape == (4, seg)
    for b in range(4):
        t0 = int(seg_idx[b]) * seg
        assert torch.equal(xr[b], x[t0 : t0 + seg, env_idx[b]])
    replay = []
    for t in range(seg):
        init = _toy_step(xr[:, t], init, dr[:, t])
        replay.append(init)
    assert torch.equal(torch.stack(replay, 1), segs.rows(hs, env_idx, seg_idx))
    batch_major = x.transpose(0, 1).contiguous()
    assert torch.equal(segs.rows(batch_major, env_idx, seg_idx, time_major=False), xr)


def test_stored_state_is_a_copy():
    segs = SegmentStates(2, 2)
    h = torch.zeros(2, 3)
    segs.record(0, h)
    h.add_(1.0)
    segs.record(1, h)
    assert torch.equal(segs.initial_states(torch.tensor([0, 1]), torch.tensor([0, 0])), torch.zeros(2, 3))


def test_minibatches_cover_every_row_once():
    segs = SegmentStates(4, 12, 3)
    batches = segs.minibatches(8, torch.Generator().manual_seed(0))
    assert len(batches) == 8 and all(e.numel() == 2 for e, _ in batches)
    rows = {(int(e), int(s)) for env_idx, seg_idx in batches for e, s in zip(env_idx, seg_idx)}
    assert rows == {(e, s) for e in range(4) for s in range(4)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="segment_len"):
        SegmentStates(2, 10, 3)
    with pytest.raises(ValueError, match="num_envs"):
        SegmentStates(0, 10)
    segs = SegmentStates(2, 4, 2)
    with pytest.raises(ValueError, match="batch size"):
        segs.record(0, torch.zeros(3, 1))
    with pytest.raises(RuntimeError, match="out of order"):
        segs.record(2, torch.zeros(2, 1))
    segs.record(0, torch.zeros(2, 1))
    with pytest.raises(RuntimeError, match="record every step"):
        segs.initial_states(torch.tensor([0]), torch.tensor([0]))
    segs.record(2, torch.zeros(2, 1))
    with pytest.raises(IndexError, match="seg_idx"):
        segs.initial_states(torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(TypeError, match="env_idx"):
        segs.initial_states([0], torch.tensor([0]))
    with pytest.raises(ValueError, match="x: expected shape"):
        segs.rows(torch.zeros(2, 4), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_minibatches"):
        segs.minibatches(3)
    with pytest.raises(TypeError, match="state"):
        SegmentStates(2, 2).record(0, [torch.zeros(2)])
