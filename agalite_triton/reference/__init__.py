"""Reference implementation: the eager PyTorch maths (ground truth) and its fused CPU forms (``cpu_fused`` for
AGaLiTe, ``galite_cpu_fused`` for GaLiTe, both built by ``cpp_library``)."""

from .discounted_sum import discounted_sum
from .recurrence import reference_recurrence

__all__ = ["discounted_sum", "reference_recurrence"]
