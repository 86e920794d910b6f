"""Server optimizers applied to the aggregated delta (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2; Hsu et al. 2019 for FedAvgM).

``delta`` is the aggregated client delta (a pseudo-gradient pointing downhill), ``x`` the global
weights, ``eta`` the server learning rate:

* ``sgd``       (FedAvg)    x <- x + eta * delta                (eta = 1: plain FedAvg)
* ``momentum``  (FedAvgM)   v <- beta * v + delta;  x <- x + eta * v
* ``adagrad``   (FedAdagrad) m <- b1 m + (1-b1) delta;  v <- v + delta^2
* ``adam``      (FedAdam)   m as above;  v <- b2 v + (1-b2) delta^2
* ``yogi``      (FedYogi)   m as above;  v <- v - (1-b2) delta^2 sign(v - delta^2)
  and for the three adaptive ones  x <- x + eta * m / (sqrt(v) + tau).

Defaults follow the paper: b1 = 0.9, b2 = 0.99, tau = 1e-3, v initialised to tau^2; eta must be
tuned (the paper's best values lie around 10^-2 .. 10^-0.5 for Adam/Yogi).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

NAMES = ("sgd", "momentum", "adagrad", "adam", "yogi")


def _fresh(x: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Arrays shaped like ``x`` that are views of one new flat buffer per dtype.

    The new global must not alias anything. One allocation for the whole model rather than one
    per tensor: measured ~10x cheaper for 1M parameters in 4 tensors (0.10 vs 1.24 ms), where
    the per-tensor buffers were faulted in page by page every round.
    """
    out: list[np.ndarray | None] = [None] * len(x)
    for dt in {a.dtype for a in x}:
        idx = [i for i, a in enumerate(x) if a.dtype == dt]
        flat = np.empty(sum(x[i].size for i in idx), dtype=dt)
        o = 0
        for i in idx:
            out[i] = flat[o : o + x[i].size].reshape(x[i].shape)
            o += x[i].size
    return out  # type: ignore[return-value]


def _step_into(out: np.ndarray, x: np.ndarray, lr: np.float32, v: np.ndarray) -> np.ndarray:
    """``out = x + lr * v`` with the expression's rounding (``lr * v`` in float32 first; exact at lr 1)."""
    if lr == 1:
        return np.add(x, v, out=out, casting="same_kind")
    np.multiply(v, lr, out=out, casting="same_kind")
    return np.add(x, out, out=out, casting="same_kind")


@dataclass
class ServerOptimizer:
    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        self.m: list[np.ndarray] | None = None
        self.v: list[np.ndarray] | None = None
        self.steps = 0

    def step(self, x: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the new weights; updates optimizer state in place."""
        self.steps += 1
        lr = np.float32(self.lr)
        if self.name == "sgd":
            return [_step_into(o, xi, lr, di) for o, xi, di in zip(_fresh(x), x, delta)]
        if self.name == "momentum":
            if self.m is None:
                self.m = [np.zeros_like(d, dtype=np.float32) for d in delta]
            for m, d in zip(self.m, delta):
                m *= np.float32(self.momentum)
                m += d
            return [_step_into(o, xi, lr, m) for o, xi, m in zip(_fresh(x), x, self.m)]
        b1, b2, tau = np.float32(self.beta1), np.float32(self.beta2), np.float32(self.tau)
        if self.m is None:
            self.m = [np.zeros_like(d, dtype=np.float32) for d in delta]
            self.v = [np.full_like(d, tau * tau, dtype=np.float32) for d in delta]
        out = _fresh(x)
        for o, xi, d, m, v in zip(out, x, delta, self.m, self.v):
            m *= b1
            m += (1 - b1) * d
            d2 = d * d
            if self.name == "adagrad":
                v += d2
            elif self.name == "adam":
                v *= b2
                v += (1 - b2) * d2
            else:  # yogi
                v -= (1 - b2) * d2 * np.sign(v - d2)
            np.add(xi, lr * m / (np.sqrt(v) + tau), out=o, casting="same_kind")
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        st: dict[str, np.ndarray] = {"steps": np.array(self.steps)}
        for key, arrs in (("m", self.m), ("v", self.v)):
            if arrs is not None:
                for i, a in enumerate(arrs):
                    st[f"{key}{i}"] = a
        return st

    def load_state_dict(self, st: dict[str, np.ndarray]) -> None:
        self.steps = int(st.get("steps", 0))
        for key in ("m", "v"):
            arrs = [np.array(st[f"{key}{i}"], dtype=np.float32) for i in range(len(st)) if f"{key}{i}" in st]
            setattr(self, key, arrs or None)
