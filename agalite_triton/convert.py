"""Import parameters and memories from the original JAX/Flax AGaLiTe and GaLiTe (and export back for checks).

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

from .galite import GaLiTe
from .model import AGaLiTe
from .state import AGaLiTeState, GaLiTeState

__all__ = ["export_flax_params", "flax_param_shapes", "galite_state_from_flax_memory", "load_flax_params",
           "state_from_flax_memory", "state_to_flax_memory"]  # fmt: skip

_ATT = "AttentionORLiTLayer_0"
_GALITE_ATT = "RLTAttentionLayer_0"

# How a torch tensor is made of Flax arrays: ``groups`` of (path, out size) pairs, each group assembled by
# ``layout`` and the groups concatenated along the torch tensor's first (out) dimension.
#   kernel:       Flax (in, n) kernels, concatenated along n; torch stores the transpose.
#   bias:         Flax (n,) vectors, concatenated.
#   head_kernel:  Flax (H, in, n) per-head kernels; torch column h*sum(n) + offset + i (head-major), transposed.
#   head_bias:    Flax (H, n) per-head biases, in the same head-major order.
#   head_param:   Flax (H, in, n) kept as (H, in, sum(n)) (no transpose).
#   head_vector:  Flax (H, n) kept as (H, sum(n)).
Group = list[tuple[str, int]]
Entry = tuple[torch.Tensor, list[Group], str]


def _plain(tensor: torch.Tensor, paths: list[str], sizes: list[int] | None = None) -> Entry:
    """A tensor that is one Flax array, or several concatenated along out (sizes given)."""
    is_kernel = tensor.dim() == 2
    sizes = sizes or [tensor.shape[0]]
    return tensor, [[(p, n)] for p, n in zip(paths, sizes)], "kernel" if is_kernel else "bias"


def _shared_entries(layer: Any, p: str) -> list[Entry]:
    """The parameters of the encoder layer both models share (Flax scope ``p``), the attention excepted."""
    entries: list[Entry] = []
    if layer.emb is not None:
        entries += [
            _plain(layer.emb.weight, [f"{p}/emb_layer/kernel"]),
            _plain(layer.emb.bias, [f"{p}/emb_layer/bias"]),
        ]
    entries += [
        _plain(layer.ln1.weight, [f"{p}/LayerNorm_0/scale"]),
        _plain(layer.ln1.bias, [f"{p}/LayerNorm_0/bias"]),
        _plain(layer.ln2.weight, [f"{p}/LayerNorm_1/scale"]),
        _plain(layer.ln2.bias, [f"{p}/LayerNorm_1/bias"]),
        _plain(layer.ffn_in.weight, [f"{p}/Dense_0/kernel"]),
        _plain(layer.ffn_in.bias, [f"{p}/Dense_0/bias"]),
        _plain(layer.ffn_out.weight, [f"{p}/Dense_1/kernel"]),
        _plain(layer.ffn_out.bias, [f"{p}/Dense_1/bias"]),
    ]
    d = layer.ln1.weight.shape[0]
    for g, gate in enumerate((layer.gate1, layer.gate2)):
        q = f"{p}/GRUGatingUnit_{g}"
        entries += [
            _plain(gate.w_y.weight, [f"{q}/Wr/kernel", f"{q}/Wz/kernel", f"{q}/Wg/kernel"], [d, d, d]),
            _plain(gate.u_x.weight, [f"{q}/Ur/kernel", f"{q}/Uz/kernel"], [d, d]),
            _plain(gate.u_g.weight, [f"{q}/Ug/kernel"]),
            _plain(gate.bgp, [f"{q}/bgp"]),
        ]
    return entries


def _entries(model: AGaLiTe | GaLiTe) -> list[Entry]:
    """Every model tensor and the Flax arrays it is made of."""
    return _galite_entries(model) if isinstance(model, GaLiTe) else _agalite_entries(model)


def _agalite_entries(model: AGaLiTe) -> list[Entry]:
    # Scopes layer1..layerL.
    entries: list[Entry] = []
    proj_sizes = [5 * model.n_heads * model.d_head, 3 * model.n_heads * model.eta]
    for i, layer in enumerate(model.layers):
        p = f"params/layer{i + 1}"
        att = f"{p}/{_ATT}"
        entries += _shared_entries(layer, p)
        entries += [
            _plain(layer.attn.in_proj.weight, [f"{att}/linear_kqvbetagammas/kernel", f"{att}/linear_p1p2p3/kernel"],
                   proj_sizes),
            _plain(layer.attn.in_proj.bias, [f"{att}/linear_kqvbetagammas/bias", f"{att}/linear_p1p2p3/bias"],
                   proj_sizes),
            _plain(layer.attn.project.weight, [f"{att}/project/kernel"]),
            _plain(layer.attn.project.bias, [f"{att}/project/bias"]),
        ]  # fmt: skip
    return entries


def _galite_entries(model: GaLiTe) -> list[Entry]:
    # Scopes layer0..layer{L-1}; every attention parameter but the output projection is per head.
    entries: list[Entry] = []
    D, nu = model.d_head, model.nu
    for i, layer in enumerate(model.layers):
        p = f"params/layer{i}"
        att = f"{p}/{_GALITE_ATT}"
        csop = f"{att}/csop"
        # Column order of in_proj: key, query pre-projection, value, beta, gamma; then the key and gamma factors.
        dims = [f"{csop}/ParameteredProjection_0/Dense_0", f"{att}/Dense_0", f"{csop}/Dense_0", f"{csop}/Dense_1",
                f"{csop}/ParameteredProjection_1/Dense_0"]
        factors = [f"{csop}/ParameteredProjection_0/Dense_1", f"{csop}/ParameteredProjection_1/Dense_1"]
        query = [(f"{att}/ParameteredProjection_0/Dense_0", D), (f"{att}/ParameteredProjection_0/Dense_1", nu)]
        attn = layer.attn
        entries += _shared_entries(layer, p)
        entries += [
            (attn.in_proj.weight, [[(f"{q}/kernel", D) for q in dims], [(f"{q}/kernel", nu) for q in factors]],
             "head_kernel"),
            (attn.in_proj.bias, [[(f"{q}/bias", D) for q in dims], [(f"{q}/bias", nu) for q in factors]], "head_bias"),
            (attn.q_weight, [[(f"{q}/kernel", n) for q, n in query]], "head_param"),
            (attn.q_bias, [[(f"{q}/bias", n) for q, n in query]], "head_vector"),
            _plain(attn.project.weight, [f"{att}/Dense_1/kernel"]),
            _plain(attn.project.bias, [f"{att}/Dense_1/bias"]),
        ]  # fmt: skip
    return entries


def _group_shapes(model: AGaLiTe | GaLiTe, tensor: torch.Tensor, group: Group, layout: str) -> list[tuple[int, ...]]:
    """The Flax shape of each array of one group."""
    lead = {
        "kernel": (tensor.shape[-1],),
        "bias": (),
        "head_kernel": (model.n_heads, tensor.shape[-1]),
        "head_bias": (model.n_heads,),
        "head_param": tensor.shape[:2],
        "head_vector": tensor.shape[:1],
    }[layout]
    return [(*lead, n) for _, n in group]


def flax_param_shapes(model: AGaLiTe | GaLiTe) -> dict[str, tuple[int, ...]]:
    """The Flax path -> shape every parameter of ``model`` expects."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor, groups, layout in _entries(model):
        for group in groups:
            for (path, _), shape in zip(group, _group_shapes(model, tensor, group, layout)):
                shapes[path] = shape
    return shapes


