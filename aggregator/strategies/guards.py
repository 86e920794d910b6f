"""Plausibility bounds on one update's magnitude and claimed weight (poisoning defences).

Both are on by default in every strategy (``[strategy] guard = {...}``, docs/strategies.md):

* **norm bound** — an update whose L2 norm exceeds ``norm_k`` × the median of the last
  ``norm_window`` *accepted* norms is rejected (``norm_outlier``). Until ``norm_warmup`` norms
  have been accepted the bound is the absolute ``max_norm`` (which always applies). Rejected
  norms never enter the history, so a poisoner cannot drag the median up.
* **samples** — a claimed sample count above ``max_samples`` is rejected (``bad_samples``); a
  count above ``samples_k`` × the median of the last ``norm_window`` accepted counts is capped to
  that value before weighting (``weight_capped``, the update still counts).

Both bounds are fixed when a round begins, from earlier rounds only: a round's result does not
depend on the order its updates arrive in. The histories are checkpointed, so a restart does not
reopen a warm-up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Guard:
    norm_k: float = 10.0  # 0 disables the relative norm bound
    norm_warmup: int = 3
    norm_window: int = 50
    max_norm: float = 1e4  # absolute bound (always, and the only one during warm-up); 0 = none
    max_samples: int = 10_000_000  # 0 = no maximum
    samples_k: float = 10.0  # 0 disables the weight cap
    norms: deque = field(default_factory=deque)
    samples: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.bound, self.cap = float("inf"), None
        self._round_norms, self._round_samples = [], []
        self.norms = deque(self.norms, maxlen=self.norm_window)
        self.samples = deque(self.samples, maxlen=self.norm_window)

    def begin_round(self) -> None:
        """Fix this round's bounds from the accepted history of earlier rounds."""
        bound = self.max_norm if self.max_norm > 0 else float("inf")
        if self.norm_k > 0 and len(self.norms) >= self.norm_warmup:
            bound = min(bound, self.norm_k * float(np.median(self.norms)))
        self.bound = bound
        self.cap = None
        if self.samples_k > 0 and len(self.samples) >= self.norm_warmup:
            self.cap = max(1, int(self.samples_k * float(np.median(self.samples))))
        self._round_norms: list[float] = []
        self._round_samples: list[int] = []

    def norm_bound(self) -> float:
        """The largest L2 norm accepted in this round (inf: unbounded)."""
        return self.bound

    def check_norm(self, norm: float) -> tuple[str, str] | None:
        b = self.bound
        if norm > b:
            return "norm_outlier", f"L2 norm {norm:.4g} > bound {b:.4g}"
        return None

    def samples_for_weight(self, num_samples: int) -> tuple[int, tuple[str, str] | None, bool]:
        """(count used for weighting, rejection or None, capped?) of a claimed sample count."""
        if self.max_samples > 0 and num_samples > self.max_samples:
            return num_samples, ("bad_samples", f"num_samples {num_samples} > max_samples {self.max_samples}"), False
        if self.cap is not None and num_samples > self.cap:
            return self.cap, None, True
        return num_samples, None, False

    def accepted(self, norm: float, num_samples: int) -> None:
        self._round_norms.append(float(norm))
        self._round_samples.append(int(num_samples))

    def end_round(self, aggregated: bool) -> None:
        """Add the round's accepted norms and counts to the history (only if the round aggregated)."""
        if aggregated:
            self.norms.extend(self._round_norms)
            self.samples.extend(self._round_samples)
        self._round_norms, self._round_samples = [], []

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"guard/norms": np.array(self.norms, np.float64), "guard/samples": np.array(self.samples, np.int64)}

    def load_state_dict(self, st) -> None:
        if "guard/norms" in st:
            self.norms = deque((float(x) for x in np.asarray(st["guard/norms"]).reshape(-1)), maxlen=self.norm_window)
        if "guard/samples" in st:
            self.samples = deque((int(x) for x in np.asarray(st["guard/samples"]).reshape(-1)),
                                 maxlen=self.norm_window)
