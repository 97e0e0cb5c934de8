"""sb3-contrib 2.9.2: ``RecurrentPPO(AGaLiTePolicy, ...)`` on real gymnasium CartPole (velocities masked),
with AGaLiTe cores and with GaLiTe cores (``core="galite"``).

* ``learn`` runs and its optimiser updates the cores' parameters (the parent's optimiser would hold the
  throwaway LSTMs' instead: the core would then never train, silently);
* the buffers are sized for the packed state (``lstm_actor.hidden_size = ceil(S / 2)``, one layer);
* the replay of a whole rollout (``evaluate_actions`` over sb3's padded sequences, started from the
  stored ``(h, c)`` halves times ``1 - episode_start``) gives the rollout's log-probs and values;
* ``predict`` steps with and without a state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sb3_contrib", reason="needs the [sb3] extra (sb3-contrib 2.9.2)")
pytest.importorskip("gymnasium", reason="needs gymnasium for the real environment")

from sb3_contrib import RecurrentPPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from agalite_triton import AGaLiTe, GaLiTe  # noqa: E402
from agalite_triton.sb3 import AGaLiTePolicy, PackedCore  # noqa: E402

from .cores import KINDS  # noqa: E402
from .rl_envs import MaskedCartPole  # noqa: E402

TINY = dict(d_model=16, n_layers=2, n_heads=2, d_head=4, d_ffc=16)
SIZES = {"agalite": dict(TINY, eta=2, r=4), "galite": dict(TINY, nu=2)}


class _Continue(BaseCallback):
    def _on_step(self) -> bool:
        return True


def make_algo(core: str = "agalite", **policy_kwargs) -> RecurrentPPO:
    env = make_vec_env("CartPole-v1", n_envs=16, seed=0, wrapper_class=MaskedCartPole)
    # The default core is AGaLiTe: its policies are built as before core= existed.
    chosen = {} if core == "agalite" else dict(core=core)
    return RecurrentPPO(AGaLiTePolicy, env, n_steps=24, batch_size=96, n_epochs=2, seed=0,
                        policy_kwargs=dict(agalite_kwargs=SIZES[core], **chosen, **policy_kwargs))  # fmt: skip


@pytest.mark.parametrize("core", KINDS)
def test_learn_trains_the_cores_and_the_replay_matches_the_rollout(core, one_thread):
    algo = make_algo(core)
    policy = algo.policy
    assert isinstance(policy.lstm_actor, PackedCore) and isinstance(policy.lstm_critic, PackedCore)
    model_class = AGaLiTe if core == "agalite" else GaLiTe
    assert type(policy.lstm_actor.model) is model_class and type(policy.lstm_critic.model) is model_class
    size = policy.lstm_actor.model.state_size
    assert algo.rollout_buffer.hidden_state_shape == (24, 1, 16, (size + 1) // 2)
    held = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in policy.parameters()}
    assert not any(isinstance(m, torch.nn.LSTM) for m in policy.modules())
    cores = [policy.lstm_actor.model, policy.lstm_critic.model]
    before = [[p.detach().clone() for p in core.parameters()] for core in cores]
    algo.learn(16 * 24 * 2)
    for core, old in zip(cores, before):
        moved = [float((p.detach() - q).abs().max()) for p, q in zip(core.parameters(), old)]
        assert min(moved) > 0, moved  # every parameter of both cores was updated

    # One more rollout, then the replay sb3's update would do, before any optimiser step.
    callback = _Continue()
    callback.init_callback(algo)
    algo.collect_rollouts(algo.env, callback, algo.rollout_buffer, algo.n_steps)
    starts = algo.rollout_buffer.episode_starts
    assert starts[1:].any(), "no episode ended inside the rollout"
    with torch.no_grad():
        (batch,) = list(algo.rollout_buffer.get(None))
        values, log_prob, _ = policy.evaluate_actions(
            batch.observations, batch.actions.long().flatten(), batch.lstm_states, batch.episode_starts
        )
    mask = batch.mask > 0
    # GaLiTe's read-out divides by <s, Q>, which amplifies float32 rounding between the rollout's one-step
    # calls and the replay's sequence (measured up to 8e-6 relative); a replay from wrong states is far off.
    tol = 1e-6 if core == "agalite" else 2e-5
    torch.testing.assert_close(values.flatten()[mask], batch.old_values[mask], rtol=tol, atol=tol)
    torch.testing.assert_close(log_prob[mask], batch.old_log_prob[mask], rtol=tol, atol=tol)


def test_predict_and_shared_core_and_bad_kwargs():
    algo = make_algo(shared_lstm=True, enable_critic_lstm=False)
    policy = algo.policy
    assert policy.lstm_critic is None
    obs = algo.env.reset()
    actions, state = algo.predict(obs, state=None, episode_start=np.ones(16, dtype=bool))
    assert actions.shape == (16,) and state[0].shape == (1, 16, policy.lstm_actor.hidden_size)
    again, state2 = algo.predict(obs, state=state, episode_start=np.zeros(16, dtype=bool))
    assert again.shape == (16,) and not np.array_equal(state2[0], state[0])
    # A zero (h, c) pair is the initial state, so a zeroed state equals an episode start.
    with torch.no_grad():
        features = torch.as_tensor(obs)
        zeros = (torch.zeros(1, 16, policy.lstm_actor.hidden_size),) * 2
        y0, _ = policy.lstm_actor.process(features, zeros, torch.zeros(16))
        packed = torch.as_tensor(np.concatenate([state2[0][0], state2[1][0]], -1))
        y1, _ = policy.lstm_actor.process(features, (torch.as_tensor(state2[0]), torch.as_tensor(state2[1])),
                                          torch.ones(16))  # fmt: skip
    assert packed.shape[1] >= policy.lstm_actor.model.state_size and torch.equal(y0, y1)
    with pytest.raises(ValueError, match="lstm_hidden_size: does not apply"):
        make_algo(lstm_hidden_size=8)
    # preset= with overrides; the mlp_extractor is built on the core's d_model outputs.
    space = algo.observation_space
    preset = AGaLiTePolicy(space, algo.action_space, lambda _: 1e-3, agalite_kwargs=dict(preset="fast", n_layers=1))
    assert preset.lstm_actor.model.n_layers == 1 and preset.lstm_actor.model.d_model == 256
    assert preset.mlp_extractor.policy_net[0].in_features == 256
    with pytest.raises(ValueError, match="agalite_kwargs: preset expected one of"):
        AGaLiTePolicy(space, algo.action_space, lambda _: 1e-3, agalite_kwargs=dict(preset="huge"))
    # core="galite": GaLiTe's presets (its default galite-tmaze), not AGaLiTe's.
    galite = AGaLiTePolicy(space, algo.action_space, lambda _: 1e-3, core="galite",
                           agalite_kwargs=dict(preset="galite-tmaze", n_layers=1))  # fmt: skip
    assert type(galite.lstm_actor.model) is GaLiTe and galite.lstm_actor.model.nu == 2
    assert galite.lstm_actor.hidden_size == (galite.lstm_actor.model.state_size + 1) // 2
    with pytest.raises(ValueError, match=r"agalite_kwargs: preset expected one of \['galite-tmaze'\] \(core='galite'\)"):
        AGaLiTePolicy(space, algo.action_space, lambda _: 1e-3, core="galite", agalite_kwargs=dict(preset="paper"))
    with pytest.raises(ValueError, match=r"^core: expected one of \['agalite', 'galite'\], got 'lstm'"):
        AGaLiTePolicy(space, algo.action_space, lambda _: 1e-3, core="lstm")
