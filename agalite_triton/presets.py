"""Named model sizes. Every preset has the full architecture (LN, gates, FFN): speed comes from the
kernels, not from dropping parts of the layer."""

from __future__ import annotations

from typing import Any

__all__ = ["GALITE_PRESETS", "PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's T-Maze / POPGym configuration.
    "paper": dict(d_model=128, n_layers=4, n_heads=4, d_head=64, d_ffc=128, eta=4, r=2),
    # The Craftax configuration: the paper's size with a wider feature map.
    "craftax": dict(d_model=128, n_layers=4, n_heads=4, d_head=64, d_ffc=128, eta=8, r=2),
    "standard": dict(d_model=256, n_layers=2, n_heads=4, d_head=64, d_ffc=256, eta=4, r=8),
    "fast": dict(d_model=256, n_layers=2, n_heads=4, d_head=64, d_ffc=256, eta=2, r=4),
    "optimized": dict(d_model=256, n_layers=2, n_heads=4, d_head=64, d_ffc=256, eta=3, r=6, dropout=0.05),
}

# GaLiTe, the exact model: the paper's T-Maze configuration (config/tmaze/relit.yaml).
GALITE_PRESETS: dict[str, dict[str, Any]] = {
    "galite-tmaze": dict(d_model=128, n_layers=4, n_heads=4, d_head=64, d_ffc=128, nu=2),
}
