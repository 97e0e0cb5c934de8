"""agalite-triton: AGaLiTe (Approximate Gated Linear Transformers) and GaLiTe, the exact model it
approximates, for PyTorch."""

from .attention import AGaLiTeAttention
from .backend import BACKENDS, resolve_backend
from .galite import GaLiTe
from .galite_attention import GaLiTeAttention
from .galite_recurrence import galite_recurrence
from .gating import GRUGatingUnit
from .layer import AGaLiTeLayer, EncoderLayer
from .model import AGaLiTe
from .oscillator import oscillator_coefficients
from .presets import GALITE_PRESETS, PRESETS
from .recurrence import agalite_recurrence
from .rl import SegmentStates
from .state import AGaLiTeState, GaLiTeState

__all__ = [
    "AGaLiTe",
    "AGaLiTeAttention",
    "AGaLiTeLayer",
    "AGaLiTeState",
    "BACKENDS",
    "EncoderLayer",
    "GALITE_PRESETS",
    "GRUGatingUnit",
    "GaLiTe",
    "GaLiTeAttention",
    "GaLiTeState",
    "PRESETS",
    "SegmentStates",
    "agalite_recurrence",
    "galite_recurrence",
    "oscillator_coefficients",
    "resolve_backend",
]

__version__ = "0.1.0"
