"""The AGaLiTe stack: the module RL code puts where its LSTM was."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._validation import FLOAT_DTYPES, check_dones, check_tensor
from .backend import check_backend
from .layer import AGaLiTeLayer
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
        """S, the width of :meth:`pack_state`'s (B, S) tensor."""
        L, R, H, D, E = self.n_layers, self.r, self.n_heads, self.d_head, self.feature_dim
        tick_words = 8 // torch.empty((), dtype=self._state_dtype()).element_size()
        return L * (R * H * E + R * H * D + H * E) + tick_words

    @property
    def state_bytes_per_env(self) -> int:
        """Bytes of recurrent state one environment needs (memories of every layer and the tick)."""
        return self.initial_state(0).nbytes_per_env()

    def pack_state(self, state: AGaLiTeState) -> torch.Tensor:
        """One (B, S) tensor per state, for frameworks that keep a flat hidden tensor per environment.

        Lossless: the int64 tick is stored bitwise in the last words, so the tensor is opaque (index,
        concatenate and store it; never do arithmetic on it). :meth:`unpack_state` inverts it.
        """
        self.check_state(state, state.batch_size, state.device)
        B = state.batch_size
        dt = state.tilde_k.dtype
        parts = [t.transpose(0, 1).reshape(B, -1) for t in state.memories()]
        parts.append(state.tick.unsqueeze(-1).view(dt))
        return torch.cat(parts, dim=1)

    def unpack_state(self, packed: torch.Tensor) -> AGaLiTeState:
        """Inverse of :meth:`pack_state`."""
        dt = self._state_dtype()
        check_tensor("packed", packed, shape=("B", self.state_size), dtype=dt)
        B = packed.shape[0]
        L, R, H, D, E = self.n_layers, self.r, self.n_heads, self.d_head, self.feature_dim
        sizes = [L * R * H * E, L * R * H * D, L * H * E, self.state_size - L * (R * H * E + R * H * D + H * E)]
        tk, tv, s, tick = packed.split(sizes, dim=1)
        return AGaLiTeState(
            tk.reshape(B, L, R, H, E).transpose(0, 1).contiguous(),
            tv.reshape(B, L, R, H, D).transpose(0, 1).contiguous(),
            s.reshape(B, L, H, E).transpose(0, 1).contiguous(),
            tick.contiguous().view(torch.int64).reshape(B),
        )

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        state: AGaLiTeState | None = None,
        dones: torch.Tensor | None = None,
        *,
        out: AGaLiTeState | None = None,
    ) -> tuple[torch.Tensor, AGaLiTeState]:
        """See the class docstring. ``out`` (inference only, under ``torch.no_grad()``): a state of the
        same sizes that receives the new state and is returned; it may be ``state`` itself, which then
        steps in place. Rollouts that reuse buffers this way allocate no state memory per step (fresh
        multi-megabyte buffers cost page faults that can dominate a CPU step)."""
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

        if dones is not None:
            if single:
                check_dones("dones", dones, (batch,), device)
                dones = dones.unsqueeze(1)
            elif self.batch_first:
                check_dones("dones", dones, (batch, steps), device)
            else:
                check_dones("dones", dones, (steps, batch), device)
                dones = dones.transpose(0, 1)
        if state is None:
            state = self.initial_state(batch, device)
        else:
            self.check_state(state, batch, device)
        if out is not None:
            if torch.is_grad_enabled():
                raise RuntimeError("out: only for inference; call under torch.no_grad() or torch.inference_mode()")
            self.check_state(out, batch, device, name="out")

        h = x
        if torch.is_grad_enabled():
            new_memories = []
            for i, layer in enumerate(self.layers):
                h, memory = layer(h, dones, state.layer(i), state.tick)
                new_memories.append(memory)
            new_state = AGaLiTeState(*(torch.stack(parts) for parts in zip(*new_memories)), state.tick + steps)
        else:
            # Inference: every layer writes its new memory straight into its slot, with no stacking copy.
            if out is None:
                new_state = AGaLiTeState(*(torch.empty_like(t) for t in state.memories()), state.tick + steps)
            else:
                new_state = out
            for i, layer in enumerate(self.layers):
                h, _ = layer(h, dones, state.layer(i), state.tick, new_state.layer(i))
            if out is not None:
                # After every layer has read the old tick, so that out may be state itself.
                torch.add(state.tick, steps, out=out.tick)
        if single:
            return h.squeeze(1), new_state
        return (h if self.batch_first else h.transpose(0, 1)), new_state
