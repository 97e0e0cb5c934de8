"""Wall-clock budget of a session: each stage gets a share of what is left when it starts, and a case
runs only if its estimate fits before its stage's deadline.

A stage that finishes early leaves its time to the stages after it, so the shares are of the time
remaining, weighted by the stages still to come. ``reserve_s`` is kept back for the summary and plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Budget", "StageBudget"]


@dataclass
class StageBudget:
    name: str
    deadline: float  # time.monotonic() by which the stage should be done

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.remaining()


class Budget:
    def __init__(self, total_s: float, started: float, reserve_s: float = 8.0) -> None:
        if total_s <= 0:
            raise ValueError(f"--budget-s: expected a positive number of seconds, got {total_s}")
        self.total_s = total_s
        self.started = started
        self.end = started + total_s
        self.reserve_s = min(reserve_s, 0.1 * total_s)

    def remaining(self) -> float:
        return self.end - self.reserve_s - time.monotonic()

    def stage(self, name: str, weight: float, weights_left: float) -> StageBudget:
        """The budget of stage ``name``: ``weight / weights_left`` of the time remaining (weights_left
        counts this stage and every later one)."""
        share = max(0.0, self.remaining()) * (weight / weights_left if weights_left > 0 else 1.0)
        return StageBudget(name, time.monotonic() + share)
