"""Splitting a dataset across simulated agents.

* ``iid``       — a seeded shuffle cut into equal parts
* ``dirichlet`` — label skew: for each class, proportions ~ Dirichlet(alpha) over agents
  (Hsu et al. 2019); small alpha = very non-IID
* ``shards``    — the FedAvg paper's pathological split: sort by label, cut into 2N shards, give
  each agent 2 random shards (McMahan et al. 2017)
* ``natural``   — the data's own clients (the watch data: one agent per subject)
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards", "natural")


def partition(y: np.ndarray, n_agents: int, how: str = "iid", *, alpha: float = 0.5, seed: int = 0,
              groups: np.ndarray | None = None, shards_per_agent: int = 2) -> list[np.ndarray]:
    """Return one index array per agent (disjoint, covering the data except where noted)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    if how == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_agents)]
    if how == "dirichlet":
        classes = np.unique(y)
        parts: list[list[int]] = [[] for _ in range(n_agents)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(n_agents, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for a, chunk in enumerate(np.split(idx, cuts)):
                parts[a].extend(chunk.tolist())
        return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    if how == "shards":
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, n_agents * shards_per_agent)
        pick = rng.permutation(len(shards))
        return [np.sort(np.concatenate([shards[s] for s in pick[a * shards_per_agent:(a + 1) * shards_per_agent]]))
                for a in range(n_agents)]
    if how == "natural":
        if groups is None:
            raise ValueError("partition 'natural' needs a dataset with natural client groups (e.g. watch)")
        ids = np.unique(groups)
        if n_agents != len(ids):
            raise ValueError(f"partition 'natural' gives one agent per group: use --agents {len(ids)}")
        return [np.flatnonzero(groups == g) for g in ids]
    raise ValueError(f"unknown partition {how!r}; use one of {', '.join(PARTITIONS)}")
