"""The same trainer interface for gateways that have TensorFlow: runs the exported module's own
``train`` function (not converted), so it computes what the TFLite artifact computes.
TensorFlow is imported only when this class is used.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from fedmq.edge_agent.trainer import FitResult, check_data


class KerasTrainer:
    def __init__(self, model, batch_size: int = 32, optimizer: str = "sgd", prox: bool = True) -> None:
        from fedmq.aggregator.export.trainable import TrainableModule, TrainSpec

        self.module = TrainableModule(model, TrainSpec(batch_size=batch_size, optimizer=optimizer, prox=prox))
        self.prox = prox
        self.batch_size = batch_size
        self.x_shape = self.module.x_shape
        self.num_classes = self.module.num_classes
        self.runtime = "tensorflow (keras trainer)"

    def get_weights(self) -> list[np.ndarray]:
        return self.module.weights_numpy()

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        import tensorflow as tf

        self.module.set_weights(*[tf.constant(np.asarray(w, np.float32)) for w in weights])

    def fit(self, x, y, epochs: int = 1, lr: float = 0.01, mu: float = 0.0, seed: int = 0,
            weights: Sequence[np.ndarray] | None = None) -> FitResult:
        x, y = check_data(x, y, self.x_shape, self.num_classes)
        if mu and not self.prox:
            raise ValueError(f"mu = {mu}: this trainer was built without the FedProx term (prox=False)")
        if weights is not None:
            self.set_weights(weights)
        n, b = x.shape[0], self.batch_size
        extra = (np.float32(mu),) if self.prox else ()
        rng = np.random.default_rng(seed)
        total, steps, t0 = 0.0, 0, time.perf_counter()
        for _ in range(epochs):
            order = rng.permutation(n)
            for s in range(0, n, b):
                idx = order[s : s + b]
                k = idx.size
                xb = np.zeros((b, *self.x_shape), np.float32)
                yb = np.zeros(b, np.int32)
                mask = np.zeros(b, np.float32)
                xb[:k], yb[:k], mask[:k] = x[idx], y[idx], 1.0
                total += float(self.module.train(xb, yb, mask, np.float32(lr), *extra)["loss"])
                steps += 1
        return FitResult(self.get_weights(), int(n), total / steps if steps else float("nan"), steps,
                         time.perf_counter() - t0)

    def evaluate(self, x, y, batch: int = 64) -> tuple[float, float]:
        x, y = check_data(x, y, self.x_shape, self.num_classes)
        loss = correct = 0.0
        for s in range(0, x.shape[0], batch):
            out = self.module.evaluate(x[s : s + batch], y[s : s + batch])
            loss += float(out["loss_sum"])
            correct += float(out["correct"])
        n = max(x.shape[0], 1)
        return loss / n, correct / n
