"""Update norm clipping and Gaussian noise (central differential privacy).

Clipping scales a delta by ``min(1, C / ||delta||)`` (L2 norm over all tensors). With
``adaptive`` the bound follows a target quantile of the update norms (Andrew et al. 2021,
"Differentially Private Learning with Adaptive Clipping"), geometric update per round::

    C <- C * exp(-lr * (b - quantile)),  b = fraction of this round's updates with norm <= C

(the noise that paper adds to ``b`` is not applied: the fraction is computed exactly).

Noise: after the clipped weighted mean, add N(0, sigma^2) to every coordinate with
``sigma = noise_multiplier * C * max_i(w_i) / sum_i(w_i)`` — the Gaussian mechanism on the mean
of clipped updates, whose L2 sensitivity is ``C * max w / sum w`` (``C / n`` for uniform weights,
the usual DP-FedAvg setting of McMahan et al. 2018). A privacy accountant is not included: the
(epsilon, delta) of a run depends on sampling and rounds and must be computed separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Clipper:
    bound: float = 1.0
    adaptive: bool = False
    quantile: float = 0.5
    lr: float = 0.2

    def __post_init__(self) -> None:
        self._seen = 0
        self._under = 0

    def scale(self, norm: float) -> float:
        self._seen += 1
        if norm <= self.bound:
            self._under += 1
            return 1.0
        return self.bound / norm

    def end_round(self) -> dict[str, float]:
        frac = self._under / self._seen if self._seen else 1.0
        out = {"clip_bound": self.bound, "clipped_fraction": 1.0 - frac}
        if self.adaptive and self._seen:
            self.bound *= math.exp(-self.lr * (frac - self.quantile))
        self._seen = self._under = 0
        return out


@dataclass
class GaussianNoise:
    multiplier: float = 1.0
    seed: int = 0

    def sigma(self, clip_bound: float, max_weight: float, total_weight: float) -> float:
        return self.multiplier * clip_bound * max_weight / total_weight

    def apply(self, mean: list[np.ndarray], sigma: float, round_no: int) -> None:
        rng = np.random.default_rng([self.seed, round_no])  # reproducible per round, resumable
        for a in mean:
            a += rng.normal(0.0, sigma, size=a.shape).astype(np.float32)
