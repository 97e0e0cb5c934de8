"""Import parameters and memories from the original JAX/Flax AGaLiTe (and export back for checks).

Flax ``Dense`` kernels are (in, out) with ``y = x @ kernel + bias``; a torch ``nn.Linear`` weight is
``kernel.T``. Where this package fuses the original's Dense layers, the Flax kernels are concatenated
along ``out``: ``in_proj = [linear_kqvbetagammas | linear_p1p2p3]``, ``w_y = [Wr | Wz | Wg]``,
``u_x = [Ur | Uz]``. Parameter scopes are ``layer<l>`` (no underscore), memory keys ``layer_<l>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .model import AGaLiTe
from .state import AGaLiTeState

__all__ = ["export_flax_params", "flax_param_shapes", "load_flax_params", "state_from_flax_memory",
           "state_to_flax_memory"]  # fmt: skip

_ATT = "AttentionORLiTLayer_0"
Entry = tuple[torch.Tensor, list[str], bool]


def _entries(model: AGaLiTe) -> list[Entry]:
    """Every model tensor, the Flax paths it is made of (concatenated along ``out``), and whether it
    is a kernel (stored transposed in torch)."""
    entries: list[Entry] = []
    for i, layer in enumerate(model.layers):
        p = f"params/layer{i + 1}"
        att = f"{p}/{_ATT}"
        if layer.emb is not None:
            entries += [(layer.emb.weight, [f"{p}/emb_layer/kernel"], True),
                        (layer.emb.bias, [f"{p}/emb_layer/bias"], False)]  # fmt: skip
        entries += [
            (layer.ln1.weight, [f"{p}/LayerNorm_0/scale"], False),
            (layer.ln1.bias, [f"{p}/LayerNorm_0/bias"], False),
            (layer.attn.in_proj.weight, [f"{att}/linear_kqvbetagammas/kernel", f"{att}/linear_p1p2p3/kernel"], True),
            (layer.attn.in_proj.bias, [f"{att}/linear_kqvbetagammas/bias", f"{att}/linear_p1p2p3/bias"], False),
            (layer.attn.project.weight, [f"{att}/project/kernel"], True),
            (layer.attn.project.bias, [f"{att}/project/bias"], False),
            (layer.ln2.weight, [f"{p}/LayerNorm_1/scale"], False),
            (layer.ln2.bias, [f"{p}/LayerNorm_1/bias"], False),
            (layer.ffn_in.weight, [f"{p}/Dense_0/kernel"], True),
            (layer.ffn_in.bias, [f"{p}/Dense_0/bias"], False),
            (layer.ffn_out.weight, [f"{p}/Dense_1/kernel"], True),
            (layer.ffn_out.bias, [f"{p}/Dense_1/bias"], False),
        ]
        for g, gate in enumerate((layer.gate1, layer.gate2)):
            q = f"{p}/GRUGatingUnit_{g}"
            entries += [
                (gate.w_y.weight, [f"{q}/Wr/kernel", f"{q}/Wz/kernel", f"{q}/Wg/kernel"], True),
                (gate.u_x.weight, [f"{q}/Ur/kernel", f"{q}/Uz/kernel"], True),
                (gate.u_g.weight, [f"{q}/Ug/kernel"], True),
                (gate.bgp, [f"{q}/bgp"], False),
            ]
    return entries


def _split_sizes(model: AGaLiTe, paths: list[str]) -> list[int]:
    if len(paths) == 1:
        return []
    if paths[0].endswith(("linear_kqvbetagammas/kernel", "linear_kqvbetagammas/bias")):
        return [5 * model.n_heads * model.d_head, 3 * model.n_heads * model.eta]
    return [model.d_model] * len(paths)


def flax_param_shapes(model: AGaLiTe) -> dict[str, tuple[int, ...]]:
    """The Flax path -> shape every parameter of ``model`` expects."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor, paths, is_kernel in _entries(model):
        sizes = _split_sizes(model, paths) or [tensor.shape[0]]
        for path, n in zip(paths, sizes):
            shapes[path] = (tensor.shape[1], n) if is_kernel else (n,)
    return shapes


def _normalise_key(key: str) -> str:
    return key if key.startswith("params/") else f"params/{key}"


