"""On-device training with a TFLite interpreter (no TensorFlow).

``TFLiteTrainer`` loads a verified artifact (its SHA-256 must equal the model id), checks its
signatures, and trains: set the global weights, run E epochs over the local data with a seeded
shuffle, in batches of the artifact's fixed size. The last partial batch is padded with zeros
and masked out of the loss (``mask``), so every example counts exactly once per epoch and no
data is dropped. Returns the new weights, the sample count and the mean training loss.

The artifact is stateless (aggregator/export/trainable.py): the weights, the optimizer state and
the FedProx anchor are inputs of ``train``, held in its own input tensors, and after each step its
outputs are copied back into them, tensor to tensor. ``evaluate`` and ``infer`` take the weights
as inputs too: they get a copy of the current ones when those changed. So the device holds the
weights once per signature used, plus one step's gradient and outputs (the FedAvg CNN: ~20 MB
for training instead of ~57 MB with resource variables; bench/RESULTS.md).

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
SIGNATURES = ("train", "evaluate", "infer")
BATCH_INPUTS = ("x", "y", "mask", "lr", "mu")


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
        self._pending: list[np.ndarray] | None = None  # weights set, not yet in the train signature
        self._version = 0  # changes with every set and step; 0: no weights set
        self._load()

    def _load(self) -> None:
        try:
            self.interp, self.runtime = load_interpreter(self._artifact, self._runtime_name, self._num_threads,
                                                         self._xnnpack)
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"not a loadable TFLite model: {e}") from None
        sigs = self.interp.get_signature_list()
        missing = [s for s in SIGNATURES if s not in sigs]
        if missing:
            raise ArtifactError(f"artifact lacks signature(s) {missing}: export it with this version's "
                                "fedmq-aggregator export")
        # Signature: resize an input only when its shape changes (LiteRT on aarch64 crashes resizing
        # the 0-d lr input; see signature.py), and hold inputs between calls
        run = lambda key: Signature(self.interp.get_signature_runner(key))  # noqa: E731
        self._train, self._eval, self._infer = run("train"), run("evaluate"), run("infer")
        self._layout()
        self._synced: dict[int, tuple[int, int]] = {}  # id(signature) -> (weights version, its generation)

    def _layout(self) -> None:
        """Read the state layout from the signatures and refuse what does not fit it (ArtifactError)."""
        try:
            self._check_layout()
        except ArtifactError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as e:  # a hostile or odd flatbuffer
            raise ArtifactError(f"artifact's signatures do not fit the trainer: {type(e).__name__}: {e}") from None

    def _check_layout(self) -> None:
        tin, tout = self._train.get_input_details(), self._train.get_output_details()
        for key in ("x", "y", "mask", "lr"):
            if key not in tin:
                raise ArtifactError(f"artifact's train signature lacks input {key!r}")
        if "loss" not in tout:
            raise ArtifactError("artifact's train signature lacks output 'loss'")
        xin = tin["x"]
        self.batch_size = int(xin["shape"][0])
        self.x_shape = tuple(int(d) for d in xin["shape"][1:])
        state = [n for n in tin if n not in BATCH_INPUTS]
        self.weight_names = sorted(n for n in state if n.startswith("w"))
        if not self.weight_names:
            raise ArtifactError("artifact's train signature takes no weights")
        self.weight_shapes = {n: tuple(int(d) for d in tin[n]["shape"]) for n in self.weight_names}
        self.prox = "mu" in tin  # exported with the FedProx anchor
        self._anchor = sorted(n for n in state if n.startswith("a"))
        self._zeroed = sorted(n for n in state if n[:1] in "mv" or n == "t")  # optimizer state: zeros per round
        self._carried = sorted(n for n in tout if n != "loss")
        known = set(self.weight_names) | set(self._anchor) | set(self._zeroed)
        if set(state) != known or not set(self._carried) <= known \
                or not set(self.weight_names) <= set(self._carried) or len(self._anchor) not in (0, len(self.weight_names)):
            raise ArtifactError(f"artifact's train signature has an unknown state layout (inputs {sorted(tin)[:12]}, "
                                f"outputs {sorted(tout)[:12]})")
        for n in self._carried:
            if tuple(tout[n]["shape"]) != tuple(tin[n]["shape"]) or tout[n]["dtype"] != tin[n]["dtype"]:
                raise ArtifactError(f"artifact's train output {n!r} does not match its input")
        for a, n in zip(self._anchor, self.weight_names):
            if a != "a" + n[1:] or tuple(tin[a]["shape"]) != tuple(tin[n]["shape"]) or tin[a]["dtype"] != tin[n]["dtype"]:
                raise ArtifactError(f"artifact's FedProx anchor {a!r} does not match weight {n!r}")
        if not set(self._zeroed) <= set(self._carried):
            raise ArtifactError("artifact's train signature takes optimizer state it does not return")
        if len(self.x_shape) < 1 or tuple(tin["y"]["shape"]) != (self.batch_size,):
            raise ArtifactError(f"artifact's train batch has shapes x {tuple(xin['shape'])}, y {tuple(tin['y']['shape'])}")
        for key, sig, extra, outs in (("evaluate", self._eval, {"x", "y"}, {"loss_sum", "correct"}),
                                      ("infer", self._infer, {"x"}, {"output"})):
            d = sig.get_input_details()
            if set(d) != extra | set(self.weight_names) or not outs <= set(sig.get_output_details()) or any(
                    tuple(int(x) for x in d[n]["shape"]) != self.weight_shapes[n] or d[n]["dtype"] != tin[n]["dtype"]
                    for n in self.weight_names):
                raise ArtifactError(f"artifact's {key} signature does not take the training weights "
                                    f"(inputs {sorted(d)[:12]})")
        self._dtypes = {n: tin[n]["dtype"] for n in tin}
        self.num_classes = int(self._infer.get_output_details()["output"]["shape"][-1])

    def release(self, keep_weights: bool = False) -> None:
        """Drop the interpreter and its buffers (weights, training temporaries): the process gives
        them back to the OS. The next call loads the artifact again; with ``keep_weights`` the
        current weights are kept as one numpy copy and used then (as by ``set_weights``: the optimizer
        state starts again at zero and the FedProx anchor becomes these weights), else set them first (training or
        evaluating without weights raises ArtifactError: the artifact holds none). The agent calls
        this between training and evaluating (one signature's buffers at a time) and, in
        ``low_memory`` mode, after each round: an idle device holds no model-size buffers."""
        if self.interp is None:
            return
        self._pending = self.get_weights() if keep_weights and self._version else None
        if self._pending is None:
            self._version = 0
        self.interp = self._train = self._eval = self._infer = None

    def _ready(self) -> None:
        if self.interp is None:
            self._load()

    def _need_weights(self) -> None:
        if not self._version:
            raise ArtifactError("set the weights first (the artifact holds none)")
        self._ready()

    def get_weights(self) -> list[np.ndarray]:
        """A copy of the current weights (in ``weight_names`` order)."""
        self._need_weights()
        if self._pending is not None:
            return [w.copy() for w in self._pending]
        return [self._train.held(n) for n in self.weight_names]

    def set_weights(self, weights: Sequence[np.ndarray], copy: bool = True) -> None:
        """Set weights (also resets the local optimizer and sets the FedProx anchor to them).

        They reach a signature's inputs when one first needs them (the first training step, an
        evaluation): until then the trainer holds them, copied unless ``copy=False`` (then the
        caller must leave the arrays unchanged until the next step or evaluation)."""
        if len(weights) != len(self.weight_names):
            raise ArtifactError(f"{len(weights)} weight tensors given, the model has {len(self.weight_names)}")
        held = []
        for n, w in zip(self.weight_names, weights):
            want = self.weight_shapes[n]
            if tuple(np.shape(w)) != want:
                raise ArtifactError(f"weight {n} has shape {np.shape(w)}, the model expects {want}")
            a = np.require(np.asarray(w, dtype=self._dtypes[n]), requirements="C")  # 0-d stays 0-d
            held.append(a.copy() if copy and a is w else a)
        self._pending = held
        self._version += 1

    def _feed_train(self) -> None:
        """Move held weights into the train signature, with the anchor and a fresh optimizer state."""
        held = self._pending
        assert held is not None
        details = self._train.get_input_details()
        feed = dict(zip(self.weight_names, held))
        feed.update({a: feed[n] for a, n in zip(self._anchor, self.weight_names)})
        for n in self._zeroed:  # np.zeros: pages the OS maps on use, not a model-size allocation
            feed[n] = np.zeros(details[n]["shape"], self._dtypes[n])
        self._train._allocate()  # the one allocation, before anything is set
        gen = self._train.generation
        self._train.feed(**feed)  # raises (the weights stay pending) on a dtype or shape the runtime refuses
        if self._train.generation != gen:
            raise ArtifactError("the train signature was allocated again while its state was set")
        self._pending = None

    def prepare(self) -> None:
        """Put the weights set into the train signature now (else the first step does): after this the
        trainer holds no reference to the arrays given to ``set_weights``."""
        self._need_weights()
        if self._pending is not None:
            self._feed_train()

    def step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray, lr: float, mu: float = 0.0) -> float:
        """One optimizer step on a full batch (``x`` of ``batch_size`` rows); returns its loss."""
        self._need_weights()
        gen = self._train.generation
        if self.prox:
            self._train.feed(x=x, y=y, mask=mask, lr=np.float32(lr), mu=np.float32(mu))
        else:
            self._train.feed(x=x, y=y, mask=mask, lr=np.float32(lr))
        if self._pending is not None:
            self._feed_train()
        elif self._train.generation != gen:  # cannot happen with a fixed batch: the state would be lost
            raise ArtifactError("the train signature was allocated again: its batch shape changed")
        self._train.invoke()
        loss = float(self._train.output("loss"))
        self._train.carry(self._carried)
        self._version += 1
        return loss

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int = 1, lr: float = 0.01, mu: float = 0.0,
            seed: int = 0, weights: Sequence[np.ndarray] | None = None) -> FitResult:
        x, y = check_data(x, y, self.x_shape, self.num_classes)
        if mu and not self.prox:
            raise ArtifactError(f"mu = {mu} (FedProx) but the artifact was exported without the proximal term: "
                                "export it with prox (the aggregator does so when [train] mu > 0)")
        if weights is not None:
            self.set_weights(weights, copy=False)  # consumed by the first step, which fit makes now
        self._need_weights()
        n, b = x.shape[0], self.batch_size
        rng = np.random.default_rng(seed)
        xb = np.zeros((b, *self.x_shape), np.float32)
        yb = np.zeros(b, np.int32)
        mask = np.zeros(b, np.float32)
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
                total += self.step(xb, yb, mask, lr, mu)
                steps += 1
        return FitResult(self.get_weights(), int(n), total / steps if steps else float("nan"), steps,
                         time.perf_counter() - t0)

    def _run(self, key: str, **inputs: np.ndarray) -> Signature:
        """Feed ``inputs`` to signature ``key`` with the current weights (copied in when they changed,
        or when a new input shape made it allocate again), and invoke it."""
        self._need_weights()
        sig = self._eval if key == "evaluate" else self._infer
        sig.feed(**inputs)
        if self._synced.get(id(sig)) != (self._version, sig.generation):
            if self._pending is not None:
                sig.feed(**dict(zip(self.weight_names, self._pending)))
            else:
                sig.copy_inputs(self._train, self.weight_names)
            self._synced[id(sig)] = (self._version, sig.generation)
        sig.invoke()
        return sig

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) on ``x, y``, in batches of the training batch size by default
        (the interpreter's arena grows with the largest batch it has seen: 256 CNN examples
        would cost the device ~90 MB)."""
        batch = batch or self.batch_size
        self._ready()
        x, y = check_data(x, y, self.x_shape, self.num_classes)
        loss = correct = 0.0
        for s in range(0, x.shape[0], batch):
            sig = self._run("evaluate", x=x[s : s + batch], y=y[s : s + batch])
            loss += float(sig.output("loss_sum"))
            correct += float(sig.output("correct"))
        n = max(x.shape[0], 1)
        return loss / n, correct / n

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._run("infer", x=x).output("output")
