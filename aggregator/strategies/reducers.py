"""Reducers: how accepted deltas are combined.

``WeightedMean`` streams: memory O(model size), independent of the number of updates, one
float32 accumulator updated in place. An update is first measured (its sum of squares, one
BLAS dot per block: this is the finite check and the clipping norm, and leaves the update in
cache); only a finite update is folded, so a NaN/Inf update is excluded exactly, with nothing
to roll back. The accumulator is kept scaled, ``sum_i c_i x_i = s * A``, so folding ``(c, x)``
is two in-place passes with no temporary: ``A = A * (s / c) + x; s = c``. When ``c`` is tiny
next to the largest coefficient seen (< 1e-6 of it) the fold is ``A += (c / s) * x`` instead,
which keeps ``A`` bounded (|A| <= 1e6 * K * max|x|). Each fold rounds once more than a plain
sum; the result agrees with ``np.average`` to float32 rounding (tests: rtol 1e-4).

The robust reducers (median, trimmed mean, Krum, multi-Krum) need every update at once: they
hold references to at most ``max_updates`` updates (no copies until ``result``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BLOCK = 1 << 17  # elements per fold block (512 KiB of float32): A's block stays in L2 between the two passes
_FAST_RATIO = 1e-6  # below this fraction of the largest coefficient, fold with a scaled copy


def sum_squares(arrays: Sequence[np.ndarray], block: int = 1 << 20) -> float:
    """Sum of squares of all elements (float64 across blocks); inf/nan if any element is non-finite.

    A BLAS dot per block: it reads the update at memory bandwidth (the finite check and the norm).
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # overflow/NaN show in the result
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
        self._acc = [np.empty(t.size, dtype=np.float32) for t in template]
        # (tensor index, accumulator block view, start, stop) made once, last block first: the
        # check reads the update front to back, so its tail is still in L2 when the fold starts
        self._blocks = [(i, acc[s : s + block], s, min(s + block, acc.size))
                        for i, acc in enumerate(self._acc) for s in range(0, acc.size, block)][::-1]
        self._shapes = [tuple(t.shape) for t in template]
        self._tmp: np.ndarray | None = None  # only the tiny-coefficient path needs a scratch block
        self.reset()

    def reset(self) -> None:
        """Start again from an empty sum, keeping the buffers (the next round reuses them)."""
        self.total_weight = 0.0
        self.count = 0
        self._scale = 0.0  # s: the accumulated sum is s * A; 0 while A holds nothing
        self._cmax = 0.0

    def fits(self, template: Sequence[np.ndarray]) -> bool:
        return [tuple(t.shape) for t in template] == self._shapes

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0,
            sq: float | None = None) -> float:
        """Fold ``weight * scale * delta``; return the delta's sum of squares (unscaled).

        Returns a non-finite value, leaving the mean unchanged, when the delta is not finite.
        ``sq`` is the sum of squares when the caller already computed it (clipping): not recomputed.
        """
        if sq is None:
            sq = sum_squares(delta)
        if not math.isfinite(sq):
            return sq
        c = weight * scale
        if c > 0:
            self._fold(delta, c)
        self.total_weight += weight
        self.count += 1
        return sq

    def _fold(self, delta: Sequence[np.ndarray], c: float) -> None:
        b = self.block
        self._cmax = max(self._cmax, c)
        if self._scale == 0.0:  # first contribution: A = x, s = c
            for acc, d in zip(self._acc, delta):
                np.copyto(acc, d.reshape(-1))
            self._scale = c
        elif c >= _FAST_RATIO * self._cmax:  # A = A * (s / c) + x, in place, block by block
            r = np.array(self._scale / c, dtype=np.float32)
            mul, add = np.multiply, np.add
            flat = [d.reshape(-1) for d in delta]
            for i, a, lo, hi in self._blocks:
                mul(a, r, a)
                add(a, flat[i][lo:hi], a)
            self._scale = c
        else:  # a tiny coefficient: A += (c / s) * x, s unchanged
            k = np.array(c / self._scale, dtype=np.float32)
            if self._tmp is None:
                self._tmp = np.empty(min(b, max(a.size for a in self._acc)), dtype=np.float32)
            flat = [d.reshape(-1) for d in delta]
            for i, a, lo, hi in self._blocks:
                t = self._tmp[: hi - lo]
                np.multiply(flat[i][lo:hi], k, t)
                np.add(a, t, a)

    def result(self) -> list[np.ndarray] | None:
        """The weighted mean, as views of the accumulator (no copy, no allocation).

        The accumulator is normalised in place (``A *= s / W``; then ``s = W``, so calling again,
        or adding more, stays correct). The views are valid until the next ``reset``/``add``:
        the caller consumes them (the server step writes the new global into fresh arrays).
        """
        if self.count == 0 or self.total_weight <= 0 or self._scale == 0.0:
            return None
        if self._scale != self.total_weight:
            f = np.float32(self._scale / self.total_weight)
            for a in self._acc:
                np.multiply(a, f, out=a)
            self._scale = self.total_weight
        return [a.reshape(shape) for a, shape in zip(self._acc, self._shapes)]


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
