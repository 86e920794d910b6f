"""On-device training with a TFLite interpreter (no TensorFlow).

``TFLiteTrainer`` loads a verified artifact (its SHA-256 must equal the model id), checks its
signatures, and trains: set the global weights, run E epochs over the local data with a seeded
shuffle, in batches of the artifact's fixed size. The last partial batch is padded with zeros
and masked out of the loss (``mask``), so every example counts exactly once per epoch and no
data is dropped. Returns the new weights, the sample count and the mean training loss.

Under ``fedmq-agent run`` (``selftest.enable``), the runtime is first chosen by the self-test: one
training step of the artifact in a child process per (artifact, runtime), see ``selftest``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .runtime import load_interpreter
from .signature import Signature

log = logging.getLogger(__name__)
SIGNATURES = ("train", "evaluate", "infer", "get_weights", "set_weights")


class ArtifactError(ValueError):
    """The model artifact is corrupt, unverified or lacks what training needs."""


class DataError(ValueError):
    """Local data does not match the model's input spec."""


@dataclass
class FitResult:
    weights: list[np.ndarray]
    num_samples: int
    loss: float  # mean training loss over all steps
    steps: int
    seconds: float


def check_data(x: np.ndarray, y: np.ndarray, x_shape: tuple[int, ...], num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != len(x_shape) + 1 or tuple(x.shape[1:]) != tuple(x_shape):
        raise DataError(f"local data has examples of shape {tuple(x.shape[1:])}, the model expects {tuple(x_shape)}")
    if y.shape != (x.shape[0],):
        raise DataError(f"labels have shape {y.shape}, expected ({x.shape[0]},): one integer label per example")
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise DataError(f"data must be numeric with integer labels (got x {x.dtype}, y {y.dtype})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = y.astype(np.int32)
    if not np.all(np.isfinite(x)):
        raise DataError("local data contains NaN or Inf")
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise DataError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return x, y


class TFLiteTrainer:
    def __init__(self, artifact: bytes, model_id: str | None = None, runtime: str | None = None,
                 num_threads: int | None = None, xnnpack: bool | None = None) -> None:
        digest = hashlib.sha256(artifact).hexdigest()
        if model_id is not None and digest != model_id:
            raise ArtifactError(f"artifact hash {digest[:16]}... does not match model id {model_id[:16]}...")
        self.model_id = digest
        from . import selftest

        if selftest.enabled_dir() is not None:  # fedmq-agent run: a runtime must first pass one training step
            runtime = selftest.choose_runtime(artifact, runtime or os.environ.get("FEDMQ_TFLITE_RUNTIME") or None,
                                              selftest.enabled_dir(), xnnpack=xnnpack).runtime
        self._artifact, self._runtime_name, self._num_threads, self._xnnpack = artifact, runtime, num_threads, xnnpack
        self._load()
        xin = self._train.get_input_details()["x"]
        self.batch_size = int(xin["shape"][0])
        self.x_shape = tuple(int(d) for d in xin["shape"][1:])
        self.weight_names = sorted(self._set.get_input_details())
        self.prox = "mu" in self._train.get_input_details()  # exported with the FedProx anchor
        self.num_classes = int(self._infer.get_output_details()["output"]["shape"][-1])

    def _load(self) -> None:
        try:
            self.interp, self.runtime = load_interpreter(self._artifact, self._runtime_name, self._num_threads,
                                                         self._xnnpack)
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"not a loadable TFLite model: {e}") from None
        sigs = self.interp.get_signature_list()
        missing = [s for s in SIGNATURES if s not in sigs]
        if missing:
            raise ArtifactError(f"artifact lacks signature(s) {missing}: export it with fedmq-aggregator export")
        # Signature: resize an input only when its shape changes (LiteRT on aarch64 crashes resizing
        # the 0-d lr input; see signature.py)
        run = lambda key: Signature(self.interp.get_signature_runner(key))  # noqa: E731
        self._train, self._eval, self._infer = run("train"), run("evaluate"), run("infer")
        self._get, self._set = run("get_weights"), run("set_weights")

    def release(self) -> None:
        """Drop the interpreter and its buffers (weights, training temporaries): the process gives
        them back to the OS. The next call loads the artifact again, with the weights at zero, so
        set the weights (``fit(weights=...)``) first. The agent's ``low_memory`` mode calls this
        after each round: an idle device holds no model-size buffers."""
        self.interp = self._train = self._eval = self._infer = self._get = self._set = None

    def _ready(self) -> None:
        if self.interp is None:
            self._load()

    def get_weights(self) -> list[np.ndarray]:
        self._ready()
        out = self._get()  # the runner already returns fresh arrays: no second copy
        return [out[n] for n in self.weight_names]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Set weights (also resets the local optimizer and the FedProx anchor)."""
        if len(weights) != len(self.weight_names):
            raise ArtifactError(f"{len(weights)} weight tensors given, the model has {len(self.weight_names)}")
        self._ready()
        details = self._set.get_input_details()
        feed = {}
        for n, w in zip(self.weight_names, weights):
            want = tuple(details[n]["shape"])
            if tuple(np.shape(w)) != want:
                raise ArtifactError(f"weight {n} has shape {np.shape(w)}, the model expects {want}")
            feed[n] = np.ascontiguousarray(w, dtype=details[n]["dtype"])
        self._set(**feed)

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int = 1, lr: float = 0.01, mu: float = 0.0,
            seed: int = 0, weights: Sequence[np.ndarray] | None = None) -> FitResult:
        x, y = check_data(x, y, self.x_shape, self.num_classes)
        if mu and not self.prox:
            raise ArtifactError(f"mu = {mu} (FedProx) but the artifact was exported without the proximal term: "
                                "export it with prox (the aggregator does so when [train] mu > 0)")
        if weights is not None:
            self.set_weights(weights)
        self._ready()
        n, b = x.shape[0], self.batch_size
        rng = np.random.default_rng(seed)
        xb = np.zeros((b, *self.x_shape), np.float32)
        yb = np.zeros(b, np.int32)
        mask = np.zeros(b, np.float32)
        feed = {"lr": np.float32(lr)}
        if self.prox:
            feed["mu"] = np.float32(mu)
        total, steps = 0.0, 0
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = rng.permutation(n)
            for s in range(0, n, b):
                idx = order[s : s + b]
                k = idx.size
                xb[:k], yb[:k] = x[idx], y[idx]
                mask[:k] = 1.0
                if k < b:  # pad the last partial batch; padded rows carry zero weight
                    xb[k:], yb[k:], mask[k:] = 0.0, 0, 0.0
                loss = float(self._train(x=xb, y=yb, mask=mask, **feed)["loss"])
                total += loss
                steps += 1
        return FitResult(self.get_weights(), int(n), total / steps if steps else float("nan"), steps,
                         time.perf_counter() - t0)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) on ``x, y``, in batches of the training batch size by default
        (the interpreter's arena grows with the largest batch it has seen: 256 CNN examples
        would cost the device ~90 MB)."""
        batch = batch or self.batch_size
        self._ready()
        x, y = check_data(x, y, self.x_shape, self.num_classes)
        loss = correct = 0.0
        for s in range(0, x.shape[0], batch):
            out = self._eval(x=x[s : s + batch], y=y[s : s + batch])
            loss += float(out["loss_sum"])
            correct += float(out["correct"])
        n = max(x.shape[0], 1)
        return loss / n, correct / n

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._ready()
        return np.array(self._infer(x=x)["output"])
