"""Reducers: how accepted deltas are combined.

``WeightedMean`` streams: memory O(model size), independent of the number of updates, float32
accumulators updated in place. An update is first measured (its sum of squares, one BLAS dot
per block: this is the finite check and the clipping norm, and leaves the update in cache);
only a finite update is folded, so a NaN/Inf update is excluded exactly, with nothing to roll
back. Each accumulator is kept scaled, ``sum_i c_i x_i = s * A``, so folding ``(c, x)`` is two
in-place passes with no temporary: ``A = A * (s / c) + x; s = c``. When ``c`` is tiny next to
the largest coefficient seen (< 1e-6 of it) the fold is ``A += (c / s) * x`` instead, which
keeps ``A`` bounded (|A| <= 1e6 * K * max|x|). Each fold rounds once more than a plain sum; the
result agrees with ``np.average`` to float32 rounding (tests: rtol 1e-4).

Lanes: on a host with two or more cores, a large model (>= ``PARALLEL_MIN`` parameters) is
folded in two lanes, each an accumulator with its own worker thread; updates alternate between
them. ``add`` waits only for its update's check (the verdict is synchronous); the fold runs
while the next update is checked on the other core, and each update is checked and folded on
the same core, so the fold reads it from that core's cache. ``result`` waits for the folds
and merges the lanes (one pass). numpy's BLAS and ufunc loops release the GIL. Cost: one
accumulator per lane (2 x model) and, until ``result``, a reference to each lane's last delta:
the caller must not modify a delta after handing it over (the service's arrays are read-only
views of received payloads).

The robust reducers (median, trimmed mean, Krum, multi-Krum) need every update at once: they
hold references to at most ``max_updates`` updates (no copies until ``result``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 1 << 17  # elements per fold block (512 KiB of float32): A's block stays in L2 between the two passes
# with two lanes every numpy call also takes the GIL back from the other lane: fewer, larger
# calls win (measured, K=100 x P=1M: 2^17 -> 19.3 ms, 2^20 -> 17.7 ms; 2^15 -> 25 ms)
LANE_BLOCK = 1 << 20
# parameters from which two lanes pay for their hand-offs (K=100, strategy time, one lane vs two:
# 262k 8.0 vs 9.2 ms, 393k 10.5 vs 10.8, 524k 13.4 vs 12.7, 786k 18.9 vs 16.1, 2.1M 58.7 vs 47.9)
PARALLEL_MIN = 1 << 19
_FAST_RATIO = 1e-6  # below this fraction of the largest coefficient, fold with a scaled copy


def sum_squares(arrays: Sequence[np.ndarray], block: int = 1 << 20) -> float:
    """Sum of squares of all elements (float64 across blocks); inf/nan if any element is non-finite.

    A BLAS dot per block: it reads the update at memory bandwidth (the finite check and the norm).
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # overflow/NaN show in the result
        for a in arrays:
            f = a.reshape(-1)
            if f.size <= block:  # most tensors: one dot, no slicing (per-update cost on small models)
                total += float(np.dot(f, f))
                continue
            for s in range(0, f.size, block):
                b = f[s : s + block]
                total += float(np.dot(b, b))
    return total


