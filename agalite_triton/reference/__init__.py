"""Reference implementation: the eager PyTorch maths (ground truth) and its fused CPU form (``cpu_fused``)."""

from .discounted_sum import discounted_sum
from .recurrence import reference_recurrence

__all__ = ["discounted_sum", "reference_recurrence"]
