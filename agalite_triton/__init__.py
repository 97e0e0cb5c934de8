"""agalite-triton: AGaLiTe (Approximate Gated Linear Transformers) for PyTorch."""

from .attention import AGaLiTeAttention
from .backend import BACKENDS, resolve_backend
from .gating import GRUGatingUnit
from .layer import AGaLiTeLayer
from .model import AGaLiTe
from .oscillator import oscillator_coefficients
from .presets import PRESETS
from .recurrence import agalite_recurrence
from .rl import SegmentStates
from .state import AGaLiTeState

__all__ = [
    "AGaLiTe",
    "AGaLiTeAttention",
    "AGaLiTeLayer",
    "AGaLiTeState",
    "BACKENDS",
    "GRUGatingUnit",
    "PRESETS",
    "SegmentStates",
    "agalite_recurrence",
    "oscillator_coefficients",
    "resolve_backend",
]

__version__ = "0.1.0"