class _ScaledSum:
    """One float32 accumulator holding ``sum_i c_i x_i = s * A`` (see the module docstring)."""

    def __init__(self, template: Sequence[np.ndarray], block: int) -> None:
        self.acc = [np.empty(t.size, dtype=np.float32) for t in template]
        # (tensor index, accumulator block view, start, stop) made once, last block first: the
        # check reads the update front to back, so its tail is still in L2 when the fold starts
        self.blocks = [(i, acc[s : s + block], s, min(s + block, acc.size))
                       for i, acc in enumerate(self.acc) for s in range(0, acc.size, block)][::-1]
        self.block = block
        self._tmp: np.ndarray | None = None  # only the tiny-coefficient path needs a scratch block
        self.clear()

    def clear(self) -> None:
        self.scale = 0.0  # s: the accumulated sum is s * A; 0 while A holds nothing
        self.cmax = 0.0

    def fold(self, delta: Sequence[np.ndarray], c: float) -> None:
        self.cmax = max(self.cmax, c)
        flat = [d.reshape(-1) for d in delta]
        if self.scale == 0.0:  # first contribution: A = x, s = c
            for acc, f in zip(self.acc, flat):
                np.copyto(acc, f)
            self.scale = c
        elif c >= _FAST_RATIO * self.cmax:  # A = A * (s / c) + x, in place, block by block
            r = np.array(self.scale / c, dtype=np.float32)
            mul, add = np.multiply, np.add
            for i, a, lo, hi in self.blocks:
                mul(a, r, a)
                add(a, flat[i][lo:hi], a)
            self.scale = c
        else:  # a tiny coefficient: A += (c / s) * x, s unchanged
            k = np.array(c / self.scale, dtype=np.float32)
            if self._tmp is None:
                self._tmp = np.empty(min(self.block, max(a.size for a in self.acc)), dtype=np.float32)
            for i, a, lo, hi in self.blocks:
                t = self._tmp[: hi - lo]
                np.multiply(flat[i][lo:hi], k, t)
                np.add(a, t, a)

    def normalise(self, total: float) -> None:
        """``A *= s / total``; afterwards ``s = total`` (so a second call changes nothing)."""
        if self.scale != total:
            f = np.float32(self.scale / total)
            for a in self.acc:
                np.multiply(a, f, out=a)
            self.scale = total


class _Job:
    """Check one update (unless its sum of squares is known), then fold it into one lane.

    ``checked`` and ``done`` are locks taken at creation and released by the worker: the
    cheapest hand-off Python has (an Event costs ~1 us more per wait, ~4% of the fold here).
    """

    __slots__ = ("target", "delta", "c", "sq", "error", "checked", "done")

    def __init__(self, target: _ScaledSum, delta: Sequence[np.ndarray], c: float, sq: float | None) -> None:
        self.target, self.delta, self.c, self.sq = target, delta, c, sq
        self.error: BaseException | None = None
        self.checked, self.done = threading.Lock(), threading.Lock()
        self.checked.acquire()
        self.done.acquire()

    def run(self) -> None:
        told = False
        try:
            if self.sq is None:
                self.sq = sum_squares(self.delta)
            self.checked.release()
            told = True
            if math.isfinite(self.sq) and self.c > 0:
                self.target.fold(self.delta, self.c)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            self.error = e
        finally:
            self.delta = ()  # the update may be freed as soon as it is folded
            if not told:
                self.checked.release()
            self.done.release()


class _Worker(threading.Thread):
    """A daemon thread running jobs from its queue in order (lane i always runs on worker i)."""

    def __init__(self, index: int) -> None:
        super().__init__(name=f"fedmq-fold-{index}", daemon=True)
        self.index = index
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()

    def run(self) -> None:
        # lane i stays on one core, so the update it checked is still in that core's cache when it
        # folds it (K=100 x P=1M over 8 processes: 20.0-21.7 ms pinned, 20.7-27.4 ms not)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) > 1 and os.environ.get("FEDMQ_FOLD_PIN", "1") != "0":
            try:
                os.sched_setaffinity(0, {cpus[self.index % len(cpus)]})
            except OSError as e:  # a sandbox may forbid it: unpinned lanes still work
                log.info("fold lane %d not pinned: %s", self.index, e)
        while True:
            self.jobs.get().run()


_workers: list[_Worker] = []
_workers_lock = threading.Lock()


def _worker(i: int) -> _Worker:
    with _workers_lock:
        while len(_workers) <= i:
            w = _Worker(len(_workers))
            w.start()
            _workers.append(w)
        return _workers[i]


