"""What the aggregator keeps on disk: atomic checkpoints, the run history, the model cache.

A checkpoint is written after every round (fedmq.broker.storage: temp file, fsync, rename, fsync of the directory):
the next round id, the global weights and their round, the strategy/optimizer state and the
history. History files (JSON lines and CSV) are regenerated from it, so they never disagree.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmq.broker.storage import atomic_write

__all__ = ["Checkpoint", "atomic_write", "write_history"]  # atomic_write: model_store imports it from here


@dataclass
class Checkpoint:
    next_round: int
    global_round: int
    model_id: str
    weights: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path) -> None:
        meta = {"next_round": self.next_round, "global_round": self.global_round, "model_id": self.model_id,
                "history": self.history, "format": 1}
        arrays = {f"g/{k}": v for k, v in self.weights.items()}
        arrays.update({f"s/{k}": np.asarray(v) for k, v in self.strategy.items()})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Checkpoint | None":
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            weights = {k[2:]: z[k] for k in z.files if k.startswith("g/")}
            strat = {k[2:]: z[k] for k in z.files if k.startswith("s/")}
        return cls(meta["next_round"], meta["global_round"], meta["model_id"], weights, strat, meta["history"])


def write_history(rows: list[dict], directory: Path) -> None:
    atomic_write(directory / "history.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], (list, dict))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(directory / "history.csv", buf.getvalue().encode())
