"""Real datasets that install offline (see docs/datasets.md), loaded without TensorFlow.

* ``watch``         — smartwatch motion sensors shipped in PyPI ``seglearn`` (extra ``datasets``, or
  ``pip install --no-deps seglearn==1.2.5`` to keep scipy/scikit-learn out): 140 recordings,
  6 channels at 50 Hz, 7 shoulder exercises, subjects 1-10. Cut into windows of 100 samples, step 50 (4,677 windows), scaled
  per channel by fixed dataset constants. The file is a NumPy pickle from a trusted package,
  loaded with ``allow_pickle`` (never done with anything from the network).
* ``fashion-mnist`` — Debian ``dataset-fashion-mnist`` (IDX files), 60k/10k, 28x28x1 in [0, 1].
* ``digits``        — scikit-learn's 8x8 digits, 1,797 x 64 in [0, 1] (needs scikit-learn: extra ``datasets``).

A package that is not installed raises MissingExtra (exit 2 with ``pip install 'fedmq[datasets]'``);
an installed package without its data file raises DatasetMissing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.broker.commands.extras import MissingExtra, require

WATCH_MEAN = np.array([-0.0076, 0.3794, -0.147, 0.0253, -0.0015, 0.0118], np.float32)
WATCH_STD = np.array([0.9033, 0.4936, 0.5381, 0.9817, 2.4961, 1.0522], np.float32)
WATCH_CLASSES = ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"]
FASHION_DIR = Path(os.environ.get("FEDMQ_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


class DatasetMissing(FileNotFoundError):
    """The dataset is not installed; the message says how to install it."""


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None  # natural client id (watch: subject)
    classes: int = 0

    def subset(self, mask: np.ndarray) -> "Dataset":
        return Dataset(self.x[mask], self.y[mask], None if self.groups is None else self.groups[mask], self.classes)


def load_watch(window: int = 100, step: int = 50) -> Dataset:
    spec = importlib.util.find_spec("seglearn")
    if spec is None or spec.origin is None:
        raise MissingExtra("the watch dataset", "seglearn", "datasets",
                           "or, without scipy and scikit-learn: pip install --no-deps seglearn==1.2.5")
    path = Path(spec.origin).parent / "data" / "watch_dataset.npy"
    if not path.is_file():
        raise DatasetMissing(f"{path} not found: pip install --force-reinstall --no-deps seglearn==1.2.5")
    d = np.load(path, allow_pickle=True).item()  # trusted local package file
    xs, ys, gs = [], [], []
    for rec, label, subj in zip(d["X"], d["y"], d["subject"]):
        rec = (np.asarray(rec, np.float32) - WATCH_MEAN) / WATCH_STD
        for s in range(0, rec.shape[0] - window + 1, step):
            xs.append(rec[s : s + window])
            ys.append(int(label))
            gs.append(int(subj))
    return Dataset(np.stack(xs), np.array(ys, np.int32), np.array(gs, np.int32), len(WATCH_CLASSES))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train") -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    img, lab = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise DatasetMissing(f"Fashion-MNIST not found in {FASHION_DIR}: apt-get install -y dataset-fashion-mnist")
    x = (_idx(img).astype(np.float32) / 255.0)[..., None]
    return Dataset(x, _idx(lab).astype(np.int32), None, 10)


def load_digits() -> Dataset:
    d = require("sklearn.datasets", "datasets", "the digits dataset", package="scikit-learn").load_digits()
    return Dataset((d.data / 16.0).astype(np.float32), d.target.astype(np.int32), None, 10)


LOADERS = {"watch": load_watch, "fashion-mnist": load_fashion_mnist, "digits": load_digits}
