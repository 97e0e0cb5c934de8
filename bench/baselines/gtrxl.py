"""GTrXL (Parisotto et al. 2019), the transformer baseline the AGaLiTe paper compares against.

Each layer is the gated, identity-map-reordered Transformer-XL layer:

    Y  = RelMHA(LN([sg(M), E]))          relative positions, learnable u / v biases (Dai et al. 2019)
    E' = g1(E, relu(Y))                  GRU-type gate, bias b_g = 2 (the package's GRUGatingUnit)
    E''= g2(E', relu(FFN(LN(E'))))

with a memory ``M`` of the layer's last ``memory`` inputs, carried without gradient. Attention scores
are ``((q_i + u) . k_j + (q_i + v) . W_r R_{i-j}) / sqrt(d_head)``. A query sees itself and at most
the M positions before it (memory slots, then earlier steps of the segment), and only those of its own
episode: a ``done`` hides everything before it. The window of M keeps a (B, T) training segment
identical to stepping through it, whatever T.

Two ways to act, picked by the state passed in (``initial_state`` gives the one of ``mode``):

* ``recompute`` (:class:`GTrXLState`): the memory holds hidden states and every call recomputes the
  keys and values of all of it, as the paper's baseline does. This is also the training path: a
  (B, T) segment from a stored memory runs in one call.
* ``kv_cache`` (:class:`GTrXLKVState`): a per-layer ring buffer of keys and values, the strong
  inference baseline. Keys are cached without position (Transformer-XL's keys are position-free); the
  relative term is recomputed from each slot's distance to the query, so both modes agree exactly.
  With autograd off the ring is updated in place (the returned state shares the input's buffers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from agalite_triton import GRUGatingUnit

from .inputs import as_sequence
from .relative_position import sinusoid

__all__ = ["GTrXL", "GTrXLKVState", "GTrXLLayer", "GTrXLState", "MODES"]

MODES = ("recompute", "kv_cache")


class GTrXLState(NamedTuple):
    """Hidden-state memory: what the paper's GTrXL carries, and what training starts from."""

    memory: torch.Tensor  # (L, B, M, d_model) inputs of each layer at the last M steps, oldest first
    since_done: torch.Tensor  # (B,) int64: how many of those M steps belong to the current episode

    @property
    def batch_size(self) -> int:
        return self.memory.shape[1]

    def nbytes_per_env(self) -> int:
        return _bytes_per_env(self, batch_dims=(1, 0))


class GTrXLKVState(NamedTuple):
    """Key/value ring buffers of M + 1 slots (M of memory plus the slot the next step writes)."""

    keys: torch.Tensor  # (L, B, H, M + 1, d_head)
    values: torch.Tensor  # (L, B, H, M + 1, d_head)
    since_done: torch.Tensor  # (B,) int64
    head: torch.Tensor  # () int64: the slot the next step writes; all environments step together

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def nbytes_per_env(self) -> int:
        return _bytes_per_env(self, batch_dims=(1, 1, 0, None))


