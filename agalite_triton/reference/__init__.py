"""Pure-PyTorch reference implementation (ground truth and CPU fallback)."""

from .discounted_sum import discounted_sum
from .recurrence import reference_recurrence

__all__ = ["discounted_sum", "reference_recurrence"]
