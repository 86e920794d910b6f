"""Reducers: how accepted deltas are combined.

``WeightedMean`` streams: memory O(model size), independent of the number of updates. Each
update is folded as ``next = acc + coef * delta`` into a second buffer, block by block (blocks
stay in cache), checking the block's sum of squares on the way; the buffers swap only when the
whole update was finite, so a NaN/Inf update is excluded exactly, with no extra pass and no
rollback arithmetic. Memory: two float32 accumulators + one block.

The robust reducers (median, trimmed mean, Krum, multi-Krum) need every update at once: they
hold references to at most ``max_updates`` updates (no copies until ``result``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BLOCK = 1 << 18  # elements per block (1 MiB of float32): measured best on this machine (bench/aggregate)


def sum_squares(arrays: Sequence[np.ndarray], block: int = BLOCK) -> float:
    """Sum of squares of all elements (float64 across blocks); inf/nan if any element is non-finite."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for a in arrays:
            f = a.reshape(-1)
            for s in range(0, f.size, block):
                b = f[s : s + block]
                total += float(np.dot(b, b))
    return total


class WeightedMean:
    name = "mean"
    streaming = True

    def __init__(self, template: Sequence[np.ndarray], block: int = BLOCK) -> None:
        self.block = block
        self._acc = [np.zeros(t.size, dtype=np.float32) for t in template]
        self._nxt = [np.empty(t.size, dtype=np.float32) for t in template]
        self._shapes = [t.shape for t in template]
        self._tmp = np.empty(min(block, max((t.size for t in template), default=1)), dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0,
            sq: float | None = None) -> float:
        """Fold ``weight * scale * delta``; return the delta's sum of squares (unscaled).

        Returns a non-finite value, leaving the mean unchanged, when the delta is not finite.
        ``sq`` is the sum of squares when the caller already computed it (clipping): not recomputed.
        """
        with np.errstate(over="ignore", invalid="ignore"):  # overflow/NaN are detected via sq below
            folded = self._fold(delta, np.float32(weight * scale), sq is None)
        sq = folded if sq is None else sq
        if not math.isfinite(sq):
            return sq
        self._acc, self._nxt = self._nxt, self._acc
        self.total_weight += weight
        self.count += 1
        return sq

    def _fold(self, delta: Sequence[np.ndarray], coef: np.float32, measure: bool = True) -> float:
        """next = acc + coef * delta, block by block; returns the delta's sum of squares (if ``measure``)."""
        sq = 0.0
        tmp = self._tmp
        for acc, nxt, d in zip(self._acc, self._nxt, delta):
            f = d.reshape(-1)
            for s in range(0, f.size, self.block):
                x = f[s : s + self.block]
                n = x.size
                if measure:
                    sq += float(np.dot(x, x))
                t = tmp[:n]
                np.multiply(x, coef, out=t)
                np.add(acc[s : s + n], t, out=nxt[s : s + n])
        return sq

    def result(self) -> list[np.ndarray] | None:
        if self.count == 0 or self.total_weight <= 0:
            return None
        inv = np.float32(1.0 / self.total_weight)
        return [np.multiply(a, inv).reshape(shape) for a, shape in zip(self._acc, self._shapes)]


class _Holding:
    """Holds references to (delta, weight, scale) for reducers that need all updates."""

    streaming = False

    def __init__(self, template: Sequence[np.ndarray], max_updates: int) -> None:
        self._shapes = [t.shape for t in template]
        self.max_updates = max_updates
        self.items: list[tuple[Sequence[np.ndarray], float, float]] = []
        self.total_weight = 0.0

    @property
    def count(self) -> int:
        return len(self.items)

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0,
            sq: float | None = None) -> float:
        sq = sum_squares(delta) if sq is None else sq
        if math.isfinite(sq):
            self.items.append((delta, weight, scale))
            self.total_weight += weight
        return sq

    def full(self) -> bool:
        return len(self.items) >= self.max_updates

    def _stack(self, i: int) -> np.ndarray:
        """(K, P_i) float32 matrix of tensor i across updates, clipping scales applied."""
        return np.stack([np.asarray(d[i], dtype=np.float32).reshape(-1) * np.float32(s) for d, _, s in self.items])


class CoordinateMedian(_Holding):
    """Coordinate-wise median (Yin et al. 2018), unweighted."""

    name = "median"

    def result(self) -> list[np.ndarray] | None:
        if not self.items:
            return None
        return [np.median(self._stack(i), axis=0).astype(np.float32).reshape(sh) for i, sh in enumerate(self._shapes)]


class TrimmedMean(_Holding):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018): drop floor(beta*K) lowest and highest."""

    name = "trimmed_mean"

    def __init__(self, template: Sequence[np.ndarray], max_updates: int, beta: float = 0.1) -> None:
        super().__init__(template, max_updates)
        self.beta = beta

    def result(self) -> list[np.ndarray] | None:
        k = len(self.items)
        if k == 0:
            return None
        cut = int(math.floor(self.beta * k))
        if k - 2 * cut <= 0:
            cut = (k - 1) // 2
        out = []
        for i, sh in enumerate(self._shapes):
            m = self._stack(i)
            m.sort(axis=0)
            out.append(m[cut : k - cut].mean(axis=0, dtype=np.float64).astype(np.float32).reshape(sh))
        return out


class Krum(_Holding):
    """Krum / multi-Krum (Blanchard et al. 2017).

    score(i) = sum of squared distances from update i to its n - f - 2 nearest others; Krum
    returns the lowest-scoring update, multi-Krum the weighted mean of the ``m`` lowest.
    Requires n > 2f + 2.
    """

    name = "krum"

    def __init__(self, template: Sequence[np.ndarray], max_updates: int, f: int = 1, m: int = 1) -> None:
        super().__init__(template, max_updates)
        self.f, self.m = f, m
        self.selected: list[int] = []
        self.scores: np.ndarray | None = None

    def precondition(self) -> str | None:
        n = len(self.items)
        if n <= 2 * self.f + 2:
            return f"krum with f={self.f} needs n > 2f + 2 = {2 * self.f + 2} updates, got {n}"
        return None

    def distances(self) -> np.ndarray:
        k = len(self.items)
        gram = np.zeros((k, k), dtype=np.float64)
        for i in range(len(self._shapes)):
            m = self._stack(i).astype(np.float64)
            gram += m @ m.T
        sq = np.diag(gram)
        return np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)

    def result(self) -> list[np.ndarray] | None:
        if not self.items or self.precondition():
            return None
        d = self.distances()
        n = len(self.items)
        nb = n - self.f - 2
        scores = np.array([np.sort(np.delete(d[i], i))[:nb].sum() for i in range(n)])
        self.scores = scores
        self.selected = [int(i) for i in np.argsort(scores, kind="stable")[: max(1, min(self.m, n))]]
        mean = WeightedMean([np.empty(sh) for sh in self._shapes])
        for i in self.selected:
            delta, w, s = self.items[i]
            mean.add(delta, w if self.m > 1 else 1.0, s)
        return mean.result()