def _bytes_per_env(state: tuple, batch_dims: tuple[int | None, ...]) -> int:
    # A dim of None marks a tensor shared by all environments (the ring head).
    return sum(t.nbytes // t.shape[dim] for t, dim in zip(state, batch_dims) if dim is not None)


class GTrXLLayer(nn.Module):
    """One gated Transformer-XL layer; see the module docstring for the maths."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, d_ff: int, gate_bias: float) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        inner = n_heads * d_head
        self.ln1 = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, inner, bias=False)
        self.key_value = nn.Linear(d_model, 2 * inner, bias=False)
        self.position = nn.Linear(d_model, inner, bias=False)  # W_r
        self.u = nn.Parameter(torch.randn(n_heads, d_head) * 0.02)  # content bias
        self.v = nn.Parameter(torch.randn(n_heads, d_head) * 0.02)  # position bias
        self.out = nn.Linear(inner, d_model, bias=False)
        self.gate1 = GRUGatingUnit(d_model, gate_bias)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.gate2 = GRUGatingUnit(d_model, gate_bias)

    def _after_attention(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        y = self.gate1(h, F.relu(self.out(attn)))
        return self.gate2(y, F.relu(self.ff_out(F.relu(self.ff_in(self.ln2(y))))))

    def _biased_queries(self, q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (B, H, T, Dh). Under autocast q is low precision and u, v are float32: bring both to dtype.
        return (q + self.u[:, None]).to(dtype), (q + self.v[:, None]).to(dtype)

    def segment(
        self,
        h: torch.Tensor,
        context: torch.Tensor,
        rel: torch.Tensor,
        distance: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """T queries over S = M + T keys.

        h (B, T, d): layer input; context (B, S, d): [detached memory, h]; rel (S, d): R_0 .. R_{S-1};
        distance (T, S) long: query-key distances clamped at 0; mask (B, 1, T, S) additive.
        """
        B, T, _ = h.shape
        S = context.shape[1]
        H, Dh = self.n_heads, self.d_head
        u = self.ln1(context)
        q = self.query(u[:, S - T :]).view(B, T, H, Dh).transpose(1, 2)
        k, v = self.key_value(u).view(B, S, 2, H, Dh).permute(2, 0, 3, 1, 4)
        q_content, q_position = self._biased_queries(q, k.dtype)
        r = self.position(rel).view(S, H, Dh).to(k.dtype)
        by_distance = torch.einsum("bhtd,phd->bhtp", q_position, r)  # (B, H, T, distance)
        pos_scores = by_distance.gather(-1, distance.expand(B, H, T, S))
        bias = (pos_scores * Dh**-0.5 + mask).to(k.dtype)
        attn = F.scaled_dot_product_attention(q_content, k, v, attn_mask=bias)
        return self._after_attention(h, attn.transpose(1, 2).reshape(B, T, H * Dh))

    def step_cached(
        self,
        h: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        head: torch.Tensor,
        slot_rel: torch.Tensor,
        mask: torch.Tensor,
        in_place: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One query against the ring. h (B, d); keys/values (B, H, S, Dh); head (1,) long, the slot this
        step writes; slot_rel (S, d): R of each slot's distance to the query; mask (B, 1, 1, S) additive."""
        B = h.shape[0]
        H, Dh = self.n_heads, self.d_head
        S = keys.shape[2]
        u = self.ln1(h)
        q = self.query(u).view(B, H, 1, Dh)
        k, v = self.key_value(u).view(B, 2, H, 1, Dh).unbind(1)
        if in_place:
            keys.index_copy_(2, head, k.to(keys.dtype))
            values.index_copy_(2, head, v.to(values.dtype))
        else:
            keys = keys.index_copy(2, head, k.to(keys.dtype))
            values = values.index_copy(2, head, v.to(values.dtype))
        q_content, q_position = self._biased_queries(q, keys.dtype)
        r = self.position(slot_rel).view(S, H, Dh).to(keys.dtype)
        # Attend in the cache's own dtype: under autocast, SDPA would otherwise copy the whole ring to
        # bf16 at every step, a cost no real KV cache pays.
        with torch.autocast(keys.device.type, enabled=False):
            pos_scores = torch.einsum("bhqd,shd->bhqs", q_position, r)
            bias = pos_scores * Dh**-0.5 + mask
            attn = F.scaled_dot_product_attention(q_content, keys, values, attn_mask=bias.to(keys.dtype))
        return self._after_attention(h, attn.reshape(B, H * Dh)), keys, values


class GTrXL(nn.Module):
    """Gated Transformer-XL with a step API: ``y, state = gtrxl(x, state, dones)``.

    x (B, T, input_dim) or one step (B, input_dim); dones (B, T) / (B,) bool or 0/1, where
    ``dones[b, t]`` means observation t starts a new episode (same convention as AGaLiTe). A
    :class:`GTrXLState` runs the whole segment at once (recompute / training); a
    :class:`GTrXLKVState` steps through it with the key/value cache.
    """

    def __init__(
        self,
        input_dim: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_head: int = 64,
        d_ff: int = 128,
        memory: int = 128,
        mode: str = "recompute",
        gate_bias: float = 2.0,
    ) -> None:
        super().__init__()
        sizes = dict(input_dim=input_dim, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     d_head=d_head, d_ff=d_ff, memory=memory)  # fmt: skip
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if d_model % 2:
            raise ValueError(f"d_model: expected an even int (sinusoidal positions), got {d_model}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.input_dim, self.d_model, self.n_layers = input_dim, d_model, n_layers
        self.n_heads, self.d_head, self.memory_len, self.mode = n_heads, d_head, memory, mode
        self.embed = nn.Linear(input_dim, d_model)
        self.layers = nn.ModuleList(GTrXLLayer(d_model, n_heads, d_head, d_ff, gate_bias) for _ in range(n_layers))

    # ----------------------------------------------------------------------------------------- state
    def _device(self) -> torch.device:
        return self.embed.weight.device

    def memory_state(self, batch_size: int, device: torch.device | str | None = None) -> GTrXLState:
        """Empty hidden-state memory (the recompute / training state)."""
        device = self._device() if device is None else torch.device(device)
        L, M, d = self.n_layers, self.memory_len, self.d_model
        return GTrXLState(
            torch.zeros(L, batch_size, M, d, device=device),
            torch.zeros(batch_size, dtype=torch.int64, device=device),
        )

    def cache_state(self, batch_size: int, device: torch.device | str | None = None) -> GTrXLKVState:
        """Empty key/value ring buffers (the kv_cache state)."""
        device = self._device() if device is None else torch.device(device)
        shape = (self.n_layers, batch_size, self.n_heads, self.memory_len + 1, self.d_head)
        return GTrXLKVState(
            torch.zeros(shape, device=device),
            torch.zeros(shape, device=device),
            torch.zeros(batch_size, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> GTrXLState | GTrXLKVState:
        """The empty state of this model's ``mode``."""
        if self.mode == "kv_cache":
            return self.cache_state(batch_size, device)
        return self.memory_state(batch_size, device)

    @property
    def state_bytes_per_env(self) -> int:
        """Bytes per environment of the state ``initial_state`` gives (float32 buffers, int64 counter)."""
        return self.initial_state(1, "meta").nbytes_per_env()

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        state: GTrXLState | GTrXLKVState | None = None,
        dones: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, GTrXLState | GTrXLKVState]:
        x, dones, single = as_sequence(x, dones, self.input_dim)
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch, x.device)
        if isinstance(state, GTrXLKVState):
            self._check_cache(state, batch, x.device)
            y, state = self._cached_steps(x, state, dones)
        elif isinstance(state, GTrXLState):
            self._check_memory(state, batch, x.device)
            y, state = self._segment(x, state, dones)
        else:
            raise TypeError(f"state: expected GTrXLState, GTrXLKVState or None, got {type(state).__name__}")
        return (y.squeeze(1) if single else y), state

    def _check_memory(self, state: GTrXLState, batch: int, device: torch.device) -> None:
        expected = (self.n_layers, batch, self.memory_len, self.d_model)
        if tuple(state.memory.shape) != expected or state.memory.device != device:
            raise ValueError(
                f"state.memory: expected shape {expected} on {device}, "
                f"got {tuple(state.memory.shape)} on {state.memory.device}"
            )
        _check_counter(state.since_done, batch, device)

    def _check_cache(self, state: GTrXLKVState, batch: int, device: torch.device) -> None:
        expected = (self.n_layers, batch, self.n_heads, self.memory_len + 1, self.d_head)
        for name, t in (("keys", state.keys), ("values", state.values)):
            if tuple(t.shape) != expected or t.device != device:
                raise ValueError(
                    f"state.{name}: expected shape {expected} on {device}, got {tuple(t.shape)} on {t.device}"
                )
        _check_counter(state.since_done, batch, device)

    def _segment(
        self, x: torch.Tensor, state: GTrXLState, dones: torch.Tensor | None
    ) -> tuple[torch.Tensor, GTrXLState]:
        B, T = x.shape[:2]
        M = self.memory_len
        device = x.device
        steps = torch.arange(T, device=device)
        keys = torch.arange(M + T, device=device)
        if dones is None:
            last_done = torch.full((B, T), -1, dtype=torch.int64, device=device)
        else:
            last_done = torch.where(dones, steps, -1).cummax(dim=1).values  # (B, T)
        # Query t (at position M + t) sees its own episode's positions, at most M back: a window of M,
        # exactly what stepping sees, so that training matches acting even when T > M.
        first = torch.maximum(torch.where(last_done >= 0, M + last_done, M - state.since_done[:, None]), steps)
        query_pos = M + steps
        visible = (keys >= first[..., None]) & (keys <= query_pos[:, None])  # (B, T, S)
        mask = torch.zeros(B, 1, T, M + T, device=device).masked_fill(~visible[:, None], float("-inf"))
        distance = (query_pos[:, None] - keys).clamp(min=0)
        rel = sinusoid(keys, self.d_model)

        h = self.embed(x)
        memories = []
        for layer, memory in zip(self.layers, state.memory):
            context = torch.cat([memory.detach(), h], dim=1)
            memories.append(context[:, T:].detach())
            h = layer.segment(h, context, rel, distance, mask)
        end = last_done[:, -1]
        since = torch.where(end >= 0, T - end, state.since_done + T).clamp(max=M)
        return h, GTrXLState(torch.stack(memories), since)

    def _cached_steps(
        self, x: torch.Tensor, state: GTrXLKVState, dones: torch.Tensor | None
    ) -> tuple[torch.Tensor, GTrXLKVState]:
        in_place = not torch.is_grad_enabled()
        keys, values, since, head = state
        slots = torch.arange(self.memory_len + 1, device=x.device)
        outputs = []
        for t in range(x.shape[1]):
            if dones is not None:
                since = since.masked_fill(dones[:, t], 0)
            distance = (head - slots) % (self.memory_len + 1)  # slot `head` is this step: distance 0
            hidden = distance[None, :] > since[:, None]
            mask = torch.zeros(hidden.shape, device=x.device).masked_fill(hidden, float("-inf"))[:, None, None]
            slot_rel = sinusoid(distance, self.d_model)
            h = self.embed(x[:, t])
            new_keys, new_values = [], []
            for layer, k, v in zip(self.layers, keys, values):
                h, k, v = layer.step_cached(h, k, v, head.view(1), slot_rel, mask, in_place)
                new_keys.append(k)
                new_values.append(v)
            if not in_place:
                keys, values = torch.stack(new_keys), torch.stack(new_values)
            outputs.append(h)
            head = (head + 1) % (self.memory_len + 1)
            since = (since + 1).clamp(max=self.memory_len)
        return torch.stack(outputs, dim=1), GTrXLKVState(keys, values, since, head)


def _check_counter(since_done: torch.Tensor, batch: int, device: torch.device) -> None:
    if tuple(since_done.shape) != (batch,) or since_done.dtype != torch.int64 or since_done.device != device:
        raise ValueError(
            f"state.since_done: expected int64 shape ({batch},) on {device}, "
            f"got {since_done.dtype} {tuple(since_done.shape)} on {since_done.device}"
        )
