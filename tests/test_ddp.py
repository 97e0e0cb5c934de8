"""AGaLiTe under DistributedDataParallel: 2 CPU processes (gloo) give the single-process gradient."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from agalite_triton import AGaLiTe

WORLD = 2
BATCH, STEPS, INPUT_DIM = 5, 6, 7
# Rank r takes rows SPLITS[r]; unequal on purpose, so that the loss scaling below is exercised.
SPLITS = (slice(0, 3), slice(3, 5))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model() -> AGaLiTe:
    torch.manual_seed(0)
    return AGaLiTe(INPUT_DIM, d_model=16, n_layers=2, n_heads=2, d_head=8, d_ffc=24, eta=2, r=3,
                   backend="reference")


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, STEPS, INPUT_DIM, generator=gen)
    dones = torch.rand(BATCH, STEPS, generator=gen) < 0.25
    target = torch.randn(BATCH, STEPS, 16, generator=gen)
    model = _model()
    with torch.no_grad():
        _, state = model(torch.randn(BATCH, 4, INPUT_DIM, generator=gen), model.initial_state(BATCH))
    return x, dones, target, state


def _loss_sum(model, x, dones, target, state) -> torch.Tensor:
    y, _ = model(x, state, dones)
    return ((y - target) ** 2).mean(dim=(1, 2)).sum()


def _worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ddp = DistributedDataParallel(_model())
        x, dones, target, state = _batch()
        rows = SPLITS[rank]
        # DDP averages gradients over ranks, so scale each rank's sum by WORLD / global batch: the average
        # is then the gradient of the mean over the whole batch, even with unequal shards.
        loss = _loss_sum(ddp, x[rows], dones[rows], target[rows], state.select(rows)) * WORLD / BATCH
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in ddp.module.named_parameters()}
        torch.save(grads, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)

    model = _model()
    x, dones, target, state = _batch()
    (_loss_sum(model, x, dones, target, state) / BATCH).backward()
    reference = {name: p.grad for name, p in model.named_parameters()}

    per_rank = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    assert set(per_rank[0]) == set(reference)
    for name, ref in reference.items():
        assert torch.equal(per_rank[0][name], per_rank[1][name]), f"{name}: ranks disagree after all-reduce"
        err = (per_rank[0][name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert scale > 0, f"{name}: zero reference gradient makes the check vacuous"
        assert err <= 1e-6 * scale, f"{name}: max |ddp - single| = {err:.3e}, max |single| = {scale:.3e}"

    # The check can fail: without the scaling (plain per-rank mean) the unequal shards give another gradient.
    model.zero_grad()
    sum(_loss_sum(model, x[r], dones[r], target[r], state.select(r)) / (r.stop - r.start) / WORLD
        for r in SPLITS).backward()
    naive = next(iter(model.parameters())).grad
    ref0 = next(iter(reference.values()))
    assert (naive - ref0).abs().max().item() > 1e-4 * ref0.abs().max().item()
