"""Local data sources. Data never leaves the device: only weight deltas do.

* ``npz:/path/data.npz``   — arrays ``x`` and ``y``
* ``csv:/dir``             — every ``*.csv`` in the directory: feature columns then the label in the last
                             column (a header row is skipped when it is not numeric)
* ``callable:pkg.mod:fn``  — a function returning ``(x, y)``
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from fedmq.broker.errors import ConfigError


def load_local(source: str) -> tuple[np.ndarray, np.ndarray]:
    kind, _, rest = source.partition(":")
    if kind == "npz":
        p = Path(rest)
        if not p.is_file():
            raise ConfigError(f"data.source: {p} not found")
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise ConfigError(f"data.source: {p} must hold arrays 'x' and 'y' (has {z.files})")
            return z["x"], z["y"]
    if kind == "csv":
        d = Path(rest)
        files = sorted(d.glob("*.csv")) if d.is_dir() else []
        if not files:
            raise ConfigError(f"data.source: no *.csv files in {d}")
        rows = []
        for f in files:
            with open(f) as fh:
                first = fh.readline()
                try:
                    [float(v) for v in first.strip().split(",")]
                    skip = 0
                except ValueError:
                    skip = 1
            rows.append(np.loadtxt(f, delimiter=",", skiprows=skip, ndmin=2))
        a = np.concatenate(rows)
        return a[:, :-1].astype(np.float32), a[:, -1].astype(np.int32)
    if kind == "callable":
        mod, _, fn = rest.rpartition(":")
        try:
            x, y = getattr(importlib.import_module(mod), fn)()
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"data.source: cannot call {rest!r}: {e}") from None
        return np.asarray(x), np.asarray(y)
    raise ConfigError(f"data.source = {source!r}: use npz:, csv: or callable:")


def split_eval(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """A seeded local hold-out split: (x_train, y_train, x_eval, y_eval)."""
    if fraction <= 0 or len(y) < 2:
        return x, y, x[:0], y[:0]
    order = np.random.default_rng(seed).permutation(len(y))
    k = max(1, int(round(fraction * len(y))))
    ev, tr = order[:k], order[k:]
    return x[tr], y[tr], x[ev], y[ev]
