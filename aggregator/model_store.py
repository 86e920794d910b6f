"""The model artifact the aggregator serves: exported once (TensorFlow), then cached on disk.

The cache key covers the model source and export settings, so a restart with the same config
loads the same artifact (same model id) without importing TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.broker.contract.messages import ARTIFACT_FORMAT, ModelManifest, TensorSpec

from .config import ModelSection
from .state import atomic_write

log = logging.getLogger(__name__)
FORMAT = ARTIFACT_FORMAT


@dataclass
class ServedModel:
    artifact: bytes
    model_id: str
    names: list[str]
    weights: list[TensorSpec]
    inputs: list[TensorSpec]
    batch_size: int
    initial: list[np.ndarray]

    def manifest(self, run: str = "") -> ModelManifest:
        return ModelManifest(self.model_id, self.artifact, self.weights, self.inputs, self.batch_size, time.time(),
                             {}, FORMAT, run=run)

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {w.name: a for w, a in zip(self.weights, self.initial)}


def cache_key(cfg: ModelSection, prox: bool = False) -> str:
    raw = json.dumps([cfg.source, cfg.batch_size, cfg.optimizer, cfg.seed, FORMAT] + (["prox"] if prox else []))
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def load_or_export(cfg: ModelSection, cache_dir: Path, prox: bool = False) -> ServedModel:
    """The verified artifact for ``cfg``, from the cache or exported now.

    ``prox``: include the FedProx anchor (the round config has mu > 0); without it the device
    holds one model-size buffer less.
    """
    d = cache_dir / cache_key(cfg, prox)
    if (d / "meta.json").is_file():
        meta = json.loads((d / "meta.json").read_text())
        artifact = (d / "model.tflite").read_bytes()
        if hashlib.sha256(artifact).hexdigest() == meta["model_id"]:
            with np.load(d / "initial.npz") as z:
                initial = [z[f"w{i}"] for i in range(len(meta["weights"]))]
            log.info("model %s loaded from cache %s", meta["model_id"][:12], d)
            return ServedModel(artifact, meta["model_id"], meta["names"],
                               [TensorSpec(w["name"], tuple(w["shape"]), w["dtype"]) for w in meta["weights"]],
                               [TensorSpec(w["name"], tuple(w["shape"]), w["dtype"]) for w in meta["inputs"]],
                               meta["batch_size"], initial)
        log.warning("cached artifact in %s fails its hash check: exporting again", d)
    import keras  # TensorFlow only when an export is needed

    from .export.convert import export_model, load_model_fn
    from .export.trainable import TrainSpec

    keras.utils.set_random_seed(cfg.seed)
    ex = export_model(load_model_fn(cfg.source)(), TrainSpec(batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                                                                 prox=prox),
                      verify_steps=cfg.verify_steps)
    buf = io.BytesIO()
    np.savez(buf, **{f"w{i}": w for i, w in enumerate(ex.initial_weights)})
    atomic_write(d / "initial.npz", buf.getvalue())
    atomic_write(d / "model.tflite", ex.artifact)
    meta = {"model_id": ex.model_id, "names": ex.names, "batch_size": cfg.batch_size, "source": cfg.source,
            "weights": [w.to_wire() for w in ex.weights], "inputs": [i.to_wire() for i in ex.inputs],
            "verification": ex.verification}
    atomic_write(d / "meta.json", json.dumps(meta, indent=1).encode())
    log.info("model %s exported and verified (%s)", ex.model_id[:12], ex.verification)
    return ServedModel(ex.artifact, ex.model_id, ex.names, ex.weights, ex.inputs, cfg.batch_size, ex.initial_weights)


def export_final(cfg: ModelSection, served: ServedModel, weights: dict[str, np.ndarray], out: Path) -> list[Path]:
    """Write the final global model as .keras and as an inference .tflite (softmax output)."""
    import keras  # noqa: F401 - ImportError here (no TensorFlow) makes the service skip the final export
    import tensorflow as tf  # noqa: F401

    from .export.convert import load_model_fn

    model = load_model_fn(cfg.source)()
    for var, spec in zip(model.trainable_variables, served.weights):
        var.assign(weights[spec.name])
    out.mkdir(parents=True, exist_ok=True)
    kpath, tpath = out / "model.keras", out / "model.tflite"
    from .export.plain import inference_tflite, to_plain_keras

    plain = to_plain_keras(model)  # stock Keras layers only: loads with keras.models.load_model, no fedmq
    plain.save(kpath)
    atomic_write(tpath, inference_tflite(plain))  # serving_default(x) -> {output}: softmax (docs/models.md)
    return [kpath, tpath]
