"""EnvPool 1.2.5 in async mode (``batch_size < num_envs``): the example's loop steps the core with ``env_ids``.

A real async CartPole run returns subsets of environments, in no fixed order, with episodes ending and
restarting; the core steps exactly those rows of one big state in place. Replaying the recorded inputs
by stepping every environment alone, from its own state, gives the same features and final states
to float32 rounding (one-row matmuls round differently from the batch's, and the difference compounds
over the run: measured up to 5.9e-6 on features of magnitude 0.87 for AGaLiTe, 2.1e-5 for GaLiTe, whose
read-out divides by <s, Q>; stepping those rows together instead is bitwise, tests/test_restart_slots.py). Running the example's
MiniGrid memory task end to end checks the script itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("envpool", reason="needs the [envpool] extra (envpool 1.2.5)")

from .cores import KINDS, make_core  # noqa: E402
from .examples import EXAMPLES, load_example  # noqa: E402

EXAMPLE = EXAMPLES / "envpool_async.py"


@pytest.mark.parametrize("kind", KINDS)
def test_async_env_ids_equal_stepping_every_env_alone(kind):
    example = load_example("envpool_async.py")
    num_envs = 6
    env = example.make("CartPole-v1", num_envs=num_envs, batch_size=4, seed=0)
    model = make_core(kind, input_dim=4, d_model=16, n_layers=2, n_heads=2, d_head=4, d_ffc=16, eta=2, r=4, nu=2)
    head = torch.nn.Linear(16, 2)
    record = example.Record()
    stats = example.run(env, model, head, steps=60, seed=0, record=record)
    ids = torch.cat(record.ids)
    assert stats["frames"] == 240 and stats["episodes"] > 0
    assert any(not torch.equal(i, torch.arange(4)) for i in record.ids), "EnvPool returned no other subsets"
    assert torch.cat(record.starts)[num_envs:].any(), "no episode restarted during the run"

    # A wrong row or a missed done is off by the features' own magnitude (about 1).
    tol = dict(rtol=1e-5, atol=1e-5) if kind == "agalite" else dict(rtol=1e-4, atol=1e-4)
    alone = [model.initial_state(1) for _ in range(num_envs)]
    with torch.no_grad():
        for batch_ids, x, starts, feats in zip(record.ids, record.inputs, record.starts, record.features):
            for row, env_id in enumerate(batch_ids.tolist()):
                y, alone[env_id] = model(x[row : row + 1], alone[env_id], starts[row : row + 1])
                torch.testing.assert_close(feats[row : row + 1], y, **tol)
    final = model.state_class.cat(alone)
    for a, b in zip(stats["state"].memories(), final.memories()):
        torch.testing.assert_close(a, b, **tol)
    if model.has_tick:
        assert torch.equal(stats["state"].tick, final.tick)
        assert torch.equal(final.tick, 1 + torch.bincount(ids, minlength=num_envs))


@pytest.mark.parametrize("kind", KINDS)
def test_example_runs_on_the_minigrid_memory_task(kind):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--core", kind, "--num-envs", "8", "--batch-size", "3", "--steps", "40"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"MiniGrid-MemoryS7-v0 ({kind}): 120 env-steps" in proc.stdout