def _assemble(parts: list[torch.Tensor], layout: str) -> torch.Tensor:
    """One group's torch block from its Flax arrays."""
    joined = torch.cat(parts, dim=-1)
    if layout == "kernel":
        return joined.t()
    if layout == "head_kernel":  # (H, in, n) -> (H * n, in), head-major rows
        return joined.permute(0, 2, 1).reshape(-1, joined.shape[1])
    if layout == "head_bias":
        return joined.reshape(-1)
    return joined


def _disassemble(block: torch.Tensor, layout: str, heads: int, sizes: list[int]) -> list[torch.Tensor]:
    """Inverse of :func:`_assemble`: one group's Flax arrays from its torch block."""
    if layout == "kernel":
        block = block.t()
    elif layout == "head_kernel":
        block = block.reshape(heads, -1, block.shape[1]).permute(0, 2, 1)
    elif layout == "head_bias":
        block = block.reshape(heads, -1)
    return list(block.split(sizes, dim=-1))


def _group_rows(tensor: torch.Tensor, group: Group, layout: str, heads: int) -> int:
    """How many entries of the torch tensor's first dimension one group fills."""
    total = sum(n for _, n in group)
    if layout in ("head_kernel", "head_bias"):
        return heads * total
    if layout in ("head_param", "head_vector"):
        return tensor.shape[0]
    return total