def default_lanes(size: int) -> int:
    """2 lanes for a model of ``PARALLEL_MIN`` parameters or more on a multi-core host, else 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cpus >= 2 and size >= PARALLEL_MIN else 1


class WeightedMean:
    name = "mean"
    streaming = True

    def __init__(self, template: Sequence[np.ndarray], block: int | None = None, lanes: int | None = None) -> None:
        self.lanes = default_lanes(sum(t.size for t in template)) if not lanes else int(lanes)
        self.block = block or (BLOCK if self.lanes == 1 else LANE_BLOCK)
        self._sums = [_ScaledSum(template, self.block) for _ in range(self.lanes)]
        self._last: list[_Job | None] = [None] * self.lanes
        self._shapes = [tuple(t.shape) for t in template]
        self.reset()

    def reset(self) -> None:
        """Start again from an empty sum, keeping the buffers (the next round reuses them)."""
        self._drain()
        for s in self._sums:
            s.clear()
        self.total_weight = 0.0
        self.count = 0
        self._turn = 0

    def fits(self, template: Sequence[np.ndarray]) -> bool:
        return [tuple(t.shape) for t in template] == self._shapes

    def add(self, delta: Sequence[np.ndarray], weight: float, scale: float = 1.0,
            sq: float | None = None) -> float:
        """Fold ``weight * scale * delta``; return the delta's sum of squares (unscaled).

        Returns a non-finite value, leaving the mean unchanged, when the delta is not finite.
        ``sq`` is the sum of squares when the caller already computed it (clipping): not recomputed.
        """
        c = weight * scale
        if self.lanes == 1:
            if sq is None:
                sq = sum_squares(delta)
            if math.isfinite(sq) and c > 0:
                self._sums[0].fold(delta, c)
        else:
            i = self._turn
            job = _Job(self._sums[i], delta, c, sq)
            self._last[i] = job
            _worker(i).jobs.put(job)
            self._turn = (i + 1) % self.lanes
            job.checked.acquire()
            if job.error is not None:
                self._drain()
            sq = job.sq
        if not math.isfinite(sq):
            return sq
        self.total_weight += weight
        self.count += 1
        return sq

    def _drain(self) -> None:
        """Wait for every lane's folds; re-raise a worker's error here, in the caller's thread."""
        last, self._last = self._last, [None] * self.lanes
        error = None
        for job in last:
            if job is not None:
                job.done.acquire()
                error = error or job.error
        if error is not None:
            raise error

    def result(self) -> list[np.ndarray] | None:
        """The weighted mean, as views of one lane's accumulator (no copy, no allocation).

        Lanes are normalised in place (``A *= s / W``, then ``s = W``, so calling again, or adding
        more, stays correct) and merged into the first that holds anything. The views are valid
        until the next ``reset``/``add``: the caller consumes them (the server step writes the new
        global into fresh arrays).
        """
        self._drain()
        live = [s for s in self._sums if s.scale != 0.0]
        if self.count == 0 or self.total_weight <= 0 or not live:
            return None
        head = live[0]
        head.normalise(self.total_weight)
        for other in live[1:]:
            other.normalise(self.total_weight)
            for a, b in zip(head.acc, other.acc):
                np.add(a, b, out=a)
            other.clear()
        return [a.reshape(shape) for a, shape in zip(head.acc, self._shapes)]


class _Holding:
    """Holds references to (delta, weight, scale) for reducers that need all updates."""

    streaming = False

    def __init__(self, template: Sequence[np.ndarray], max_updates: int = 0, memory_mb: int = 2048) -> None:
        self._shapes = [t.shape for t in template]
        #: 0: as many updates as ``memory_mb`` holds for this model (each held update is one model of
        #: float32; the per-tensor stack at the end is transient); an update beyond it is ``too_many``
        model_bytes = max(1, sum(int(np.prod(t.shape)) * 4 for t in template))
        self.max_updates = max_updates or max(1, (memory_mb << 20) // model_bytes)
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

    def __init__(self, template: Sequence[np.ndarray], max_updates: int = 0, beta: float = 0.1,
                 memory_mb: int = 2048) -> None:
        super().__init__(template, max_updates, memory_mb)
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

    def __init__(self, template: Sequence[np.ndarray], max_updates: int = 0, f: int = 1, m: int = 1,
                 memory_mb: int = 2048) -> None:
        super().__init__(template, max_updates, memory_mb)
        if not max_updates:  # K held updates (K x P x 4 B) plus the K x K float64 Gram and distance matrices
            p4, budget = sum(int(np.prod(sh)) for sh in self._shapes) * 4, memory_mb << 20
            self.max_updates = max(1, int((-p4 + (p4 * p4 + 4 * 16 * budget) ** 0.5) / (2 * 16)))
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
