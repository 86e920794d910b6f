"""Real datasets that install offline (see docs/datasets.md), loaded without TensorFlow.

* ``watch``         — smartwatch motion sensors shipped in PyPI ``seglearn`` (extra ``datasets``, or
  ``pip install --no-deps seglearn==1.2.5`` to keep scipy/scikit-learn out): 140 recordings,
  6 channels at 50 Hz, 7 shoulder exercises, subjects 1-10. Cut into windows of 100 samples, step 50 (4,677 windows), scaled
  per channel by fixed dataset constants. The file is a NumPy pickle from a trusted package,
  loaded with ``allow_pickle`` (never done with anything from the network).
* ``fashion-mnist`` — Debian ``dataset-fashion-mnist`` (IDX files), 60k/10k, 28x28x1 in [0, 1].
* ``digits``        — scikit-learn's 8x8 digits, 1,797 x 64 in [0, 1] (needs scikit-learn: extra ``datasets``).
* the operator's own ``.npz`` files (``simulate --data``): ``load_npz`` / ``find_npz``, read with
  ``allow_pickle=False`` and checked (keys, shapes, integer labels, finite values) with messages
  that name the file; ``check_fits`` checks them against the model (input shape, class count).

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
from fedmq.broker.errors import ConfigError

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


def find_npz(spec: str | Path, exclude: Path | None = None) -> list[Path]:
    """The .npz files ``spec`` names: one file, every ``*.npz`` in a directory (sorted), or a glob pattern.

    ``exclude`` (the held-out file) is left out when it lies among them. ConfigError when none.
    """
    text = str(spec)
    p = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        import glob

        files = sorted(Path(f) for f in glob.glob(str(p)))
    elif p.is_dir():
        files = sorted(p.glob("*.npz"))
    elif p.is_file():
        files = [p]
    else:
        raise ConfigError(f"--data {text}: no such file or directory")
    ex = exclude.resolve() if exclude is not None else None
    files = [f for f in files if f.is_file() and f.resolve() != ex]
    if not files:
        raise ConfigError(f"--data {text}: no .npz files there (save each with np.savez(path, x=x, y=y))")
    return files


def load_npz(path: str | Path, *, groups: bool = False) -> Dataset:
    """``x`` (n examples, float) and ``y`` (n integer labels) from an .npz, checked; optional ``groups`` (n ids).

    Never unpickles (``allow_pickle=False``): an object array is refused, not executed.
    """
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file may raise anything
        raise ConfigError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if not hasattr(z, "files"):
        raise ConfigError(f"{path}: a single .npy array, not an .npz archive: np.savez(path, x=x, y=y)")
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise ConfigError(f"{path}: no array {' or '.join(map(repr, missing))} (it has {z.files}); "
                              "save it with np.savez(path, x=inputs, y=integer_labels)")
        try:
            x, y = z["x"], z["y"]
            g = z["groups"] if groups and "groups" in z.files else None
        except ValueError as e:  # object arrays need pickle
            raise ConfigError(f"{path}: {e}; save numeric arrays (x float, y int)") from None
    if x.dtype.kind not in "fiub":
        raise ConfigError(f"{path}: x has dtype {x.dtype}: it must be numeric (float32 preferred)")
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(f"{path}: x has shape {x.shape}: it must be [n examples, *input shape] with n > 0")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"{path}: y has shape {y.shape}: it must be one label per example, shape ({len(x)},)")
    if y.dtype.kind not in "iu" and not (y.dtype.kind in "fb" and np.all(np.mod(y, 1) == 0)):
        raise ConfigError(f"{path}: y has dtype {y.dtype} with non-integer values: labels are class indices")
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        raise ConfigError(f"{path}: x has {int(np.size(xf) - np.isfinite(xf).sum())} NaN or infinite values")
    yi = y.astype(np.int64)
    if yi.min() < 0:
        raise ConfigError(f"{path}: y has negative labels (min {int(yi.min())}): labels are 0 .. classes-1")
    if g is not None and (g.ndim != 1 or len(g) != len(x)):
        raise ConfigError(f"{path}: groups has shape {g.shape}: it must be one client id per example")
    return Dataset(xf, yi.astype(np.int32), g, int(yi.max()) + 1)


def check_fits(d: Dataset, path: str | Path, x_shape: tuple[int, ...], num_classes: int) -> None:
    """ConfigError unless the examples have the model's input shape and labels below its class count."""
    if tuple(d.x.shape[1:]) != tuple(x_shape):
        hint = (f"; reshape with x.reshape(len(x), {', '.join(map(str, x_shape))})"
                if int(np.prod(d.x.shape[1:])) == int(np.prod(x_shape)) else "")
        raise ConfigError(f"{path}: examples have shape {tuple(d.x.shape[1:])}, the model expects "
                          f"{tuple(x_shape)}{hint}")
    if int(d.y.max()) >= num_classes:
        raise ConfigError(f"{path}: label {int(d.y.max())} is out of range: the model has {num_classes} outputs "
                          f"(labels 0 .. {num_classes - 1})")
