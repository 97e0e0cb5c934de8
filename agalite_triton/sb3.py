"""Stable-Baselines3 adapter: :class:`AGaLiTePolicy` for ``sb3_contrib.RecurrentPPO``.

Needs ``pip install -e ".[sb3]"`` (stable-baselines3 / sb3-contrib 2.9.2); ``import agalite_triton`` never
imports this module.

``RecurrentPPO(AGaLiTePolicy, env, policy_kwargs=dict(agalite_kwargs=dict(preset="paper")))`` (or the
sizes of :class:`~agalite_triton.AGaLiTe`, without ``input_dim``, which is the features extractor's output).
With ``core="galite"`` the cores are :class:`~agalite_triton.GaLiTe` and ``agalite_kwargs`` its preset
(default ``galite-tmaze``) or sizes: ``policy_kwargs=dict(core="galite", agalite_kwargs=dict(d_model=64, ...,
nu=2))``.

How sb3-contrib 2.9.2's conventions are met:

* ``RecurrentPPO`` sizes its state buffers from ``policy.lstm_actor.num_layers`` and ``.hidden_size`` and
  stores an ``(h, c)`` pair per actor and critic. Here ``lstm_actor`` (and ``lstm_critic``) is a
  :class:`PackedCore` with ``num_layers = 1`` and ``hidden_size = ceil(S / 2)``: the packed state
  ``model.pack_state(...)`` of S words is split into the two halves (the odd word, if any, is a zero).
  The buffers then hold ``2 * 2 * ceil(S / 2)`` float32 words per env and step (actor and critic).
* ``episode_start`` means "this observation starts a new episode", as AGaLiTe's ``dones``. The state is
  reset as sb3-contrib resets an LSTM, by multiplying it by ``1 - episode_start``: the packed state of
  zeros is exactly the initial state (memory 0, and tick 1 for AGaLiTe). An episode start inside a replayed sequence
  (sb3 cuts sequences there, so it does not happen in ``RecurrentPPO`` itself) restarts from the initial
  state, as the multiplication does for an LSTM.
* The parent class builds throwaway ``nn.LSTM`` s (of ``d_model`` units) and an optimiser over them; this
  class replaces them by the cores and rebuilds the optimiser over ``self.parameters()``, so
  that the optimiser holds the cores' parameters.
* ``shared_lstm`` / ``enable_critic_lstm`` keep their meaning: by default the critic has its own core
  (as sb3's default critic LSTM); ``shared_lstm=True`` reuses the actor's features, detached, as sb3 does.
"""

from __future__ import annotations

from typing import Any

import torch
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from torch import nn

from .galite import GaLiTe
from .model import AGaLiTe
from .stack import RecurrentStack

__all__ = ["CORES", "AGaLiTePolicy", "PackedCore"]

# The cores a policy can use (``core=``), and each one's preset when neither a preset nor sizes are given.
CORES: dict[str, type[RecurrentStack]] = {"agalite": AGaLiTe, "galite": GaLiTe}
_DEFAULT_PRESETS = {"agalite": "paper", "galite": "galite-tmaze"}


