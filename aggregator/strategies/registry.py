"""Strategies by name from the aggregator's TOML ``[strategy]`` table.

Every preset is a configuration of the one pipeline; ``name = "hybrid"`` (or any preset with
overrides) composes the pieces explicitly::

    [strategy]
    name = "hybrid"
    weights = ["samples", "quality"]          # product of factors; [] = uniform
    quality = { metric = "val_accuracy", mapping = "softmax", temperature = 0.1 }
    clip = { bound = 5.0, adaptive = false, quantile = 0.5, lr = 0.2 }
    reducer = "trimmed_mean"                  # mean | median | trimmed_mean | krum | multikrum
    beta = 0.1                                # trimmed_mean;  f, m for (multi)krum
    noise = { multiplier = 0.5, seed = 0 }    # needs clip
    server = { name = "adam", lr = 0.01, beta1 = 0.9, beta2 = 0.99, tau = 1e-3 }
    guard = { norm_k = 10.0, max_norm = 1e4, max_samples = 10_000_000, samples_k = 10.0 }
                                              # on by default; guard = { off = true } disables
    lanes = 0                                 # mean: fold threads; 0 = auto (2 on multi-core hosts
                                              # for models of >= 524,288 parameters), 1 = none
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Mapping

from fedmq.broker.errors import ConfigError

from .base import Strategy
from .guards import Guard
from .privacy import Clipper, GaussianNoise
from .reducers import CoordinateMedian, Krum, TrimmedMean, WeightedMean
from .server_opt import NAMES as SERVER_NAMES
from .server_opt import ServerOptimizer
from .weighting import FACTORS, MAPPINGS, Quality, Weighting

PRESETS: dict[str, dict[str, Any]] = {
    "mean": {"weights": [], "doc": "simple average of all updates (seed method 1)"},
    "weighted": {"weights": ["samples"], "doc": "average weighted by training sample count (seed method 2)"},
    "quality": {"weights": ["quality"], "doc": "average weighted by a reported quality metric (seed method 2)"},
    "fedavg": {"weights": ["samples"], "server": {"name": "sgd", "lr": 1.0},
               "doc": "FedAvg (McMahan 2017): sample-weighted mean of deltas, server lr (seed method 3)"},
    "fedavgm": {"weights": ["samples"], "server": {"name": "momentum", "lr": 1.0, "momentum": 0.9},
                "doc": "FedAvg with server momentum (Hsu 2019)"},
    "fedadam": {"weights": ["samples"], "server": {"name": "adam", "lr": 0.01},
                "doc": "FedAdam (Reddi 2021)"},
    "fedyogi": {"weights": ["samples"], "server": {"name": "yogi", "lr": 0.01}, "doc": "FedYogi (Reddi 2021)"},
    "fedadagrad": {"weights": ["samples"], "server": {"name": "adagrad", "lr": 0.01},
                   "doc": "FedAdagrad (Reddi 2021)"},
    "median": {"reducer": "median", "doc": "coordinate-wise median (Yin 2018)"},
    "trimmed_mean": {"reducer": "trimmed_mean", "beta": 0.1, "doc": "coordinate-wise trimmed mean (Yin 2018)"},
    "krum": {"reducer": "krum", "f": 1, "doc": "Krum (Blanchard 2017); needs n > 2f + 2"},
    "multikrum": {"reducer": "multikrum", "weights": ["samples"], "f": 1, "m": 3,
                  "doc": "multi-Krum: weighted mean of the m best Krum scores"},
    "dp_fedavg": {"weights": [], "clip": {"bound": 1.0}, "noise": {"multiplier": 1.0},
                  "doc": "DP-FedAvg (McMahan 2018): clipped uniform mean + Gaussian noise"},
    "hybrid": {"weights": ["samples", "quality"], "doc": "compose weights, clip, reducer, noise, server freely"},
}
KEYS = {"name", "weights", "quality", "clip", "reducer", "beta", "f", "m", "noise", "server", "max_updates",
        "memory_mb", "lanes", "guard"}
GUARD_KEYS = {"off", "norm_k", "norm_warmup", "norm_window", "max_norm", "max_samples", "samples_k"}
REDUCERS = ("mean", "median", "trimmed_mean", "krum", "multikrum")


def _sub(table: Any, key: str, allowed: set[str], section: str) -> dict[str, Any]:
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{section}.{key} must be a table")
    for k in table:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            raise ConfigError(f"unknown key {section}.{key}.{k}" + (f" (did you mean {close[0]!r}?)" if close else
                                                                   f"; known: {', '.join(sorted(allowed))}"))
    return dict(table)


def _num(d: Mapping[str, Any], key: str, where: str, lo: float, hi: float, default: Any, integer: bool = False):
    v = d.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}.{key} = {v!r}: must be {kind} in [{lo}, {hi}]")
    return v


def build_strategy(table: Mapping[str, Any] | None = None, section: str = "strategy") -> Strategy:
    """Build a Strategy from a ``[strategy]`` table; ConfigError names the key and the fix."""
    table = dict(table or {"name": "fedavg"})
    for k in table:
        if k not in KEYS:
            close = difflib.get_close_matches(k, KEYS, n=1)
            raise ConfigError(f"unknown key {section}.{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    name = table.get("name", "fedavg")
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        raise ConfigError(f"{section}.name = {name!r} is not a strategy"
                          + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; choose one of: {', '.join(PRESETS)}")
    cfg = {k: v for k, v in PRESETS[name].items() if k != "doc"}
    for k, v in table.items():
        if isinstance(v, Mapping) and isinstance(cfg.get(k), Mapping):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v

    factors = cfg.get("weights", [])
    if not isinstance(factors, list) or any(f not in FACTORS for f in factors):
        raise ConfigError(f"{section}.weights = {factors!r}: a list of {', '.join(FACTORS)}")
    q = _sub(cfg.get("quality"), "quality", {"metric", "mapping", "temperature"}, section)
    if q.get("mapping", "proportional") not in MAPPINGS:
        raise ConfigError(f"{section}.quality.mapping = {q.get('mapping')!r}: use one of {', '.join(MAPPINGS)}")
    if "temperature" in q:
        _num(q, "temperature", f"{section}.quality", 1e-6, 1e6, 1.0)
    if "metric" in q and not isinstance(q["metric"], str):
        raise ConfigError(f"{section}.quality.metric must be a metric name such as \"val_accuracy\"")
    weighting = Weighting(tuple(f for f in factors if f != "uniform"), Quality(**q))

    # robust reducers hold every update (K x model): 0 = as many as memory_mb holds for this model
    max_updates = _num(cfg, "max_updates", section, 0, 10**7, 0, integer=True)
    memory_mb = _num(cfg, "memory_mb", section, 1, 10**7, 2048, integer=True)
    reducer = cfg.get("reducer", "mean")
    if reducer not in REDUCERS:
        raise ConfigError(f"{section}.reducer = {reducer!r}: use one of {', '.join(REDUCERS)}")
    lanes = _num(cfg, "lanes", section, 0, 16, 0, integer=True)
    if reducer == "mean":
        make = partial(WeightedMean, lanes=lanes or None)
    elif reducer == "median":
        make = partial(CoordinateMedian, max_updates=max_updates, memory_mb=memory_mb)
    elif reducer == "trimmed_mean":
        beta = _num(cfg, "beta", section, 0.0, 0.499, 0.1)
        make = partial(TrimmedMean, max_updates=max_updates, beta=beta, memory_mb=memory_mb)
    else:
        f = _num(cfg, "f", section, 0, 10**5, 1, integer=True)
        m = 1 if reducer == "krum" else _num(cfg, "m", section, 1, 10**5, 3, integer=True)
        make = partial(Krum, max_updates=max_updates, f=f, m=m, memory_mb=memory_mb)

    clipper = None
    c = _sub(cfg.get("clip"), "clip", {"bound", "adaptive", "quantile", "lr"}, section)
    if c:
        clipper = Clipper(bound=_num(c, "bound", f"{section}.clip", 1e-12, 1e12, 1.0),
                          adaptive=bool(c.get("adaptive", False)),
                          quantile=_num(c, "quantile", f"{section}.clip", 0.0, 1.0, 0.5),
                          lr=_num(c, "lr", f"{section}.clip", 0.0, 10.0, 0.2))
    noise = None
    n = _sub(cfg.get("noise"), "noise", {"multiplier", "seed"}, section)
    if n:
        if clipper is None:
            raise ConfigError(f"{section}.noise needs {section}.clip: Gaussian noise is calibrated to the clip bound")
        noise = GaussianNoise(_num(n, "multiplier", f"{section}.noise", 0.0, 1e6, 1.0),
                              _num(n, "seed", f"{section}.noise", 0, 2**32 - 1, 0, integer=True))
    s = _sub(cfg.get("server"), "server", {"name", "lr", "momentum", "beta1", "beta2", "tau"}, section)
    sname = s.get("name", "sgd")
    if sname not in SERVER_NAMES:
        raise ConfigError(f"{section}.server.name = {sname!r}: use one of {', '.join(SERVER_NAMES)}")
    w = f"{section}.server"
    server = ServerOptimizer(sname, lr=_num(s, "lr", w, 0.0, 1e3, 1.0), momentum=_num(s, "momentum", w, 0.0, 0.9999, 0.9),
                             beta1=_num(s, "beta1", w, 0.0, 0.9999, 0.9), beta2=_num(s, "beta2", w, 0.0, 0.99999, 0.99),
                             tau=_num(s, "tau", w, 1e-12, 10.0, 1e-3))
    g = _sub(cfg.get("guard"), "guard", GUARD_KEYS, section)
    guard = None
    if not g.get("off", False):
        w = f"{section}.guard"
        guard = Guard(norm_k=_num(g, "norm_k", w, 0.0, 1e6, 10.0),
                      norm_warmup=_num(g, "norm_warmup", w, 1, 10**4, 3, integer=True),
                      norm_window=_num(g, "norm_window", w, 1, 10**5, 50, integer=True),
                      max_norm=_num(g, "max_norm", w, 0.0, 1e300, 1e4),
                      max_samples=_num(g, "max_samples", w, 0, 2**62, 10_000_000, integer=True),
                      samples_k=_num(g, "samples_k", w, 0.0, 1e6, 10.0))
    elif not isinstance(g["off"], bool):
        raise ConfigError(f"{section}.guard.off must be true or false")
    return Strategy(name, weighting, make, server, clipper, noise, max_updates, guard)
