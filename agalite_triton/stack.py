"""The stack both models share: layers of :class:`~agalite_triton.layer.EncoderLayer`, the recurrent state
and every call convention (one step or T steps, dones, ``out=``, ``env_ids=``, ``restart=``, packing).

A model (``AGaLiTe``, ``GaLiTe``) brings its layers, its state class and the per-environment shapes of
each layer's memories; a state whose last field is ``tick`` gets one (AGaLiTe's oscillators read it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ._validation import FLOAT_DTYPES, check_dones, check_slot_rows, check_tensor
from .backend import check_backend
from .state import StateOps

__all__ = ["RecurrentStack", "check_sizes"]


def check_sizes(sizes: dict[str, int], dropout: float) -> None:
    """Every size a positive int, dropout in [0, 1)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")


class RecurrentStack(nn.Module):
    """A stack of encoder layers with a recurrent state whose size does not grow with context.

    ``y, new_state = model(x, state, dones)``:
      * ``x``: (B, T, input_dim) (or (T, B, input_dim) with ``batch_first=False``), or one step (B, input_dim).
      * ``dones``: (B, T) (or (T, B)) / (B,), bool or 0/1 float; ``dones[b, t]`` means observation t
        starts a new episode, so environment b's memory is zeroed before step t (a tick keeps counting).
      * ``state``: the model's state (``None``: :meth:`initial_state`). Not modified.
      * ``y``: (B, T, d_model) (or time-major) / (B, d_model). A call of T steps advances a tick by T.

    Keyword-only: ``out`` (a state that receives the new state, inference), ``env_ids`` (step a subset of
    a larger state in place, for async environments) and ``restart``/``restart_state`` (restart chosen
    steps from stored states, for TorchRL's recurrent-mode replay); see :meth:`forward`.
    """

    state_class: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]]
    layers: nn.ModuleList

    def _init_stack(self, config: dict[str, Any], backend: str | None, batch_first: bool) -> None:
        self.config: dict[str, Any] = config
        self.input_dim, self.d_model, self.n_layers = config["input_dim"], config["d_model"], config["n_layers"]
        self.n_heads, self.d_head = config["n_heads"], config["d_head"]
        self.batch_first = batch_first
        self._backend = check_backend(backend)

    @classmethod
    def from_preset(cls, name: str, input_dim: int, **overrides: Any) -> RecurrentStack:
        """Build a named configuration of this model (see :attr:`presets`), with overrides."""
        if name not in cls.presets:
            raise ValueError(f"name: expected one of {sorted(cls.presets)}, got {name!r}")
        return cls(input_dim=input_dim, **{**cls.presets[name], **overrides})

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = check_backend(name)
        for layer in self.layers:
            layer.attn.backend = self._backend

    # ----------------------------------------------------------------------------------------- state
    @property
    def has_tick(self) -> bool:
        return self.state_class._fields[-1] == "tick"

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of each of one layer's memories for one environment (the state without L and B)."""
        raise NotImplementedError

    def _memory_names(self) -> tuple[str, ...]:
        fields = self.state_class._fields
        return fields[:-1] if self.has_tick else fields

    def _state_dtype(self) -> torch.dtype:
        # Recurrent state is float32 whatever the compute dtype; a float64 model keeps a float64 state
        # so that it can serve as a high-precision oracle.
        return torch.float64 if self.layers[0].ln1.weight.dtype == torch.float64 else torch.float32

    def _prepare_device(self, device: torch.device) -> None:
        """Called by :meth:`initial_state`: build anything a step on ``device`` needs, before any capture."""

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> StateOps:
        """Zero memories (and tick 1 where there is a tick, as the original's ``initialize_memory``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected a non-negative int, got {batch_size!r}")
        if device is None:
            device = self.layers[0].ln1.weight.device
        dt = self._state_dtype()
        self._prepare_device(torch.device(device))
        memories = [
            torch.zeros(self.n_layers, batch_size, *shape, dtype=dt, device=device) for shape in self.memory_shapes()
        ]
        tick = [torch.ones(batch_size, dtype=torch.int64, device=device)] if self.has_tick else []
        return self.state_class(*memories, *tick)

    def reset_state(self, state: StateOps, mask: torch.Tensor) -> StateOps:
        """``state.reset(mask)``: zero the memories of the environments where ``mask`` (B,) is true."""
        return state.reset(mask)

    def check_state(
        self, state: object, batch_size: int | None, device: torch.device | None, name: str = "state"
    ) -> None:
        """Raise if ``state`` does not belong to this model's sizes, ``batch_size`` and ``device`` (``None``:
        the first memory's, for a state whose batch or device nothing else fixes)."""
        cls = self.state_class
        if not isinstance(state, cls):
            raise TypeError(f"{name}: expected an {cls.__name__}, got {type(state).__name__}")
        batch: int | str = "B" if batch_size is None else batch_size
        dt = self._state_dtype()
        for field, tensor, shape in zip(self._memory_names(), state.memories(), self.memory_shapes()):
            check_tensor(f"{name}.{field}", tensor, shape=(self.n_layers, batch, *shape), dtype=dt, device=device)
            # Every other field must agree with the first one's batch and device.
            batch, device = tensor.shape[1], tensor.device
        if self.has_tick:
            check_tensor(f"{name}.tick", state[-1], shape=(batch,), dtype=torch.int64, device=device)

    @property
    def state_size(self) -> int:
        """S, the width of :meth:`pack_state`'s (B, S) tensor: every layer's memories (and one tick word)."""
        return self.n_layers * sum(math.prod(shape) for shape in self.memory_shapes()) + int(self.has_tick)

    @property
    def state_bytes_per_env(self) -> int:
        """Bytes of recurrent state one environment needs (memories of every layer and the tick)."""
        return self.initial_state(0).nbytes_per_env()

    def _pack_tick(self, tick: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unpack_tick(self, word: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pack_state(self, state: StateOps) -> torch.Tensor:
        """One (B, S) tensor per state, for frameworks that keep a flat hidden tensor per environment.

        The memories are stored as they are (a tick as one small exact integer word, see the model's
        ``_pack_tick``), so a zero-filled tensor is exactly :meth:`initial_state`, and multiplying rows by 1
        or 0 (0: the initial state), ``torch.where``, ``cat``, indexing, flushing denormals and replacing
        NaNs in other entries all leave a valid state. :meth:`unpack_state` inverts it.
        """
        self.check_state(state, None, None)
        B = state.batch_size
        parts = [t.transpose(0, 1).reshape(B, -1) for t in state.memories()]
        if self.has_tick:
            parts.append(self._pack_tick(state[-1]).to(parts[0].dtype).unsqueeze(-1))
        return torch.cat(parts, dim=1)

    def unpack_state(self, packed: torch.Tensor) -> StateOps:
        """Inverse of :meth:`pack_state`: the memories bitwise (and the tick as the model's
        ``_unpack_tick`` gives it back)."""
        dt = self._state_dtype()
        check_tensor("packed", packed, shape=("B", self.state_size), dtype=dt)
        B, L = packed.shape[0], self.n_layers
        shapes = self.memory_shapes()
        sizes = [L * math.prod(shape) for shape in shapes] + ([1] if self.has_tick else [])
        pieces = packed.split(sizes, dim=1)
        memories = [
            piece.reshape(B, L, *shape).transpose(0, 1).contiguous() for piece, shape in zip(pieces, shapes)
        ]
        tick = [self._unpack_tick(pieces[-1].reshape(B).to(torch.int64))] if self.has_tick else []
        return self.state_class(*memories, *tick)

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        state: StateOps | None = None,
        dones: torch.Tensor | None = None,
        *,
        out: StateOps | None = None,
        env_ids: torch.Tensor | None = None,
        restart: torch.Tensor | None = None,
        restart_state: StateOps | None = None,
        check_env_ids: bool | None = None,
    ) -> tuple[torch.Tensor, StateOps]:
        """See the class docstring.

        ``out`` (inference only, under ``torch.no_grad()``): a state of the same sizes that receives the
        new state and is returned; it may be ``state`` itself, which then steps in place. Rollouts that
        reuse buffers this way allocate no state memory per step (fresh multi-megabyte buffers cost page
        faults that can dominate a CPU step).

        ``env_ids`` (N,) int64 (inference only): x and dones have N rows, ``state`` has B_s >= N; the
        state rows ``env_ids`` step, in place in ``out`` (``out=state``: the usual case; ``out=None``: a
        copy of ``state``), whose other rows are left as they are; those rows' ticks advance by T. Ids
        must be distinct and in [0, B_s): checked on CPU tensors, and on CUDA ones only with
        ``check_env_ids=True`` (the check needs a host sync). Returns (y with N rows, out).

        ``restart`` (B, T) bool (time-major (T, B) with ``batch_first=False``; (B,) for one step) and
        ``restart_state``, a state of batch N = ``restart.sum()`` whose rows follow the
        row-major order of the true entries of the batch-first mask: where ``restart[b, t]``, the memory
        (and tick) before step t are row n's instead of what was carried (step t's done, if any, still
        zeroes the memory). Differentiable with respect to ``restart_state``'s memories; a returned
        tick counts on from the last restart of each row. N is checked against ``restart.sum()`` on CPU.
        """
        check_tensor("x", x, dtype=FLOAT_DTYPES)
        single = x.dim() == 2
        if x.dim() not in (2, 3):
            layout = "(B, T, input_dim)" if self.batch_first else "(T, B, input_dim)"
            raise ValueError(
                f"x: expected 3 dimensions {layout} or 2 dimensions (B, input_dim), got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"x: expected last dimension input_dim={self.input_dim}, got shape {tuple(x.shape)}")
        param_dtype = self.layers[0].ln1.weight.dtype
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: expected dtype {param_dtype} (the model's parameters), got {x.dtype}")
        param_device = self.layers[0].ln1.weight.device
        if x.device != param_device:
            raise ValueError(f"x: expected a tensor on {param_device} (the model's parameters), got one on {x.device}")
        device = x.device
        if single:
            x = x.unsqueeze(1)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        batch, steps = x.shape[:2]

        dones = self._time_mask("dones", dones, batch, steps, single, device)
        if env_ids is not None:
            if restart is not None or restart_state is not None:
                raise ValueError("env_ids and restart: expected at most one of them, got both")
            h, new_state = self._step_env_ids(x, dones, state, out, env_ids, check_env_ids)
            return (h.squeeze(1) if single else h if self.batch_first else h.transpose(0, 1)), new_state
        if state is None:
            state = self.initial_state(batch, device)
        else:
            self.check_state(state, batch, device)
        if out is not None:
            if torch.is_grad_enabled():
                raise RuntimeError("out: only for inference; call under torch.no_grad() or torch.inference_mode()")
            self.check_state(out, batch, device, name="out")
        restart_index = self._restart_index(restart, restart_state, batch, steps, single, device)

        def restart_of(i: int) -> tuple[torch.Tensor, ...] | None:
            if restart_index is None:
                return None
            assert restart_state is not None
            return (restart_index, *restart_state.layer(i), *((restart_state[-1],) if self.has_tick else ()))

        tick = state[-1] if self.has_tick else None
        final_tick: list[torch.Tensor] = []
        if tick is not None:
            final_tick.append(
                tick + steps
                if restart_index is None
                else _tick_after_restarts(tick, steps, restart_index, restart_state[-1])  # type: ignore[index]
            )
        h = x
        if torch.is_grad_enabled():
            new_memories = []
            for i, layer in enumerate(self.layers):
                h, memory = layer(h, dones, state.layer(i), tick, restart=restart_of(i), check_slots=False)
                new_memories.append(memory)
            new_state = self.state_class(*(torch.stack(parts) for parts in zip(*new_memories)), *final_tick)
        else:
            # Inference: every layer writes its new memory straight into its slot, with no stacking copy.
            if out is None:
                new_state = self.state_class(*(torch.empty_like(t) for t in state.memories()), *final_tick)
            else:
                new_state = out
            for i, layer in enumerate(self.layers):
                h, _ = layer(
                    h, dones, state.layer(i), tick, new_state.layer(i), restart=restart_of(i), check_slots=False
                )
            if out is not None and final_tick:
                # After every layer has read the old tick, so that out may be state itself.
                out[-1].copy_(final_tick[0])
        if single:
            return h.squeeze(1), new_state
        return (h if self.batch_first else h.transpose(0, 1)), new_state

    def _time_mask(
        self,
        name: str,
        mask: torch.Tensor | None,
        batch: int,
        steps: int,
        single: bool,
        device: torch.device,
        check: Callable[..., object] = check_dones,
    ) -> torch.Tensor | None:
        """A per-step mask (``dones``, ``restart``) in the batch-first (B, T) layout, checked against x's
        layout by ``check(name, mask, shape=..., device=...)``."""
        if mask is None:
            return None
        if single:
            check(name, mask, shape=(batch,), device=device)
            return mask.unsqueeze(1)
        if self.batch_first:
            check(name, mask, shape=(batch, steps), device=device)
            return mask
        check(name, mask, shape=(steps, batch), device=device)
        return mask.transpose(0, 1)

    def _restart_index(
        self,
        restart: torch.Tensor | None,
        restart_state: StateOps | None,
        batch: int,
        steps: int,
        single: bool,
        device: torch.device,
    ) -> torch.Tensor | None:
        """(B, T) int64: -1, or the row of ``restart_state`` that step t of row b restarts from."""
        if restart is None and restart_state is None:
            return None
        if restart is None or restart_state is None:
            missing = "restart" if restart is None else "restart_state"
            raise ValueError(f"{missing}: expected restart and restart_state together, got only one of them")
        restart = self._time_mask(
            "restart", restart, batch, steps, single, device, check=functools.partial(check_tensor, dtype=torch.bool)
        )
        self.check_state(restart_state, None, device, name="restart_state")
        if device.type == "cpu":
            wanted = int(restart.sum())
            if wanted != restart_state.batch_size:
                raise ValueError(
                    f"restart_state: expected batch size restart.sum()={wanted}, got {restart_state.batch_size}"
                )
        # Row-major numbering of the true entries, without a host sync.
        numbered = torch.cumsum(restart.reshape(-1), 0).view(batch, steps) - 1
        return torch.where(restart, numbered, -1)

    def _step_env_ids(
        self,
        x: torch.Tensor,
        dones: torch.Tensor | None,
        state: StateOps | None,
        out: StateOps | None,
        env_ids: torch.Tensor,
        check_env_ids: bool | None,
    ) -> tuple[torch.Tensor, StateOps]:
        if torch.is_grad_enabled():
            raise RuntimeError("env_ids: only for inference; call under torch.no_grad() or torch.inference_mode()")
        device = x.device
        if state is None:
            raise ValueError("state: env_ids steps rows of a given state, got None")
        self.check_state(state, None, device)
        state_batch = state.batch_size
        if out is None:
            out = state.clone()
        else:
            self.check_state(out, state_batch, device, name="out")
        check = device.type == "cpu" if check_env_ids is None else check_env_ids
        check_slot_rows(env_ids, x.shape[0], state_batch, device, check, name="env_ids")
        tick = state[-1] if self.has_tick else None
        h = x
        for i, layer in enumerate(self.layers):
            # Checked once above, not again by every layer (each check is a host sync).
            h, _ = layer(h, dones, state.layer(i), tick, out.layer(i), slots=env_ids, check_slots=False)
        if tick is not None:
            # After every layer has read the old tick, so that out may be state itself.
            out[-1].index_copy_(0, env_ids, tick.index_select(0, env_ids) + x.shape[1])
        return h, out



def _tick_after_restarts(
    tick: torch.Tensor, steps: int, index: torch.Tensor, restart_tick: torch.Tensor
) -> torch.Tensor:
    """The tick after a call: the last restart's tick plus the steps from it, or ``tick + steps``."""
    t_idx = torch.arange(steps, device=tick.device, dtype=torch.int64)
    last = torch.where(index >= 0, t_idx, -1).amax(dim=1) if steps else torch.full_like(tick, -1)
    has = last >= 0
    row = index.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1) if steps else last
    padded = torch.cat([restart_tick, restart_tick.new_zeros(1)])
    start = padded[torch.where(has, row, padded.shape[0] - 1)]
    return torch.where(has, start + (steps - last), tick + steps)
