"""Bring your own data to ``fedmq-aggregator simulate``: the files it takes, made from a toy task.

Writes, under OUT (default ``byo-data``):

* ``agents/site-1.npz`` .. ``site-4.npz`` — one file per agent (``x``: float32 [n, 64], ``y``: int labels
  0..9), each site with its own label mix (non-IID, as real sites are);
* ``all.npz`` — the same examples in one file, with a ``groups`` array (the site of each example),
  for ``--partition iid|dirichlet|shards|natural``;
* ``held_out.npz`` — the aggregator's held-out set.

The task: 10 classes, each a random prototype in 64 dimensions plus noise (it fits ``zoo:mlp``,
whose input is 64 features and whose output is 10 classes). Replace it with your arrays; the
only contract is ``np.savez(path, x=inputs, y=integer_labels)``. Then (docs/datasets.md):

    python examples/byo_data.py byo-data
    fedmq-aggregator simulate --data byo-data/agents --eval byo-data/held_out.npz --model zoo:mlp --rounds 5
    fedmq-aggregator simulate --data byo-data/all.npz --partition dirichlet --alpha 0.5 --agents 6 \\
        --eval byo-data/held_out.npz --model zoo:mlp --rounds 5
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def make(out: Path, sites: int = 4, per_site: int = 150, held_out: int = 400, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(10, 64)).astype(np.float32)

    def sample(labels: np.ndarray) -> np.ndarray:
        return (protos[labels] + rng.normal(scale=1.5, size=(len(labels), 64))).astype(np.float32)

    (out / "agents").mkdir(parents=True, exist_ok=True)
    written, xs, ys, gs = [], [], [], []
    for s in range(sites):
        mix = rng.dirichlet(np.full(10, 0.8))  # each site sees its own label mix
        y = rng.choice(10, size=per_site, p=mix).astype(np.int32)
        x = sample(y)
        p = out / "agents" / f"site-{s + 1}.npz"
        np.savez(p, x=x, y=y)
        written.append(p)
        xs.append(x)
        ys.append(y)
        gs.append(np.full(per_site, s + 1, np.int32))
    np.savez(out / "all.npz", x=np.concatenate(xs), y=np.concatenate(ys), groups=np.concatenate(gs))
    y = rng.integers(0, 10, size=held_out).astype(np.int32)
    np.savez(out / "held_out.npz", x=sample(y), y=y)
    return [*written, out / "all.npz", out / "held_out.npz"]


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "byo-data")
    for path in make(target):
        print(path)
