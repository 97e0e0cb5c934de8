"""The AGaLiTe stack: the module RL code puts where its LSTM was."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._validation import FLOAT_DTYPES, check_dones, check_slot_rows, check_tensor
from .backend import check_backend
from .layer import AGaLiTeLayer
from .oscillator import oscillator_period, oscillator_table
from .presets import PRESETS
from .state import AGaLiTeState

__all__ = ["AGaLiTe"]


class AGaLiTe(nn.Module):
    """A stack of AGaLiTe layers with a recurrent state whose size does not grow with context.

    ``y, new_state = model(x, state, dones)``:
      * ``x``: (B, T, input_dim) (or (T, B, input_dim) with ``batch_first=False``), or one step (B, input_dim).
      * ``dones``: (B, T) (or (T, B)) / (B,), bool or 0/1 float; ``dones[b, t]`` means observation t
        starts a new episode, so environment b's memory is zeroed before step t. The tick keeps counting.
      * ``state``: an :class:`AGaLiTeState` (``None``: :meth:`initial_state`). Not modified.
      * ``y``: (B, T, d_model) (or time-major) / (B, d_model). A call of T steps advances the tick by T.

    Keyword-only: ``out`` (a state that receives the new state, inference), ``env_ids`` (step a subset of
    a larger state in place, for async environments) and ``restart``/``restart_state`` (restart chosen
    steps from stored states, for TorchRL's recurrent-mode replay); see :meth:`forward`.
    """

    def __init__(
        self,
        input_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_head: int,
        d_ffc: int,
        eta: int,
        r: int,
        reset_on_terminate: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        sizes = dict(input_dim=input_dim, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     d_head=d_head, d_ffc=d_ffc, eta=eta, r=r)  # fmt: skip
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        self.config: dict[str, Any] = dict(sizes, reset_on_terminate=reset_on_terminate, dropout=dropout)
        self.input_dim, self.d_model, self.n_layers = input_dim, d_model, n_layers
        self.n_heads, self.d_head, self.eta, self.r = n_heads, d_head, eta, r
        self.batch_first = batch_first
        self._backend = check_backend(backend)
        self.layers = nn.ModuleList(
            AGaLiTeLayer(
                d_model, n_heads, d_head, d_ffc, eta, r,
                input_dim=input_dim if i == 0 else None,
                reset_on_terminate=reset_on_terminate, dropout=dropout, backend=backend,
            )
            for i in range(n_layers)
        )  # fmt: skip

    @classmethod
    def from_preset(cls, name: str, input_dim: int, **overrides: Any) -> AGaLiTe:
        """Build a named configuration (see :data:`agalite_triton.presets.PRESETS`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(input_dim=input_dim, **{**PRESETS[name], **overrides})

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
    def feature_dim(self) -> int:
        return self.eta * self.d_head

    def _state_dtype(self) -> torch.dtype:
        # Recurrent state is float32 whatever the compute dtype; a float64 model keeps a float64 state
        # so that it can serve as a high-precision oracle.
        return torch.float64 if self.layers[0].ln1.weight.dtype == torch.float64 else torch.float32

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> AGaLiTeState:
        """Zero memories and tick 1 for ``batch_size`` environments (the original's ``initialize_memory``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected a non-negative int, got {batch_size!r}")
        if device is None:
            device = self.layers[0].ln1.weight.device
        dt = self._state_dtype()
        L, B, R, H, D, E = self.n_layers, batch_size, self.r, self.n_heads, self.d_head, self.feature_dim
        if torch.device(device).type == "cuda":
            # Built now (a host-to-device copy), so that a CUDA graph captured right after needs no warm-up step.
            oscillator_table(R, device)
        return AGaLiTeState(
            torch.zeros(L, B, R, H, E, dtype=dt, device=device),
            torch.zeros(L, B, R, H, D, dtype=dt, device=device),
            torch.zeros(L, B, H, E, dtype=dt, device=device),
            torch.ones(B, dtype=torch.int64, device=device),
        )

    @staticmethod
    def reset_state(state: AGaLiTeState, mask: torch.Tensor) -> AGaLiTeState:
        """``state.reset(mask)``: zero the memories of the environments where ``mask`` (B,) is true."""
        return state.reset(mask)

    def check_state(self, state: object, batch_size: int, device: torch.device, name: str = "state") -> None:
        """Raise if ``state`` does not belong to this model's sizes, ``batch_size`` and ``device``."""
        if not isinstance(state, AGaLiTeState):
            raise TypeError(f"{name}: expected an AGaLiTeState, got {type(state).__name__}")
        L, B, R, H, D, E = self.n_layers, batch_size, self.r, self.n_heads, self.d_head, self.feature_dim
        dt = self._state_dtype()
        check_tensor(f"{name}.tilde_k", state.tilde_k, shape=(L, B, R, H, E), dtype=dt, device=device)
        check_tensor(f"{name}.tilde_v", state.tilde_v, shape=(L, B, R, H, D), dtype=dt, device=device)
        check_tensor(f"{name}.s", state.s, shape=(L, B, H, E), dtype=dt, device=device)
        check_tensor(f"{name}.tick", state.tick, shape=(B,), dtype=torch.int64, device=device)

    @property
    def state_size(self) -> int:
        """S, the width of :meth:`pack_state`'s (B, S) tensor: every layer's memories and one tick word."""
        L, R, H, D, E = self.n_layers, self.r, self.n_heads, self.d_head, self.feature_dim
        return L * (R * H * E + R * H * D + H * E) + 1

    @property
    def tick_period(self) -> int:
        """P: outputs depend on the tick only modulo P (the oscillators' common period, 2 (r - 1) or 2)."""
        return oscillator_period(self.r)

    @property
    def state_bytes_per_env(self) -> int:
        """Bytes of recurrent state one environment needs (memories of every layer and the tick)."""
        return self.initial_state(0).nbytes_per_env()

    def pack_state(self, state: AGaLiTeState) -> torch.Tensor:
        """One (B, S) tensor per state, for frameworks that keep a flat hidden tensor per environment.

        The memories are stored as they are; the tick as one word holding ``(tick - 1) mod P``, a small
        exact integer (P = :attr:`tick_period`). So a zero-filled tensor is exactly :meth:`initial_state`,
        and multiplying rows by 1 or 0 (0: the initial state), ``torch.where``, ``cat``, indexing, flushing
        denormals and replacing NaNs in other entries all leave a valid state. :meth:`unpack_state` inverts it.
        """
        self.check_state(state, state.batch_size, state.device)
        B = state.batch_size
        dt = state.tilde_k.dtype
        parts = [t.transpose(0, 1).reshape(B, -1) for t in state.memories()]
        # Reduced before subtracting, so that no tick can overflow.
        word = torch.remainder(torch.remainder(state.tick, self.tick_period) - 1, self.tick_period)
        parts.append(word.to(dt).unsqueeze(-1))
        return torch.cat(parts, dim=1)

    def unpack_state(self, packed: torch.Tensor) -> AGaLiTeState:
        """Inverse of :meth:`pack_state`: the memories bitwise, and ``tick = 1 + word`` in [1, P].

        That tick is congruent to the packed one modulo P, so every output and memory that follows is
        the same as from the original state; only the tick's value differs (``initial_state``'s 1 for a
        zero word). The word must hold an exact integer in [0, P), as ``pack_state`` writes it.
        """
        dt = self._state_dtype()
        check_tensor("packed", packed, shape=("B", self.state_size), dtype=dt)
        B = packed.shape[0]
        L, R, H, D, E = self.n_layers, self.r, self.n_heads, self.d_head, self.feature_dim
        tk, tv, s, word = packed.split([L * R * H * E, L * R * H * D, L * H * E, 1], dim=1)
        return AGaLiTeState(
            tk.reshape(B, L, R, H, E).transpose(0, 1).contiguous(),
            tv.reshape(B, L, R, H, D).transpose(0, 1).contiguous(),
            s.reshape(B, L, H, E).transpose(0, 1).contiguous(),
            word.reshape(B).to(torch.int64) + 1,
        )

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        state: AGaLiTeState | None = None,
        dones: torch.Tensor | None = None,
        *,
        out: AGaLiTeState | None = None,
        env_ids: torch.Tensor | None = None,
        restart: torch.Tensor | None = None,
        restart_state: AGaLiTeState | None = None,
        check_env_ids: bool | None = None,
    ) -> tuple[torch.Tensor, AGaLiTeState]:
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
        ``restart_state``, an :class:`AGaLiTeState` of batch N = ``restart.sum()`` whose rows follow the
        row-major order of the true entries of the batch-first mask: where ``restart[b, t]``, the memory
        and tick before step t are row n's instead of what was carried (step t's done, if any, still
        zeroes the memory). Differentiable with respect to ``restart_state``'s memories; the returned
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
            return (restart_index, *restart_state.layer(i), restart_state.tick)

        final_tick = (
            state.tick + steps
            if restart_index is None
            else _tick_after_restarts(state.tick, steps, restart_index, restart_state.tick)  # type: ignore[union-attr]
        )
        h = x
        if torch.is_grad_enabled():
            new_memories = []
            for i, layer in enumerate(self.layers):
                h, memory = layer(h, dones, state.layer(i), state.tick, restart=restart_of(i), check_slots=False)
                new_memories.append(memory)
            new_state = AGaLiTeState(*(torch.stack(parts) for parts in zip(*new_memories)), final_tick)
        else:
            # Inference: every layer writes its new memory straight into its slot, with no stacking copy.
            if out is None:
                new_state = AGaLiTeState(*(torch.empty_like(t) for t in state.memories()), final_tick)
            else:
                new_state = out
            for i, layer in enumerate(self.layers):
                h, _ = layer(
                    h, dones, state.layer(i), state.tick, new_state.layer(i), restart=restart_of(i), check_slots=False
                )
            if out is not None:
                # After every layer has read the old tick, so that out may be state itself.
                out.tick.copy_(final_tick)
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
        restart_state: AGaLiTeState | None,
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
        if not isinstance(restart_state, AGaLiTeState):
            raise TypeError(f"restart_state: expected an AGaLiTeState, got {type(restart_state).__name__}")
        self.check_state(restart_state, restart_state.batch_size, device, name="restart_state")
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
        state: AGaLiTeState | None,
        out: AGaLiTeState | None,
        env_ids: torch.Tensor,
        check_env_ids: bool | None,
    ) -> tuple[torch.Tensor, AGaLiTeState]:
        if torch.is_grad_enabled():
            raise RuntimeError("env_ids: only for inference; call under torch.no_grad() or torch.inference_mode()")
        device = x.device
        if state is None:
            raise ValueError("state: env_ids steps rows of a given state, got None")
        if not isinstance(state, AGaLiTeState):
            raise TypeError(f"state: expected an AGaLiTeState, got {type(state).__name__}")
        state_batch = state.batch_size
        self.check_state(state, state_batch, device)
        if out is None:
            out = state.clone()
        else:
            self.check_state(out, state_batch, device, name="out")
        check = device.type == "cpu" if check_env_ids is None else check_env_ids
        check_slot_rows(env_ids, x.shape[0], state_batch, device, check, name="env_ids")
        new_tick = state.tick.index_select(0, env_ids) + x.shape[1]
        h = x
        for i, layer in enumerate(self.layers):
            # Checked once above, not again by every layer (each check is a host sync).
            h, _ = layer(h, dones, state.layer(i), state.tick, out.layer(i), slots=env_ids, check_slots=False)
        out.tick.index_copy_(0, env_ids, new_tick)
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
