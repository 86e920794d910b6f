"""The strategy the round controller drives: begin a round, fold updates in, finish.

    s.begin_round(global_weights, round_no)   # ordered {name: array}
    s.add(ClientUpdate(...)) -> None | reason # never raises on network input
    result = s.finish()                       # RoundResult: new weights (or None) + metrics

The strategy may read an update's arrays until ``finish()`` (the mean folds on worker threads
for large models): do not modify them after ``add``.

Every update is checked before it counts: tensor names, shapes and dtypes equal the global
model's, all values finite, a weight that is finite and > 0, one update per agent. A rejected
update is excluded with a short reason (counted in ``result.rejected``). A round with no usable
weight returns ``weights=None``: the global model stays as it was.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..ratelog import BoundedLog
from .guards import Guard
from .privacy import Clipper, GaussianNoise
from .reducers import Krum, sum_squares
from .server_opt import ServerOptimizer
from .weighting import Weighting, WeightRejected

log = logging.getLogger(__name__)


@dataclass
class ClientUpdate:
    agent: str
    num_samples: int
    delta: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class RoundResult:
    weights: dict[str, np.ndarray] | None  # None: unchanged
    outcome: str  # "aggregated" | "unchanged"
    metrics: dict[str, float]
    participants: list[str]
    rejected: dict[str, int]
    reason: str = ""


ReducerFactory = Callable[[Sequence[np.ndarray]], object]


class Strategy:
    def __init__(self, name: str, weighting: Weighting, reducer: ReducerFactory,
                 server: ServerOptimizer, clipper: Clipper | None = None, noise: GaussianNoise | None = None,
                 max_updates: int = 0, guard: Guard | None = None) -> None:
        self.name = name
        self.guard = guard
        self.rejects = BoundedLog(log)
        self.weighting = weighting
        self.make_reducer = reducer
        self.server = server
        self.clipper = clipper
        self.noise = noise
        self.max_updates = max_updates
        self.rounds_done = 0
        self._global: dict[str, np.ndarray] | None = None
        self._reducer = None  # kept across rounds when it can be reused (the streaming mean)

    # -- round protocol ---------------------------------------------------------------------------
    def begin_round(self, global_weights: Mapping[str, np.ndarray], round_no: int) -> None:
        self._global = dict(global_weights)
        self._names = list(global_weights)
        self._round = round_no
        template = list(global_weights.values())
        old = self._reducer
        if hasattr(old, "fits") and old.fits(template):
            old.reset()  # the streaming mean keeps its buffers from round to round
        else:
            self._reducer = self.make_reducer(template)
        self._rejected: Counter[str] = Counter()
        self._agents: dict[str, None] = {}  # the round's participants in arrival order; O(1) duplicate check
        self._weights: list[float] = []
        self._norms: list[float] = []
        self._loss_num = 0.0
        self._loss_den = 0.0
        self._capped = 0
        if self.guard is not None:
            self.guard.begin_round()

    def _reject(self, u: ClientUpdate, reason: str, detail: str) -> str:
        self._rejected[reason] += 1
        self.rejects.reject(u.agent, reason, "round %s: update from %s excluded: %s (%s)", self._round, u.agent,
                            detail, reason)
        return reason

    def check(self, u: ClientUpdate) -> tuple[str, str] | None:
        """Structural checks of one update against the global model: (reason, detail) or None."""
        g = self._global
        if set(u.delta) != set(g):
            missing, extra = set(g) - set(u.delta), set(u.delta) - set(g)
            return "bad_tensors", f"missing {sorted(missing)[:3]} unexpected {sorted(extra)[:3]}"
        for n, ref in g.items():
            d = u.delta[n]
            if not isinstance(d, np.ndarray):
                return "bad_dtype", f"{n} is not an array"
            if d.shape != ref.shape:
                return "bad_shape", f"{n} has shape {d.shape}, model has {ref.shape}"
            if d.dtype != ref.dtype:
                return "bad_dtype", f"{n} has dtype {d.dtype}, model has {ref.dtype}"
        if type(u.num_samples) is not int or u.num_samples < 0:
            return "bad_samples", f"num_samples {u.num_samples!r} is not a non-negative int"
        return None

    def add(self, u: ClientUpdate) -> str | None:
        """Fold one update in; return None if accepted, else the rejection reason."""
        if self._global is None:
            raise RuntimeError("begin_round() first")
        if u.agent in self._agents:
            return self._reject(u, "duplicate", "second update in this round")
        bad = self.check(u)
        if bad:
            return self._reject(u, *bad)
        samples, capped = u.num_samples, False
        if self.guard is not None:
            samples, bad, capped = self.guard.samples_for_weight(u.num_samples)
            if bad:
                return self._reject(u, *bad)
        try:
            w = self.weighting.weight(samples, u.metrics)
        except WeightRejected as e:
            return self._reject(u, e.reason, str(e))
        if getattr(self._reducer, "full", lambda: False)():
            held = getattr(self._reducer, "max_updates", self.max_updates)
            return self._reject(u, "too_many", f"{held} updates held already ([strategy] max_updates / memory_mb)")
        delta = [u.delta[n] for n in self._names]
        scale, known = 1.0, None
        if self.clipper is not None or self.guard is not None:  # the norm is needed before folding
            known = sum_squares(delta)  # the reducer reuses it
            if not math.isfinite(known):
                return self._reject(u, "non_finite", "delta has NaN/Inf (or overflows)")
            if self.guard is not None:
                bad = self.guard.check_norm(math.sqrt(known))
                if bad:
                    return self._reject(u, *bad)
            if self.clipper is not None:
                scale = self.clipper.scale(math.sqrt(known))
        sq = self._reducer.add(delta, w, scale, known)
        if not math.isfinite(sq):
            return self._reject(u, "non_finite", "delta has NaN/Inf (or overflows)")
        if capped:
            self._capped += 1
            log.info("round %s: %s claims %d samples; weighted as %d (weight_capped)", self._round, u.agent,
                     u.num_samples, samples)
        if self.guard is not None:
            self.guard.accepted(math.sqrt(sq), samples)
        self._agents[u.agent] = None
        self._weights.append(w)
        self._norms.append(math.sqrt(sq))
        loss = u.metrics.get("loss")
        if loss is not None and math.isfinite(loss):
            self._loss_num += loss * max(samples, 0)
            self._loss_den += max(samples, 0)
        return None

    def finish(self) -> RoundResult:
        red = self._reducer
        metrics: dict[str, float] = {"accepted": float(len(self._agents)),
                                     "rejected": float(sum(self._rejected.values()))}
        if self._capped:
            metrics["weight_capped"] = float(self._capped)
        if self.guard is not None and math.isfinite(self.guard.norm_bound()):
            metrics["norm_bound"] = self.guard.norm_bound()
        if self._norms:
            metrics.update(update_norm_mean=float(np.mean(self._norms)), update_norm_max=float(np.max(self._norms)))
        if self._loss_den > 0:
            metrics["train_loss"] = self._loss_num / self._loss_den
        if self.clipper is not None:
            metrics.update(self.clipper.end_round())
        reason = ""
        mean = None
        if not self._agents:
            reason = "no usable updates"
        elif isinstance(red, Krum) and red.precondition():
            reason = red.precondition()
        else:
            mean = red.result()
            if mean is None:
                reason = "zero total weight"
        if self.guard is not None:
            self.guard.end_round(mean is not None)
        if mean is None:
            log.warning("round %s: global model unchanged: %s", self._round, reason)
            return RoundResult(None, "unchanged", metrics, list(self._agents), dict(self._rejected), reason)
        if isinstance(red, Krum):
            metrics["krum_selected"] = float(len(red.selected))
        if self.noise is not None:
            clip = self.clipper.bound if self.clipper else float("nan")
            sigma = self.noise.sigma(metrics.get("clip_bound", clip), max(self._weights), sum(self._weights))
            self.noise.apply(mean, sigma, self._round)
            metrics["noise_sigma"] = sigma
        x = [self._global[n] for n in self._names]
        new = self.server.step(x, mean)
        metrics["delta_norm"] = float(math.sqrt(sum(float(np.dot(m.reshape(-1), m.reshape(-1))) for m in mean)))
        self.rounds_done += 1
        return RoundResult(dict(zip(self._names, new)), "aggregated", metrics, list(self._agents),
                           dict(self._rejected))

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        st = {f"server/{k}": v for k, v in self.server.state_dict().items()}
        st["rounds_done"] = np.array(self.rounds_done)
        if self.clipper is not None:
            st["clip_bound"] = np.array(self.clipper.bound)
        if self.guard is not None:
            st.update(self.guard.state_dict())
        return st

    def load_state_dict(self, st: Mapping[str, np.ndarray]) -> None:
        self.server.load_state_dict({k[7:]: v for k, v in st.items() if k.startswith("server/")})
        self.rounds_done = int(st.get("rounds_done", 0))
        if self.clipper is not None and "clip_bound" in st:
            self.clipper.bound = float(st["clip_bound"])
        if self.guard is not None:
            self.guard.load_state_dict(st)
