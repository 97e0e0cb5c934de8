"""The recurrent cores AGaLiTe is measured against: GTrXL (two inference modes) and LSTM."""

from .gtrxl import GTrXL, GTrXLKVState, GTrXLState
from .lstm import LSTMState, ResetLSTM

__all__ = ["GTrXL", "GTrXLKVState", "GTrXLState", "LSTMState", "ResetLSTM"]
