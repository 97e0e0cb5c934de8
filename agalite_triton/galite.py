"""The GaLiTe stack: the exact gated linear transformer that AGaLiTe approximates, with the same API."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .galite_attention import GaLiTeAttention
from .layer import EncoderLayer
from .presets import GALITE_PRESETS
from .stack import RecurrentStack, check_sizes
from .state import GaLiTeState

__all__ = ["GaLiTe"]


class GaLiTe(RecurrentStack):
    """A stack of GaLiTe layers: per head a (D, nu*D) outer-product memory, each entry with its own gate.

    Every call convention of :class:`~agalite_triton.AGaLiTe` holds (``y, state = model(x, state, dones)``,
    one-step calls, ``out=``, ``env_ids=``, ``restart=``, packing); the state is a :class:`GaLiTeState`
    ``(c, s)`` with no tick. Unlike AGaLiTe, the first layer's input embedding has no ReLU, the queries go
    through two stacked projections and the read-out's eps (1e-10) has no factor in front, as the original.
    """

    state_class = GaLiTeState
    presets: ClassVar[dict[str, dict[str, Any]]] = GALITE_PRESETS

    def __init__(
        self,
        input_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_head: int,
        d_ffc: int,
        nu: int,
        reset_on_terminate: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        sizes = dict(input_dim=input_dim, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     d_head=d_head, d_ffc=d_ffc, nu=nu)  # fmt: skip
        check_sizes(sizes, dropout)
        self._init_stack(dict(sizes, reset_on_terminate=reset_on_terminate, dropout=dropout), backend, batch_first)
        self.nu = nu
        self.layers = nn.ModuleList(
            EncoderLayer(
                lambda: GaLiTeAttention(d_model, n_heads, d_head, nu, reset_on_terminate=reset_on_terminate,
                                        backend=backend),
                d_model, d_ffc, input_dim=input_dim if i == 0 else None, embed_relu=False, dropout=dropout,
            )
            for i in range(n_layers)
        )  # fmt: skip

    @property
    def feature_dim(self) -> int:
        return self.nu * self.d_head

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        H, D, K = self.n_heads, self.d_head, self.feature_dim
        return (H, D, K), (H, K)
