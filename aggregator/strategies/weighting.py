"""How much each update counts: uniform, by sample count, by reported quality, or a product.

Quality mappings (``q`` = the reported metric of one update, ``T`` = temperature):

* ``proportional`` — ``w = q`` (q must be >= 0, e.g. validation accuracy)
* ``softmax``      — ``w = exp(q / T)``; the mean divides by the total, so this *is* the softmax
  over the round's updates, computed streaming
* ``inverse``      — ``w = 1 / (q + eps)`` for lower-is-better metrics such as validation loss

Every weight must come out finite and >= 0, or the update is excluded with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

MAPPINGS = ("proportional", "softmax", "inverse")
FACTORS = ("uniform", "samples", "quality")


class WeightRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Quality:
    metric: str = "val_accuracy"
    mapping: str = "proportional"
    temperature: float = 1.0
    eps: float = 1e-8

    def weight(self, metrics: Mapping[str, float]) -> float:
        if self.metric not in metrics:
            raise WeightRejected("missing_quality", f"update reports no {self.metric!r}")
        q = float(metrics[self.metric])
        if not math.isfinite(q):
            raise WeightRejected("bad_quality", f"{self.metric} = {q} is not finite")
        if self.mapping == "proportional":
            if q < 0:
                raise WeightRejected("bad_quality", f"{self.metric} = {q} < 0 cannot be a weight")
            return q
        if self.mapping == "softmax":
            return math.exp(min(q / self.temperature, 700.0))
        if q < 0:
            raise WeightRejected("bad_quality", f"{self.metric} = {q} < 0 for inverse mapping")
        return 1.0 / (q + self.eps)


@dataclass(frozen=True)
class Weighting:
    """The product of the listed factors (an empty list means uniform)."""

    factors: tuple[str, ...] = ()
    quality: Quality = Quality()

    def weight(self, num_samples: int, metrics: Mapping[str, float]) -> float:
        w = 1.0
        for f in self.factors:
            if f == "samples":
                w *= float(num_samples)
            elif f == "quality":
                w *= self.quality.weight(metrics)
        if not math.isfinite(w) or w < 0:
            raise WeightRejected("bad_weight", f"weight {w} is not finite and >= 0")
        if w == 0:
            raise WeightRejected("zero_weight", "update has zero weight")
        return w