def load_flax_params(model: AGaLiTe, flat: Mapping[str, Any]) -> None:
    """Copy the original's parameters into ``model`` in place.

    ``flat`` maps ``'params/layer1/emb_layer/kernel'``-style paths (the ``params/`` prefix may be
    omitted) to arrays. Every path the model needs must be present with its exact shape and no other
    path may be given: otherwise a ``KeyError``/``ValueError`` lists every missing, unexpected and
    mis-shaped key. Nothing is copied unless everything matches.
    """
    given = {_normalise_key(k): v for k, v in flat.items()}
    expected = flax_param_shapes(model)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    bad_shape = [
        f"{k}: expected {expected[k]}, got {tuple(np.shape(given[k]))}"
        for k in sorted(set(expected) & set(given))
        if tuple(np.shape(given[k])) != expected[k]
    ]
    if missing or unexpected:
        raise KeyError(
            "flat: parameter keys do not match the model "
            f"(missing {len(missing)}: {missing}; unexpected {len(unexpected)}: {unexpected}; "
            f"wrong shape: {bad_shape})"
        )
    if bad_shape:
        raise ValueError(f"flat: parameter shapes do not match the model: {bad_shape}")
    with torch.no_grad():
        for tensor, paths, is_kernel in _entries(model):
            parts = [torch.as_tensor(np.asarray(given[p])) for p in paths]
            value = torch.cat(parts, dim=-1)
            if is_kernel:
                value = value.t()
            tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))


def export_flax_params(model: AGaLiTe, grads: bool = False) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_flax_params`: Flax path -> array (of ``.grad`` with ``grads=True``)."""
    out: dict[str, np.ndarray] = {}
    for tensor, paths, is_kernel in _entries(model):
        value = tensor.grad if grads else tensor
        if value is None:
            raise ValueError(f"model: parameter for {paths[0]} has no gradient")
        value = value.detach().cpu()
        if is_kernel:
            value = value.t()
        sizes = _split_sizes(model, paths) or [value.shape[-1]]
        for path, part in zip(paths, value.split(sizes, dim=-1)):
            out[path] = part.numpy().copy()
    return out


def state_from_flax_memory(
    memory: Mapping[str, Any], device: torch.device | str | None = None
) -> AGaLiTeState:
    """Build an :class:`AGaLiTeState` from the original's memory dict.

    ``memory['layer_<l>']`` is ``(tilde_k, tilde_v, s, tick)`` (a tuple, or a mapping with those keys)
    with shapes ``(R,H,E), (R,H,D), (H,E), (1,)`` for one environment, or with a leading batch axis
    (tick ``(B, 1)``) as the original's ``nn.vmap`` gives. The float tick is rounded to int64; every layer
    must carry the same tick.
    """
    names = ("tilde_k", "tilde_v", "s", "tick")
    layers = sorted((k for k in memory if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    if not layers or [int(k.split("_")[1]) for k in layers] != list(range(1, len(layers) + 1)):
        raise KeyError(f"memory: expected keys layer_1..layer_L, got {sorted(memory)}")
    per_layer = []
    for key in layers:
        entry = memory[key]
        parts = [entry[n] for n in names] if isinstance(entry, Mapping) else list(entry)
        if len(parts) != 4:
            raise ValueError(f"memory[{key!r}]: expected (tilde_k, tilde_v, s, tick), got {len(parts)} items")
        tk, tv, s, tick = (torch.as_tensor(np.asarray(p)) for p in parts)
        if tk.dim() == 3:  # one environment
            tk, tv, s, tick = tk[None], tv[None], s[None], tick.reshape(1, -1)
        if tk.dim() != 4 or tv.dim() != 4 or s.dim() != 3:
            raise ValueError(
                f"memory[{key!r}]: expected tilde_k (B,R,H,E), tilde_v (B,R,H,D), s (B,H,E) or without B, "
                f"got {tuple(tk.shape)}, {tuple(tv.shape)}, {tuple(s.shape)}"
            )
        per_layer.append((tk.float(), tv.float(), s.float(), torch.round(tick.double().reshape(-1)).long()))
    ticks = [p[3] for p in per_layer]
    if any(not torch.equal(ticks[0], t) for t in ticks[1:]):
        raise ValueError(f"memory: every layer must carry the same tick, got {[t.tolist() for t in ticks]}")
    state = AGaLiTeState(
        torch.stack([p[0] for p in per_layer]),
        torch.stack([p[1] for p in per_layer]),
        torch.stack([p[2] for p in per_layer]),
        ticks[0],
    )
    return state.to(device) if device is not None else state


def state_to_flax_memory(state: AGaLiTeState) -> dict[str, tuple[np.ndarray, ...]]:
    """The original's batched memory dict (leading B axis, float32 tick of shape (B, 1))."""
    tick = state.tick.detach().cpu().double().reshape(-1, 1).float().numpy()
    return {
        f"layer_{i + 1}": (
            state.tilde_k[i].detach().cpu().numpy(),
            state.tilde_v[i].detach().cpu().numpy(),
            state.s[i].detach().cpu().numpy(),
            tick,
        )
        for i in range(state.num_layers)
    }
