"""Ray RLlib adapter (new API stack): :class:`AGaLiTeRLModule`, a stateful ``TorchRLModule`` with ``ValueFunctionAPI``.

Needs ``pip install -e ".[rllib]"`` (ray[rllib] 2.60.0); ``import agalite_triton`` never imports this module.

``RLModuleSpec(module_class=AGaLiTeRLModule, model_config={...})`` with

* ``"core"``: ``"agalite"`` (default) or ``"galite"``;
* ``"core_config"``: the core's constructor arguments without ``input_dim`` (the encoder's output size), or
  ``{"preset": name, **overrides}``;
* ``"max_seq_len"``: the training rows' length (RLlib's learner connectors split episodes into rows of it);
  required when the module is built on its own, while inside an algorithm RLlib merges its
  ``DefaultModelConfig`` (``max_seq_len=20``) under the spec's ``model_config``;
* optional ``"encoder_hiddens"`` / ``"head_hiddens"`` (tanh MLPs before the core and in each head, default none)
  and ``"vf_preds_in_exploration"`` (default False; True: the exploration and inference forwards also return
  ``VF_PREDS``, which the episodes then store, for checking a replay against them).

Box observations (flattened) and Discrete or Box actions (RLlib's default categorical / diagonal Gaussian).

How RLlib 2.60's conventions are met:

* **State.** ``get_initial_state()`` is ``{"state": zeros(S)}``, S = ``core.state_size``: the packed state
  (``core.pack_state``), whose zeros are exactly the core's initial state. RLlib stacks it to (B, S).
* **Sampling** (exploration / inference forwards): one core step per env step, from ``STATE_IN``, returning
  ``STATE_OUT`` (B, S).
* **Training** (train forward and ``compute_values``): each (B, T = max_seq_len) row in one core call from its
  ``STATE_IN``. RLlib's rows never span two episodes, so no dones are needed; padding sits at the end of a row,
  after every valid step, so the causal core's valid outputs do not see it, and ``LOSS_MASK`` drops its outputs.
* **Storage.** By default RLlib keeps every module output of every env step in the episodes, ``STATE_OUT``
  included: ``4 * S`` bytes per env step (``paper``: 57,348). :func:`keep_chunk_start_states` installs three
  connector pieces that store only the states the learner reads (one per ``max_seq_len`` steps of each
  episode chunk, in ``episode.custom_data``), with the same rollout and the same train batches.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import AddObservationsFromEpisodesToBatch
from ray.rllib.connectors.common.add_time_dim_to_batch_and_zero_pad import AddTimeDimToBatchAndZeroPad
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner.add_columns_from_episodes_to_train_batch import AddColumnsFromEpisodesToTrainBatch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

__all__ = [
    "CORES",
    "AGaLiTeRLModule",
    "ChunkStartStatesToLearner",
    "ChunkStartStatesToModule",
    "KeepChunkStartStates",
    "build_core",
    "core_class",
    "keep_chunk_start_states",
]

# model_config["core"] -> the class's name in agalite_triton, imported only when asked for, so that a core
# added later works without a change here.
CORES: dict[str, str] = {"agalite": "AGaLiTe", "galite": "GaLiTe"}

STATE_KEY = "state"
# episode.custom_data key of the chunk-start states kept by KeepChunkStartStates.
CUSTOM_KEY = "agalite_chunk_start_states"


def core_class(name: object) -> type[nn.Module]:
    """The core class ``model_config["core"]`` names."""
    if not isinstance(name, str) or name not in CORES:
        raise ValueError(f"model_config['core']: expected one of {sorted(CORES)}, got {name!r}")
    cls = getattr(importlib.import_module("agalite_triton"), CORES[name], None)
    if cls is None:
        raise ValueError(
            f"model_config['core']: {name!r} needs agalite_triton.{CORES[name]}, which this installed "
            f"agalite_triton does not have; got core={name!r}"
        )
    return cls


def build_core(name: object, core_config: object, input_dim: int) -> nn.Module:
    """``cls(input_dim=input_dim, **core_config)`` or ``cls.from_preset(preset, input_dim, **overrides)``."""
    cls = core_class(name)
    if not isinstance(core_config, Mapping):
        raise TypeError(
            "model_config['core_config']: expected a dict of the core's constructor arguments or "
            f"{{'preset': name, ...}}, got {type(core_config).__name__}"
        )
    kwargs = dict(core_config)
    if "input_dim" in kwargs:
        raise ValueError(
            f"model_config['core_config']: expected no input_dim (it is the encoder's output size, {input_dim}), "
            f"got input_dim={kwargs['input_dim']!r}"
        )
    if kwargs.get("batch_first", True) is not True:
        raise ValueError(f"model_config['core_config']: expected batch_first=True, got {kwargs['batch_first']!r}")
    preset = kwargs.pop("preset", None)
    try:
        if preset is not None:
            core = cls.from_preset(preset, input_dim, **kwargs)
        else:
            core = cls(input_dim=input_dim, **kwargs)
    except TypeError as err:  # a missing or unknown argument: say which config it came from
        raise ValueError(f"model_config['core_config']: {err} (got {dict(core_config)!r})") from err
    return core


def _mlp(sizes: Sequence[int], in_dim: int, name: str) -> tuple[nn.Sequential, int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"model_config[{name!r}]: expected a list of layer widths, got {sizes!r}")
    layers: list[nn.Module] = []
    for width in sizes:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"model_config[{name!r}]: expected positive int widths, got {list(sizes)!r}")
        layers += [nn.Linear(in_dim, width), nn.Tanh()]
        in_dim = width
    return nn.Sequential(*layers), in_dim


class AGaLiTeRLModule(TorchRLModule, ValueFunctionAPI):
    """An AGaLiTe (or GaLiTe) core between an observation encoder and policy/value heads; see the module
    docstring for ``model_config``."""

    def setup(self) -> None:
        config = self.model_config or {}
        if "max_seq_len" not in config:
            raise ValueError(
                "model_config['max_seq_len']: expected a positive int (the training rows' length, which RLlib "
                "requires of stateful modules), got nothing"
            )
        max_seq_len = config["max_seq_len"]
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"model_config['max_seq_len']: expected a positive int, got {max_seq_len!r}")
        obs_space, act_space = self.observation_space, self.action_space
        if not isinstance(obs_space, gym.spaces.Box):
            raise ValueError(f"observation_space: expected a gymnasium Box (flattened), got {obs_space!r}")
        if isinstance(act_space, gym.spaces.Discrete):
            dist_inputs = int(act_space.n)
        elif isinstance(act_space, gym.spaces.Box):
            dist_inputs = 2 * int(np.prod(act_space.shape))  # RLlib's diagonal Gaussian: means and log-stds
        else:
            raise ValueError(f"action_space: expected a gymnasium Discrete or Box, got {act_space!r}")
        self.obs_dim = int(np.prod(obs_space.shape))
        self.encoder, core_in = _mlp(config.get("encoder_hiddens") or [], self.obs_dim, "encoder_hiddens")
        self.core = build_core(config.get("core", "agalite"), config.get("core_config", {}), core_in)
        self.pi_hidden, pi_in = _mlp(config.get("head_hiddens") or [], self.core.d_model, "head_hiddens")
        self.vf_hidden, vf_in = _mlp(config.get("head_hiddens") or [], self.core.d_model, "head_hiddens")
        self.pi = nn.Linear(pi_in, dist_inputs)
        self.vf = nn.Linear(vf_in, 1)
        self.vf_preds_in_exploration = bool(config.get("vf_preds_in_exploration", False))

    def get_initial_state(self) -> dict[str, np.ndarray]:
        return {STATE_KEY: np.zeros(self.core.state_size, dtype=np.float32)}

    def _embeddings(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, T, d_model) core outputs from each row's STATE_IN, and the packed state after the row."""
        obs = batch[Columns.OBS]
        x = self.encoder(obs.reshape(*obs.shape[:2], self.obs_dim).to(torch.float32))
        state_in = batch[Columns.STATE_IN][STATE_KEY]
        y, state = self.core(x, self.core.unpack_state(state_in.to(torch.float32)))
        return y, {STATE_KEY: self.core.pack_state(state)}

    def _heads(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.pi(self.pi_hidden(embeddings))

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        embeddings, state_out = self._embeddings(batch)
        out = {Columns.ACTION_DIST_INPUTS: self._heads(embeddings), Columns.STATE_OUT: state_out}
        if self.vf_preds_in_exploration:
            out[Columns.VF_PREDS] = self.vf(self.vf_hidden(embeddings)).squeeze(-1)
        return out

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        embeddings, state_out = self._embeddings(batch)
        # EMBEDDINGS: PPO's loss passes them back to compute_values, so the core runs once per pass.
        return {
            Columns.ACTION_DIST_INPUTS: self._heads(embeddings),
            Columns.STATE_OUT: state_out,
            Columns.EMBEDDINGS: embeddings,
        }

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if embeddings is None:
            embeddings, _ = self._embeddings(batch)
        return self.vf(self.vf_hidden(embeddings)).squeeze(-1)


# ------------------------------------------------------------------------------------------ storage
def _single_module(rl_module: Any, sa_episode: Any) -> Any:
    if isinstance(rl_module, MultiRLModule):
        if sa_episode.module_id is not None:
            return rl_module[sa_episode.module_id]
        return next(iter(rl_module.values()))
    return rl_module


def _initial(module: Any) -> np.ndarray:
    return module.get_initial_state()[STATE_KEY]


class ChunkStartStatesToModule(ConnectorV2):
    """Env-to-module piece: ``STATE_IN`` from the latest state :class:`KeepChunkStartStates` kept in each episode
    (the initial state for a new one), in place of RLlib's ``AddStatesFromEpisodesToBatch``, which reads the
    per-step ``STATE_OUT`` no longer stored.

    Prepended to the pipeline, it first runs RLlib's observation and time-rank pieces itself: they (and
    ``AddStatesFromEpisodesToBatch``) skip a batch that already holds their columns or ``STATE_IN``, so the
    default pieces after it then leave the batch as it is, and the batch is the one RLlib would build.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._obs = AddObservationsFromEpisodesToBatch()
        self._time = AddTimeDimToBatchAndZeroPad()

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: list[Any], **kwargs: Any) -> Any:
        if rl_module is None or not rl_module.is_stateful() or Columns.STATE_IN in batch:
            return batch
        batch = self._obs(rl_module=rl_module, batch=batch, episodes=episodes, **kwargs)
        batch = self._time(rl_module=rl_module, batch=batch, episodes=episodes, **kwargs)
        for sa_episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=True):
            kept = sa_episode.custom_data.get(CUSTOM_KEY)
            if kept is not None and sa_episode.is_done:
                # No step follows and the learner reads only the row starts: drop the latest state (this row's
                # output, for the env's reset step, is discarded).
                kept["last"] = None
            last = None if kept is None or len(sa_episode) == 0 and sa_episode.t_started == 0 else kept["last"]
            state = _initial(_single_module(rl_module, sa_episode)) if last is None else last
            self.add_batch_item(batch, Columns.STATE_IN, {STATE_KEY: state}, single_agent_episode=sa_episode)
        return batch


class KeepChunkStartStates(ConnectorV2):
    """Module-to-env piece: takes ``STATE_OUT`` out of what the EnvRunner stores per step, and keeps in
    ``episode.custom_data`` only the latest state (the next step's ``STATE_IN``; dropped by
    :class:`ChunkStartStatesToModule` once the episode is done) and the states at the steps
    where the learner starts a row: every ``max_seq_len``-th step of the episode chunk, counted from the chunk's
    first step, as RLlib's learner connectors split chunks (including the one bootstrap step PPO appends).

    A chunk's first state is the previous chunk's latest state (carried over by ``episode.cut``, which copies
    ``custom_data``), or ``None`` (the initial state) for an episode's first chunk.
    """

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: list[Any], **kwargs: Any) -> Any:
        state_out = batch.pop(Columns.STATE_OUT, None)
        if state_out is None:
            return batch
        if not isinstance(state_out, dict):
            raise TypeError(
                "KeepChunkStartStates: expected STATE_OUT as individual items keyed by episode (it runs after "
                f"RLlib's default UnBatchToIndividualItems, single-agent), got {type(state_out).__name__}"
            )
        by_id = {ep.id_: ep for ep in episodes}
        for key, items in state_out.items():
            if len(key) != 1:
                raise ValueError(f"KeepChunkStartStates: expected single-agent batch keys (episode_id,), got {key!r}")
            episode = by_id.get(key[0])
            if episode is None or not episode.is_reset:
                # The row of an episode that has ended, stepped for its env's reset: its output is discarded.
                continue
            (item,) = items
            # A copy: the item is a view of the whole (B, S) batch, which it would keep alive.
            state = np.array(item[STATE_KEY], dtype=np.float32, copy=True)
            kept = episode.custom_data.get(CUSTOM_KEY)
            if kept is None or kept["t_started"] != episode.t_started:
                # A new chunk: its first row starts from the state the previous chunk ended with.
                start = None if kept is None or episode.t_started == 0 else kept["last"]
                kept = {"t_started": episode.t_started, "starts": {0: start}, "last": start}
                episode.custom_data[CUSTOM_KEY] = kept
            max_seq_len = _single_module(rl_module, episode).model_config["max_seq_len"]
            index = len(episode) + 1  # the step this state is the STATE_IN of, counted in the chunk
            if index % max_seq_len == 0:
                kept["starts"][index] = state
            kept["last"] = state
        return batch


class ChunkStartStatesToLearner(ConnectorV2):
    """Learner piece: each row's ``STATE_IN`` from the states :class:`KeepChunkStartStates` kept, in place of
    RLlib's ``AddStatesFromEpisodesToBatch`` (the same rows, the same states).

    Prepended to the pipeline (after PPO's ``AddOneTsToEpisodesAndTruncate``), it first runs RLlib's observation,
    column and time-rank pieces itself, which the default pieces after it then skip (see
    :class:`ChunkStartStatesToModule`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._obs = AddObservationsFromEpisodesToBatch(as_learner_connector=True)
        self._columns = AddColumnsFromEpisodesToTrainBatch()
        self._time = AddTimeDimToBatchAndZeroPad(as_learner_connector=True)

    def __call__(self, *, rl_module: Any, batch: dict[str, Any], episodes: list[Any], **kwargs: Any) -> Any:
        if rl_module is None or not rl_module.is_stateful() or Columns.STATE_IN in batch:
            return batch
        for piece in (self._obs, self._columns, self._time):
            batch = piece(rl_module=rl_module, batch=batch, episodes=episodes, **kwargs)
        for sa_episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            module = _single_module(rl_module, sa_episode)
            if not module.is_stateful():
                continue
            max_seq_len = module.model_config["max_seq_len"]
            kept = sa_episode.custom_data.get(CUSTOM_KEY)
            if kept is None:
                raise KeyError(
                    f"episode {sa_episode.id_!r}: no kept states (custom_data[{CUSTOM_KEY!r}]); sample with "
                    "keep_chunk_start_states(config) on both the EnvRunners and the learner"
                )
            rows = math.ceil(len(sa_episode) / max_seq_len)
            initial = _initial(module)
            states = []
            for r in range(rows):
                if r * max_seq_len not in kept["starts"]:
                    raise KeyError(
                        f"episode {sa_episode.id_!r}: no kept state at step {r * max_seq_len} of the chunk "
                        f"(kept: {sorted(kept['starts'])}); max_seq_len differs from the sampling one?"
                    )
                state = kept["starts"][r * max_seq_len]
                states.append({STATE_KEY: initial if state is None else state})
            self.add_n_batch_items(batch, Columns.STATE_IN, states, rows, single_agent_episode=sa_episode)
        return batch


def keep_chunk_start_states(config: Any) -> Any:
    """Install the three pieces on an ``AlgorithmConfig`` (single-agent, on-policy learners such as PPO), so
    that the episodes keep one state per ``max_seq_len`` steps instead of one per step. Returns ``config``.

    It sets ``env_to_module_connector``, ``module_to_env_connector`` and ``learner_connector``: combine any
    pieces of your own with these by hand (see the source).
    """
    config.env_runners(
        env_to_module_connector=lambda env=None, spaces=None, device=None: [ChunkStartStatesToModule()],
        module_to_env_connector=lambda env=None, spaces=None: [KeepChunkStartStates()],
    )
    config.learners(learner_connector=lambda obs_space=None, act_space=None: [ChunkStartStatesToLearner()])
    return config