def _normalise_key(key: str) -> str:
    return key if key.startswith("params/") else f"params/{key}"


def load_flax_params(model: AGaLiTe | GaLiTe, flat: Mapping[str, Any]) -> None:
    """Copy the original's parameters into ``model`` (an AGaLiTe or a GaLiTe) in place.

    ``flat`` maps ``'params/layer1/emb_layer/kernel'``-style paths (the ``params/`` prefix may be
    omitted; the original's AGaLiTe numbers its layer scopes from 1, its GaLiTe from 0) to arrays. Every
    path the model needs must be present with its exact shape and no other path may be given: otherwise
    a ``KeyError``/``ValueError`` lists every missing, unexpected and mis-shaped key. Nothing is copied
    unless everything matches.
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
        for tensor, groups, layout in _entries(model):
            blocks = [_assemble([torch.as_tensor(np.asarray(given[p])) for p, _ in g], layout) for g in groups]
            value = torch.cat(blocks, dim=0)
            tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))


def export_flax_params(model: AGaLiTe | GaLiTe, grads: bool = False) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_flax_params`: Flax path -> array (of ``.grad`` with ``grads=True``)."""
    out: dict[str, np.ndarray] = {}
    for tensor, groups, layout in _entries(model):
        value = tensor.grad if grads else tensor
        if value is None:
            raise ValueError(f"model: parameter for {groups[0][0][0]} has no gradient")
        value = value.detach().cpu()
        rows = [_group_rows(tensor, g, layout, model.n_heads) for g in groups]
        for group, block in zip(groups, value.split(rows, dim=0) if len(groups) > 1 else [value]):
            parts = _disassemble(block, layout, model.n_heads, [n for _, n in group])
            for (path, _), part in zip(group, parts):
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


def galite_state_from_flax_memory(
    memory: Mapping[str, Any], device: torch.device | str | None = None
) -> GaLiTeState:
    """Build a :class:`GaLiTeState` from the original GaLiTe's per-layer memories.

    ``memory['layer<l>']`` (l from 0) is ``(c, s)`` or a mapping with keys ``c`` and ``s`` (other keys,
    such as the tick the original carries but never reads, are ignored), shaped ``(H, D, K), (H, K)`` for
    one environment or with a leading batch axis.
    """
    layers = sorted((k for k in memory if k.startswith("layer")), key=lambda k: int(k[len("layer") :]))
    if not layers or [int(k[len("layer") :]) for k in layers] != list(range(len(layers))):
        raise KeyError(f"memory: expected keys layer0..layer{{L-1}}, got {sorted(memory)}")
    cs, ss = [], []
    for key in layers:
        entry = memory[key]
        parts = [entry["c"], entry["s"]] if isinstance(entry, Mapping) else list(entry)
        if len(parts) != 2:
            raise ValueError(f"memory[{key!r}]: expected (c, s), got {len(parts)} items")
        c, s = (torch.as_tensor(np.asarray(p)) for p in parts)
        if c.dim() == 3:  # one environment
            c, s = c[None], s[None]
        if c.dim() != 4 or s.dim() != 3 or c.shape[:2] != s.shape[:2] or c.shape[-1] != s.shape[-1]:
            raise ValueError(
                f"memory[{key!r}]: expected c (B,H,D,K) and s (B,H,K) or without B, "
                f"got {tuple(c.shape)}, {tuple(s.shape)}"
            )
        cs.append(c.float())
        ss.append(s.float())
    state = GaLiTeState(torch.stack(cs), torch.stack(ss))
    return state.to(device) if device is not None else state
