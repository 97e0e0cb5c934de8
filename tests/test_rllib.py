"""Ray RLlib 2.60: ``AGaLiTeRLModule`` on a real local Ray cluster (2 CPUs), PPO with two remote EnvRunners on
RLlib's ``StatelessCartPole`` (velocities hidden, so the policy needs memory).

* PPO trains the module, and episodes the remote EnvRunners sampled, put through the learner's own connector
  pipeline (PPO's bootstrap step, rows of ``max_seq_len`` zero-padded, ``STATE_IN`` per row, GAE), give back in
  the train forward the logits and values recorded while sampling, over every valid step; episodes end inside
  rows and rows start mid-episode. Both with RLlib's per-step ``STATE_OUT`` and with the chunk-start states
  ``keep_chunk_start_states`` keeps, for r = 2 and r = 4;
* the same comparison fails for a module that ignores ``STATE_IN`` in training;
* a zero ``STATE_IN`` is the core's initial state; bad ``model_config`` gets errors naming the argument;
* Ray is shut down at the end and leaves no process behind.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("ray.rllib", reason="needs the [rllib] extra (ray[rllib] 2.60.0)")
gym = pytest.importorskip("gymnasium")

import ray  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.rl_module.rl_module import RLModuleSpec  # noqa: E402
from ray.rllib.examples.envs.classes.stateless_cartpole import StatelessCartPole  # noqa: E402

import agalite_triton  # noqa: E402
from agalite_triton import AGaLiTe  # noqa: E402
from agalite_triton.rllib import CUSTOM_KEY, AGaLiTeRLModule, keep_chunk_start_states  # noqa: E402

SIZES = dict(d_model=32, n_layers=1, n_heads=2, d_head=8, d_ffc=32, eta=4)
MAX_SEQ_LEN = 8  # short against StatelessCartPole's episodes, so rows start mid-episode and episodes end inside rows
OBS = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


# GaLiTe (same API as AGaLiTe, nu in place of eta and r): its cases run once agalite_triton.GaLiTe exists.
GALITE_SIZES = dict(d_model=32, n_layers=1, n_heads=2, d_head=8, d_ffc=32, nu=4)
NO_GALITE = pytest.mark.skipif(not hasattr(agalite_triton, "GaLiTe"), reason="agalite_triton.GaLiTe not there yet")


def model_config(r: int | None, **extra) -> dict:
    """AGaLiTe with this r, or GaLiTe for r=None."""
    core = dict(core="agalite", core_config=dict(SIZES, r=r)) if r else dict(core="galite", core_config=GALITE_SIZES)
    return dict(max_seq_len=MAX_SEQ_LEN, encoder_hiddens=[16], head_hiddens=[16], **core, **extra)


def build_module(cls=AGaLiTeRLModule, obs=OBS, act=None, config=None):
    act = gym.spaces.Discrete(2) if act is None else act
    return RLModuleSpec(module_class=cls, observation_space=obs, action_space=act,
                        model_config=model_config(2) if config is None else config).build()  # fmt: skip


def _descendants(root: int) -> set[int]:
    """Live (non-zombie) processes under ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, one per remote EnvRunner (the learner is the driver)."""
    before = _descendants(os.getpid())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            started = _descendants(os.getpid()) - before
            ray.shutdown()
            deadline = time.monotonic() + 30
            while _alive(started) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(started), f"Ray left processes behind: {sorted(_alive(started))}"


def build_ppo(r: int | None, thin: bool):
    config = (
        PPOConfig()
        .environment(StatelessCartPole)
        .env_runners(num_env_runners=2, num_envs_per_env_runner=2, rollout_fragment_length=64)
        .training(train_batch_size_per_learner=256, minibatch_size=128, num_epochs=2, lr=3e-4)
        # Errors in a runner must fail the test, not be swallowed by a restart.
        .fault_tolerance(restart_failed_env_runners=False, ignore_env_runner_failures=False)
        .debugging(seed=0)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=AGaLiTeRLModule,
                                               model_config=model_config(r, vf_preds_in_exploration=True)))
    )  # fmt: skip
    return (keep_chunk_start_states(config) if thin else config).build_algo()


class IgnoresStateIn(AGaLiTeRLModule):
    """A module that samples right but trains every row from the initial state: the replay must catch it."""

    def _forward_train(self, batch, **kwargs):
        state_in = {k: torch.zeros_like(v) for k, v in batch[Columns.STATE_IN].items()}
        return super()._forward_train({**batch, Columns.STATE_IN: state_in}, **kwargs)


def replay_error(module, batch) -> tuple[float, float]:
    """Max |train forward - recorded while sampling| over the valid steps, for logits and values, each divided
    by max(1, max |recorded|)."""
    with torch.no_grad():
        out = module.forward_train(batch)
        values = module.compute_values(batch, embeddings=out[Columns.EMBEDDINGS])
    mask = batch[Columns.LOSS_MASK]
    errors = []
    for got, ref in ((out[Columns.ACTION_DIST_INPUTS], batch[Columns.ACTION_DIST_INPUTS]), (values, batch[Columns.VF_PREDS])):
        ref, got = ref[mask], got[mask]
        errors.append(float((got - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return errors[0], errors[1]


@pytest.mark.parametrize("r,thin", [
    pytest.param(2, True, id="r2-chunk-start-states"),
    pytest.param(4, False, id="r4-rllib-per-step-states"),
    pytest.param(None, True, id="galite-chunk-start-states", marks=NO_GALITE),
])  # fmt: skip
def test_ppo_with_two_remote_env_runners_and_the_replay_of_their_episodes(cluster, r, thin):
    algo = build_ppo(r, thin)
    try:
        learner = algo.learner_group._learner  # num_learners=0: the learner lives in the driver
        module = learner.module["default_policy"]
        assert isinstance(module, AGaLiTeRLModule) and type(module.core).__name__ == ("AGaLiTe" if r else "GaLiTe")
        before = [p.detach().clone() for p in module.parameters()]
        for _ in range(3):
            result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 3 * 256
        moved = [float((p.detach() - q).abs().max()) for p, q in zip(module.parameters(), before)]
        # Every parameter, the core's included, was trained. (The layer's ReLU after attention can be dead for
        # every input of a 16-wide model at some seeds, leaving the attention untrained: seed 0 is not one.)
        assert min(moved) > 0, moved

        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group)
        per_runner = algo.env_runner_group.foreach_env_runner(
            lambda runner: runner.sample(num_timesteps=96, explore=True), local_env_runner=False
        )
        assert len(per_runner) == 2 and all(per_runner), "expected episodes from both remote EnvRunners"
        episodes = [ep for eps in per_runner for ep in eps]
        steps = sum(len(ep) for ep in episodes)
        ends_inside = [ep for ep in episodes if ep.is_terminated and len(ep) % MAX_SEQ_LEN != 0]
        assert ends_inside, "no episode ended inside a row"
        size = module.core.state_size
        if thin:
            assert all(Columns.STATE_OUT not in ep.extra_model_outputs for ep in episodes)
            for ep in episodes:  # one state per row start (the bootstrap step's row included) and the latest
                kept = ep.custom_data[CUSTOM_KEY]
                assert kept["t_started"] == ep.t_started
                assert sorted(kept["starts"]) == list(range(0, len(ep) + 1, MAX_SEQ_LEN))
                assert (kept["last"] is None) == ep.is_done
            stored = sum(
                a.nbytes for ep in episodes for a in {id(a): a for a in [*ep.custom_data[CUSTOM_KEY]["starts"].values(),
                                                                         ep.custom_data[CUSTOM_KEY]["last"]] if a is not None}.values()
            )  # fmt: skip
            assert stored <= sum(math.ceil((len(ep) + 1) / MAX_SEQ_LEN) + 1 for ep in episodes) * 4 * size
        else:
            stored = sum(ep.get_extra_model_outputs(Columns.STATE_OUT)["state"].nbytes for ep in episodes)
            assert stored == steps * 4 * size

        batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={},
                                           metrics=None)["default_policy"]  # fmt: skip
        state_in = batch[Columns.STATE_IN]["state"]
        assert batch[Columns.OBS].shape[1] == MAX_SEQ_LEN and state_in.shape == (len(state_in), size)
        mid_episode = state_in.abs().amax(dim=1) > 0
        assert bool(mid_episode.any()), "no row started mid-episode"
        assert not bool(batch[Columns.LOSS_MASK].all()), "no padded steps"
        logits_err, values_err = replay_error(module, batch)
        assert logits_err <= 1e-5 and values_err <= 1e-5, (logits_err, values_err)

        # The same check fails (beyond its tolerance) for a module that trains every row from the initial state.
        wrong = build_module(IgnoresStateIn, obs=module.observation_space, config=model_config(r))
        wrong.load_state_dict(module.state_dict())
        logits_err, values_err = replay_error(wrong, batch)
        assert max(logits_err, values_err) > 1e-4, (logits_err, values_err)  # ten times the tolerance
    finally:
        algo.stop()


def test_zero_state_in_is_the_initial_state_and_steps_chain():
    torch.manual_seed(0)
    module = build_module(act=gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
    initial = module.get_initial_state()["state"]
    assert initial.shape == (module.core.state_size,) and not initial.any()
    obs = torch.randn(5, 4, 2)
    state_in = torch.zeros(5, module.core.state_size)
    logits = []
    with torch.no_grad():
        for t in range(4):  # stepping from the zero state, one env step at a time, as the EnvRunners do
            out = module.forward_exploration({Columns.OBS: obs[:, t : t + 1], Columns.STATE_IN: {"state": state_in}})
            state_in = out[Columns.STATE_OUT]["state"]
            logits.append(out[Columns.ACTION_DIST_INPUTS])
        y, final = module.core(module.encoder(obs), module.core.initial_state(5))
        train = module.forward_train({Columns.OBS: obs, Columns.STATE_IN: {"state": torch.zeros_like(state_in)}})
    assert logits[0].shape == (5, 1, 6)  # a diagonal Gaussian's means and log-stds
    torch.testing.assert_close(torch.cat(logits, dim=1), module.pi(module.pi_hidden(y)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(train[Columns.ACTION_DIST_INPUTS], torch.cat(logits, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state_in, module.core.pack_state(final), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("core", ["agalite", "galite"])
def test_core_lookup(core):
    """``"galite"`` builds once agalite_triton.GaLiTe exists, and says what is missing until then."""
    sizes = dict(d_model=16, n_layers=1, n_heads=2, d_head=4, d_ffc=16)
    core_config = dict(sizes, eta=2, r=2) if core == "agalite" else dict(sizes, nu=2)
    config = dict(max_seq_len=4, core=core, core_config=core_config)
    if core == "galite" and not hasattr(agalite_triton, "GaLiTe"):
        with pytest.raises(ValueError, match=r"model_config\['core'\]: 'galite' needs agalite_triton.GaLiTe"):
            build_module(config=config)
        return
    module = build_module(config=config)
    assert type(module.core).__name__ == {"agalite": "AGaLiTe", "galite": "GaLiTe"}[core]
    zero = torch.zeros(3, module.core.state_size)
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: torch.randn(3, 1, 2), Columns.STATE_IN: {"state": zero}})
    assert out[Columns.STATE_OUT]["state"].shape == zero.shape


def test_preset_and_bad_model_config():
    module = build_module(config=dict(max_seq_len=4, core_config=dict(preset="paper", n_layers=1)))
    assert isinstance(module.core, AGaLiTe) and module.core.d_model == 128 and module.core.n_layers == 1
    cases = [
        (dict(core_config=dict(SIZES, r=2)), r"model_config\['max_seq_len'\]: expected a positive int .* got nothing"),
        (dict(max_seq_len=0, core_config=dict(SIZES, r=2)), r"model_config\['max_seq_len'\]: expected a positive int, got 0"),
        (dict(max_seq_len=4, core="lstm"), r"model_config\['core'\]: expected one of \['agalite', 'galite'\], got 'lstm'"),
        (dict(max_seq_len=4, core_config=[16]), r"model_config\['core_config'\]: expected a dict .* got list"),
        (dict(max_seq_len=4, core_config=dict(SIZES, r=2, input_dim=3)), r"expected no input_dim .* got input_dim=3"),
        (dict(max_seq_len=4, core_config=dict(SIZES)), r"model_config\['core_config'\]: .*missing 1 required positional argument: 'r'"),
        (dict(max_seq_len=4, core_config=dict(SIZES, r=2, width=3)), r"model_config\['core_config'\]: .*'width'"),
        (dict(max_seq_len=4, core_config=dict(preset="huge")), r"name: expected one of .* got 'huge'"),
        (dict(max_seq_len=4, core_config=dict(SIZES, r=2), head_hiddens=[0]), r"model_config\['head_hiddens'\]: expected positive int"),
    ]
    for config, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            build_module(config=config)
    with pytest.raises(ValueError, match=r"observation_space: expected a gymnasium Box .* got Discrete\(3\)"):
        build_module(obs=gym.spaces.Discrete(3))
    with pytest.raises(ValueError, match=r"action_space: expected a gymnasium Discrete or Box, got MultiDiscrete"):
        build_module(act=gym.spaces.MultiDiscrete([2, 2]))


def test_galite_is_looked_up_in_the_package_when_built(monkeypatch):
    """The "galite" entry needs only agalite_triton.GaLiTe with AGaLiTe's API: a stand-in shows the lookup."""

    class StandIn(AGaLiTe):
        def __init__(self, input_dim, d_model, n_layers, n_heads, d_head, d_ffc, nu, **kwargs):
            super().__init__(input_dim, d_model, n_layers, n_heads, d_head, d_ffc, eta=nu, r=2, **kwargs)

    monkeypatch.setattr(agalite_triton, "GaLiTe", StandIn, raising=False)
    module = build_module(config=model_config(None))
    assert type(module.core) is StandIn and module.core.eta == GALITE_SIZES["nu"]
    with torch.no_grad():
        out = module.forward_train({Columns.OBS: torch.randn(2, 3, 2),
                                    Columns.STATE_IN: {"state": torch.zeros(2, module.core.state_size)}})  # fmt: skip
    assert out[Columns.ACTION_DIST_INPUTS].shape == (2, 3, 2)
