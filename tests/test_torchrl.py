"""TorchRL 0.14.1: a real Collector over real gymnasium CartPole (velocities masked, 16 envs, episodes
ending mid-batch), then GAE and ClipPPOLoss in recurrent mode over the batch.

What the replays must reproduce, bit for bit (one torch thread):
* the features and root values GAE computes equal what the collector computed frame by frame;
* GAE's next values equal an acting-mode step from each frame's stored ``("next", state)``; that pass
  has ``is_init`` set where the stored next state is mid-episode (GAE ORs the root's ``is_init`` into it);
* ClipPPOLoss's logits, log-probs and values equal the collector's (so its ratios are exactly 1);
* each replay is one model call over the whole (envs, T) batch: no padding, no splitting.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchrl", reason="needs the [torchrl] extra (torchrl 0.14.1)")
gym = pytest.importorskip("gymnasium", reason="needs gymnasium for the real environment")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import TensorDictModule as Mod  # noqa: E402
from tensordict.nn import TensorDictSequential as Seq  # noqa: E402
from torch.distributions import Categorical  # noqa: E402
from torchrl.collectors import Collector  # noqa: E402
from torchrl.envs import GymWrapper, InitTracker, SerialEnv, TransformedEnv  # noqa: E402
from torchrl.modules import ProbabilisticActor, set_recurrent_mode  # noqa: E402
from torchrl.objectives import ClipPPOLoss  # noqa: E402
from torchrl.objectives.value import GAE  # noqa: E402

from agalite_triton import AGaLiTe, GaLiTe  # noqa: E402
from agalite_triton.stack import RecurrentStack  # noqa: E402
from agalite_triton.torchrl import AGaLiTeModule  # noqa: E402

from .cores import KINDS, make_core  # noqa: E402
from .rl_envs import MaskedCartPole  # noqa: E402

NUM_ENVS, STEPS = 16, 16  # 16 rows keep every matmul on MKL's full-width path (see the README's RL section)
# Exact: the collector's one-step calls and the replays (restarts, with and without gradients) run the same
# recurrence code on CPU (fused, or eager with AGALITE_CPU_FUSED=0), so the replay reproduces every bit.
TOL = 0.0


def make_env():
    return GymWrapper(MaskedCartPole(gym.make("CartPole-v1")))


def build(core: RecurrentStack):
    env = TransformedEnv(SerialEnv(NUM_ENVS, make_env), InitTracker())
    module = AGaLiTeModule(core, "observation", "features")
    env.append_transform(module.make_tensordict_primer())
    env.set_seed(0)
    actor_head = torch.nn.Linear(core.d_model, 2)
    value_head = torch.nn.Linear(core.d_model, 1)
    actor = ProbabilisticActor(
        Seq(module, Mod(actor_head, in_keys=["features"], out_keys=["logits"])),
        in_keys=["logits"], distribution_class=Categorical, return_log_prob=True, spec=env.action_spec,
    )  # fmt: skip
    # The collector also records the value it would compute, under a key GAE does not skip.
    policy = Seq(actor, Mod(value_head, in_keys=["features"], out_keys=["collector_value"]))
    critic = Seq(module, Mod(value_head, in_keys=["features"], out_keys=["state_value"]))
    return env, module, actor, critic, policy, actor_head, value_head


def capture(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.register_forward_hook(lambda m, i, o: calls.append((i[0].detach().clone(), o.detach().clone())))
    return calls


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


TINY = dict(input_dim=2, d_model=16, n_layers=2, n_heads=2, d_head=4, d_ffc=16)
CORES = {
    "r2": lambda: AGaLiTe(**TINY, eta=2, r=2),
    "r5": lambda: AGaLiTe(**TINY, eta=3, r=5),
    "paper": lambda: AGaLiTe.from_preset("paper", input_dim=2),
    "galite": lambda: GaLiTe(**TINY, nu=3),
}


@pytest.mark.parametrize("name", sorted(CORES))
def test_collector_gae_and_ppo_replay_what_the_collector_computed(name, one_thread):
    torch.manual_seed(0)
    core = CORES[name]()
    env, module, actor, critic, policy, actor_head, value_head = build(core)
    collector = Collector(env, policy, frames_per_batch=NUM_ENVS * STEPS, total_frames=NUM_ENVS * STEPS)
    data = next(iter(collector))
    collector.shutdown()
    assert data.shape == (NUM_ENVS, STEPS)
    is_init = data["is_init"].squeeze(-1)
    assert bool(is_init[:, 1:].any()), "no episode ended mid-batch: the restart path was not exercised"
    key = module.state_key
    assert data[key].shape == data["next", key].shape == (NUM_ENVS, STEPS, core.state_size)
    # The primer's zeros at every episode start, and step_mdp's hand-over from "next" to the root.
    assert bool((data[key][is_init] == 0).all())
    carried = ~is_init[:, 1:]
    assert torch.equal(data[key][:, 1:][carried], data["next", key][:, :-1][carried])

    shapes: list[torch.Size] = []
    core.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
    values = capture(value_head)
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic, deactivate_vmap=True)
    with set_recurrent_mode(True):
        gae(data)
    assert shapes == [torch.Size([NUM_ENVS, STEPS, 2])] * 2  # root and next: one call each, no padding
    (root_feats, root_vals), (next_feats, _) = values
    close(root_feats, data["features"], "GAE root features")
    close(data["state_value"], data["collector_value"], "GAE root values")
    # Expected next values: one acting-mode step from every frame's stored next state.
    nxt = data["next"].select("observation", key).clone()
    nxt["is_init"] = torch.zeros(*nxt.shape, 1, dtype=torch.bool)
    with torch.no_grad():
        acting = critic(nxt.reshape(-1)).reshape(nxt.shape)
    close(data["next", "state_value"], acting["state_value"], "GAE next values")
    close(next_feats, acting["features"], "GAE next features")
    # Where the episode goes on, that is the value the collector computed at the next frame.
    going_on = ~data["next", "done"].squeeze(-1)[:, :-1]
    close(acting["state_value"][:, :-1][going_on], data["collector_value"][:, 1:][going_on], "next vs collector")

    shapes.clear()
    logits = capture(actor_head)
    critic_values = capture(value_head)
    loss = ClipPPOLoss(actor, critic)
    out = loss(data)
    assert shapes == [torch.Size([NUM_ENVS, STEPS, 2])] * 2  # actor and critic
    close(logits[-1][1], data["logits"], "ClipPPOLoss logits")
    close(critic_values[-1][1], data["collector_value"], "ClipPPOLoss values")
    assert float(out["clip_fraction"]) == 0.0 and abs(float(out["kl_approx"])) < 1e-6
    with set_recurrent_mode(True):
        log_prob = actor.get_dist(data.clone()).log_prob(data["action"])
    close(log_prob, data["action_log_prob"], "recurrent-mode log-probs")
    (out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]).backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in core.layers[0].attn.in_proj.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_module_modes_primer_and_errors(kind):
    core = make_core(kind, input_dim=3, d_model=8, n_layers=1, n_heads=2, d_head=2, d_ffc=8, eta=2, r=3, nu=2)
    module = AGaLiTeModule(core, "obs", "feat", state_key="mem")
    assert module.in_keys == ["obs", "mem", "is_init"] and module.out_keys == ["feat", ("next", "mem")]
    primer = module.make_tensordict_primer()
    assert primer.primers["mem"].shape == (core.state_size,) and primer.primers["mem"].dtype == torch.float32
    assert not module.recurrent_mode
    with set_recurrent_mode(True):
        assert module.recurrent_mode
    with pytest.raises(RuntimeError, match="set_recurrent_mode context manager"):
        module.set_recurrent_mode(True)
    # Acting mode: is_init replaces the stored state by zeros, which is the initial state.
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(4, 3, generator=g)
    with torch.no_grad():
        _, stepped = core(torch.randn(4, 3, generator=g), core.initial_state(4))
        stored = core.pack_state(stepped)
        td = TensorDict(obs=obs, mem=stored, is_init=torch.tensor([[True], [False], [True], [False]]), batch_size=[4])
        module(td)
        fresh = core.initial_state(1)
        mixed = core.state_class.cat([fresh, stepped.select(1), fresh, stepped.select(3)])
        y_want, s_want = core(obs, mixed)
    assert torch.equal(td["feat"], y_want) and torch.equal(td["next", "mem"], core.pack_state(s_want))
    # A missing state is the initial state; a missing is_init is an error naming InitTracker.
    with torch.no_grad():
        no_state = module(TensorDict(obs=obs, is_init=torch.zeros(4, 1, dtype=torch.bool), batch_size=[4]))
        y0, _ = core(obs, core.initial_state(4))
    assert torch.equal(no_state["feat"], y0)
    with pytest.raises(KeyError, match="InitTracker"):
        module(TensorDict(obs=obs, batch_size=[4]))
    # Under vmap (GAE's default): a clear error naming the fix.
    td2 = TensorDict(obs=obs.expand(2, 4, 3), is_init=torch.zeros(2, 4, 1, dtype=torch.bool), batch_size=[2, 4])
    with pytest.raises(RuntimeError, match=r"deactivate_vmap=True"):
        torch.vmap(module, (0,))(td2)
    with pytest.raises(TypeError, match=r"^model: expected an agalite_triton.AGaLiTe or GaLiTe, got LSTM"):
        AGaLiTeModule(torch.nn.LSTM(3, 8), "obs", "feat")