class PackedCore(nn.Module):
    """An AGaLiTe or GaLiTe core dressed as the ``nn.LSTM`` that ``RecurrentPPO`` reads its buffer sizes from.

    ``num_layers = 1`` and ``hidden_size = ceil(S / 2)``: the packed state travels as sb3's ``(h, c)``
    pair, each ``(1, batch, hidden_size)``.
    """

    def __init__(self, model: RecurrentStack, input_size: int) -> None:
        super().__init__()
        if not isinstance(model, RecurrentStack):
            raise TypeError(f"model: expected an agalite_triton.AGaLiTe or GaLiTe, got {type(model).__name__}")
        if model._state_dtype() != torch.float32:
            raise TypeError("model: expected a float32 model (sb3's state buffers are float32), got a float64 one")
        self.model = model
        self.input_size = input_size
        self.num_layers = 1
        self.hidden_size = (model.state_size + 1) // 2

    def packed(self, states: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(batch, S) packed state from sb3's ``(h, c)`` halves."""
        h, c = states
        return torch.cat([h[0], c[0]], dim=-1)[:, : self.model.state_size]

    def halves(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = 2 * self.hidden_size - packed.shape[-1]
        if pad:
            packed = torch.cat([packed, packed.new_zeros(packed.shape[0], pad)], dim=-1)
        h, c = packed.split(self.hidden_size, dim=-1)
        return h.unsqueeze(0), c.unsqueeze(0)

    def process(
        self, features: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor], episode_starts: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """sb3's ``_process_sequence``: (n_seq * L, F) features of n_seq sequences, all in one model call."""
        n_seq = states[0].shape[1]
        x = features.reshape(n_seq, -1, self.input_size)
        starts = episode_starts.reshape(n_seq, -1)
        # sb3's reset: the state times (1 - episode_start) before the first step (zeros: the initial state).
        packed = self.packed(states) * (1.0 - starts[:, :1]).to(torch.float32)
        state = self.model.unpack_state(packed)
        restart = starts > 0
        restart[:, 0] = False
        if bool(restart.any()):
            fresh = self.model.initial_state(int(restart.sum()), device=x.device)
            y, new_state = self.model(x, state, restart=restart, restart_state=fresh)
        else:
            y, new_state = self.model(x, state)
        return y.reshape(-1, y.shape[-1]), self.halves(self.model.pack_state(new_state))


def _build_core(model_class: type[RecurrentStack], core_kwargs: dict[str, Any], input_dim: int) -> RecurrentStack:
    kwargs = dict(core_kwargs)
    preset = kwargs.pop("preset", None)
    if preset is not None:
        return model_class.from_preset(preset, input_dim=input_dim, **kwargs)
    return model_class(input_dim=input_dim, **kwargs)


class AGaLiTePolicy(RecurrentActorCriticPolicy):
    """``RecurrentActorCriticPolicy`` with AGaLiTe (or GaLiTe) cores in place of the LSTMs.

    Args:
        core: ``"agalite"`` (default) or ``"galite"``: which model the cores are (see :data:`CORES`).
        agalite_kwargs: ``dict(preset=name, **overrides)`` or the sizes of the core's model
            (:class:`~agalite_triton.AGaLiTe`: ``d_model, n_layers, n_heads, d_head, d_ffc, eta, r``;
            :class:`~agalite_triton.GaLiTe`: ``nu`` in place of ``eta, r``; and optional ones), without
            ``input_dim`` (the features extractor's output size). Default: the ``paper`` preset (AGaLiTe)
            or ``galite-tmaze`` (GaLiTe).
        Everything else as ``RecurrentActorCriticPolicy``, except the LSTM sizes (``lstm_hidden_size``,
        ``n_lstm_layers``, ``lstm_kwargs``), which do not apply.
    """

    def __init__(
        self, *args: Any, core: str = "agalite", agalite_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        for name in ("lstm_hidden_size", "n_lstm_layers", "lstm_kwargs"):
            if name in kwargs:
                raise ValueError(f"{name}: does not apply to AGaLiTePolicy (size the core with agalite_kwargs)")
        if core not in CORES:
            raise ValueError(f"core: expected one of {sorted(CORES)}, got {core!r}")
        model_class = CORES[core]
        agalite_kwargs = dict(preset=_DEFAULT_PRESETS[core]) if agalite_kwargs is None else dict(agalite_kwargs)
        if "input_dim" in agalite_kwargs:
            raise ValueError("agalite_kwargs: input_dim is the features extractor's output size; leave it out")
        preset = agalite_kwargs.get("preset")
        presets = model_class.presets
        if preset is not None and preset not in presets:
            raise ValueError(
                f"agalite_kwargs: preset expected one of {sorted(presets)} (core={core!r}), got {preset!r}"
            )
        d_model = agalite_kwargs.get("d_model", presets[preset]["d_model"] if preset is not None else None)
        if d_model is None:
            raise ValueError("agalite_kwargs: expected preset= or the core's sizes (d_model, n_layers, ...)")
        self.core = core
        self.agalite_kwargs = agalite_kwargs
        # The parent builds the mlp_extractor on lstm_hidden_size outputs: the core's d_model.
        super().__init__(*args, lstm_hidden_size=d_model, n_lstm_layers=1, **kwargs)
        def build() -> PackedCore:
            return PackedCore(_build_core(model_class, agalite_kwargs, self.features_dim), self.features_dim)

        self.lstm_actor = build()
        if self.lstm_critic is not None:
            self.lstm_critic = build()
        self.lstm_hidden_state_shape = (1, 1, self.lstm_actor.hidden_size)
        self.to(self.device)
        # The parent's optimiser holds the throwaway LSTMs' parameters: rebuild it over the cores.
        self.optimizer = self.optimizer_class(self.parameters(), lr=self._initial_lr, **self.optimizer_kwargs)

    def _build(self, lr_schedule: Any) -> None:
        self._initial_lr = lr_schedule(1)
        super()._build(lr_schedule)

    @staticmethod
    def _process_sequence(
        features: torch.Tensor,
        lstm_states: tuple[torch.Tensor, torch.Tensor],
        episode_starts: torch.Tensor,
        lstm: nn.Module,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(lstm, PackedCore):
            raise TypeError(f"lstm: expected the policy's PackedCore, got {type(lstm).__name__}")
        return lstm.process(features, lstm_states, episode_starts)
