"""On-device inference with the latest verified global model (no TensorFlow).

The agent keeps two files in its ``cache_dir``: ``models/<model_id>.tflite`` (the trainable
artifact; its SHA-256 is its id) and ``global.msgpack`` (the encoded ``GlobalModel`` message it
last accepted: run, round, model id, weights). ``LocalModel`` loads the artifact in the same
interpreter the agent trains with (:class:`~fedmq.edge_agent.trainer.TFLiteTrainer`), sets the
global weights and runs the artifact's ``infer`` signature (softmax probabilities)::

    from fedmq.edge_agent import LocalModel

    model = LocalModel.open("/var/lib/fedmq")
    pred = model.predict(x)          # x: (n, *model.x_shape) float32, any n
    pred.labels, pred.probabilities  # (n,) int, (n, num_classes) float32
    model.refresh()                  # True when a newer global was loaded (cheap when it was not)

Inputs go through the interpreter in batches of the training batch size (the last one padded
with zeros and cut off): the interpreter's tensors are allocated once and never resized, so a
long-lived process (``fedmq-agent predict --serve``) holds the memory of one batch, whatever
the request size. ``refresh`` stats ``global.msgpack`` and reads it only when its inode, size or
mtime changed (the agent replaces it atomically), so a server can call it before every request.

Every byte of ``global.msgpack`` is treated as untrusted (it came from the broker): it is decoded
with the wire limits and checked by :meth:`LocalModel._verify` — the one place where a global
is accepted for inference (model id, tensor names, shapes, float dtype, finite values) — before
any weight reaches the interpreter. A refused global never replaces the weights being served.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmq.broker.contract import codec
from fedmq.broker.contract.codec import DEFAULT_LIMITS
from fedmq.broker.contract.messages import GlobalModel
from fedmq.broker.errors import FedmqError

from .trainer import ArtifactError, DataError, TFLiteTrainer

log = logging.getLogger(__name__)
GLOBAL_FILE = "global.msgpack"
MODELS_DIR = "models"


class ModelNotReady(FedmqError):
    """There is no verified global model to predict with yet (the agent has not received one)."""


class GlobalRefused(FedmqError):
    """``global.msgpack`` cannot be used with the cached artifact (wrong model, names, shapes...)."""


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray  # (n,) int64: argmax of the probabilities
    probabilities: np.ndarray  # (n, num_classes) float32 (the model's softmax)
    run: str
    round: int  # the global model's round
    model_id: str


@dataclass(frozen=True)
class _Stamp:
    """What identifies one version of ``global.msgpack`` on disk (atomic replace: a new inode)."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "_Stamp":
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


class LocalModel:
    """The latest verified global model of an agent's ``cache_dir``, ready to predict.

    One interpreter: use it from one thread at a time (``fedmq-agent predict --serve`` holds a lock).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], runtime: str | None = None, num_threads: int | None = None,
                 xnnpack: bool | None = None, trusted_keys: list[str] | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        #: the fleet's public keys ([agent] trusted_keys): the stored global must be signed by one of them
        self._trust = None
        if trusted_keys:
            from fedmq.broker.contract.signing import TrustedKeys

            self._trust = TrustedKeys.parse(trusted_keys)
        self._runtime, self._num_threads, self._xnnpack = runtime, num_threads, xnnpack
        self._trainer: TFLiteTrainer | None = None
        self._global: GlobalModel | None = None  # metadata of the weights loaded (tensors dropped)
        self._stamp: _Stamp | None = None
        self._refused: tuple[_Stamp, FedmqError] | None = None

    @classmethod
    def open(cls, cache_dir: str | os.PathLike[str], runtime: str | None = None, num_threads: int | None = None,
             xnnpack: bool | None = None, trusted_keys: list[str] | None = None) -> "LocalModel":
        """Load the global model of ``cache_dir``; :class:`ModelNotReady` / :class:`GlobalRefused` if none fits.

        With ``trusted_keys`` (the agent's ``[agent] trusted_keys``) the stored global must carry the
        fleet's signature, checked before its body is decoded.
        """
        m = cls(cache_dir, runtime, num_threads, xnnpack, trusted_keys)
        m.refresh()
        return m

    # -- what is loaded ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._trainer is not None and self._global is not None

    def _need(self) -> tuple[TFLiteTrainer, GlobalModel]:
        if self._trainer is None or self._global is None:
            raise ModelNotReady(f"no global model loaded from {self.cache_dir}: call refresh() (or LocalModel.open)")
        return self._trainer, self._global

    @property
    def round(self) -> int:
        return self._need()[1].round

    @property
    def run(self) -> str:
        return self._need()[1].run

    @property
    def model_id(self) -> str:
        return self._need()[1].model_id

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self._need()[0].x_shape

    @property
    def num_classes(self) -> int:
        return self._need()[0].num_classes

    @property
    def batch_size(self) -> int:
        return self._need()[0].batch_size

    @property
    def runtime(self) -> str:
        return self._need()[0].runtime

    def info(self) -> dict:
        """What is being served, as plain JSON-able values."""
        t, g = self._need()
        return {"run": g.run, "round": g.round, "model_id": g.model_id, "x_shape": list(t.x_shape),
                "num_classes": t.num_classes, "batch_size": t.batch_size, "runtime": t.runtime}

    # -- loading -----------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Load ``global.msgpack`` if it changed since the last call; True when new weights were loaded.

        Unchanged file: one ``stat``, nothing read. A new file that is refused raises
        :class:`GlobalRefused` (again on every call until the file changes, without re-reading it)
        and the weights loaded before stay in place.
        """
        path = self.cache_dir / GLOBAL_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            if self.ready:
                return False  # the agent is replacing it, or it was removed: keep serving what we have
            raise ModelNotReady(f"no global model in {self.cache_dir} yet ({GLOBAL_FILE} missing): the agent writes "
                                "it when it accepts one (run `fedmq-agent run`; set [agent] follow_global = true to "
                                "keep it current between rounds it is not asked to train)") from None
        except OSError as e:
            raise ModelNotReady(f"cannot read {path}: {e.strerror or e}") from None
        stamp = _Stamp.of(st)
        if stamp == self._stamp:
            return False
        if self._refused is not None and self._refused[0] == stamp:
            raise self._refused[1]
        if st.st_size > DEFAULT_LIMITS.max_payload_bytes:  # not even read: the wire would not carry it
            err = GlobalRefused(f"{path} holds {st.st_size} bytes, more than a global may ({DEFAULT_LIMITS.max_payload_bytes})")
            self._refused = (stamp, err)
            raise err
        try:
            with open(path, "rb") as f:
                stamp = _Stamp.of(os.fstat(f.fileno()))  # the version we actually read
                payload = f.read()
        except OSError as e:
            raise ModelNotReady(f"cannot read {path}: {e.strerror or e}") from None
        try:
            changed = self._load(payload)
        except GlobalRefused as e:
            self._refused = (stamp, e)
            raise
        self._stamp, self._refused = stamp, None
        return changed

    def _load(self, payload: bytes) -> bool:
        try:
            g = self._unsigned(payload)
        except (FedmqError, ValueError) as e:  # the codec raises DecodeError; anything else it lets through
            raise GlobalRefused(f"{GLOBAL_FILE} in {self.cache_dir} is not a valid global model: {e}") from None
        assert isinstance(g, GlobalModel)
        old = self._global
        if old is not None and (old.run, old.round, old.model_id) == (g.run, g.round, g.model_id):
            return False  # rewritten, same global (the agent restarted)
        trainer = self._trainer if self._trainer is not None and self._trainer.model_id == g.model_id \
            else self._open_artifact(g)
        self._verify(payload, g, trainer)
        trainer.set_weights([g.tensors[n] for n in trainer.weight_names], copy=False)  # g is dropped below
        self._trainer = trainer
        # keep only the metadata: the trainer holds the weights (these arrays, views into the payload) until the
        # inference signature takes its own copy of them at the first prediction
        self._global = GlobalModel(g.round, g.model_id, {}, g.created, g.run)
        log.info("global model of run %s round %d loaded (model %s, %s)", g.run, g.round, g.model_id[:12],
                 trainer.runtime)
        return True

    def _open_artifact(self, g: GlobalModel) -> TFLiteTrainer:
        path = self.cache_dir / MODELS_DIR / f"{g.model_id}.tflite"
        try:
            artifact = path.read_bytes()
        except FileNotFoundError:
            have = sorted(p.stem[:12] for p in (self.cache_dir / MODELS_DIR).glob("*.tflite"))
            raise GlobalRefused(f"the global model of round {g.round} is for model {g.model_id[:12]}, whose artifact "
                                f"is not in {path.parent} (cached: {', '.join(have) or 'none'}); the agent fetches it "
                                "with the next model announcement") from None
        except OSError as e:
            raise ModelNotReady(f"cannot read {path}: {e.strerror or e}") from None
        try:  # the artifact's SHA-256 must equal the global's model id
            return TFLiteTrainer(artifact, g.model_id, self._runtime, self._num_threads, self._xnnpack)
        except ArtifactError as e:
            raise GlobalRefused(f"cached artifact {path.name} refused: {e}") from None

    def _unsigned(self, payload: bytes) -> GlobalModel:
        """The global inside ``payload``: its signature verified first when trusted keys are set."""
        from fedmq.broker.contract.messages import Signed

        m = codec.decode(payload)
        signed = isinstance(m, Signed)
        if isinstance(m, Signed):
            if self._trust is not None:
                self._trust.verify("global", m.key_id, m.sig, m.body)
            m = codec.decode(m.body, expect=GlobalModel)
        if not isinstance(m, GlobalModel):
            raise GlobalRefused(f"{GLOBAL_FILE} in {self.cache_dir} holds a {m.KIND} message, not a global")
        if self._trust is not None and not signed:
            self._proven_by_delta(m)  # reconstructed from a compressed delta: its signed delta proves it
        return m

    def _proven_by_delta(self, g: GlobalModel) -> None:
        """An unsigned global is accepted only with ``global.proof``: the fleet-signed delta that made it."""
        from fedmq.broker.contract.downlink import weights_digest
        from fedmq.broker.contract.messages import GlobalDelta, Signed

        proof = self.cache_dir / "global.proof"
        try:
            env = codec.decode(proof.read_bytes())
        except OSError:
            raise GlobalRefused(f"{GLOBAL_FILE} in {self.cache_dir} is not signed, and this agent trusts only "
                                "globals signed with the fleet's key") from None
        if not isinstance(env, Signed):
            raise GlobalRefused(f"{proof} is not signed")
        self._trust.verify("delta", env.key_id, env.sig, env.body)  # type: ignore[union-attr]
        d = codec.decode(env.body, expect=GlobalDelta)
        if not isinstance(d, GlobalDelta) or (d.run, d.round, d.model_id) != (g.run, g.round, g.model_id) \
                or weights_digest(g.tensors) != bytes(d.result_sha256):
            raise GlobalRefused(f"{GLOBAL_FILE} in {self.cache_dir} is not the global its signed delta made")

    @staticmethod
    def _verify(payload: bytes, g: GlobalModel, trainer: TFLiteTrainer) -> None:
        """The one place a global is accepted for inference: GlobalRefused unless it fits the artifact.

        ``payload`` (the bytes as stored) was signature-checked by ``_unsigned`` when trusted keys are set.
        """
        if g.model_id != trainer.model_id:
            raise GlobalRefused(f"global of round {g.round} is for model {g.model_id[:12]}, the artifact is "
                                f"{trainer.model_id[:12]}")
        names = set(trainer.weight_names)
        if set(g.tensors) != names:
            missing, extra = sorted(names - set(g.tensors)), sorted(set(g.tensors) - names)
            raise GlobalRefused(f"global of round {g.round} does not fit model {g.model_id[:12]}: missing tensors "
                                f"{missing[:3]}, unexpected {extra[:3]}")
        want = trainer.weight_shapes
        for n in trainer.weight_names:
            t = g.tensors[n]
            if tuple(t.shape) != want[n]:
                raise GlobalRefused(f"global of round {g.round}: tensor {n!r} has shape {tuple(t.shape)}, the model "
                                    f"expects {want[n]}")
            if t.dtype.kind != "f":
                raise GlobalRefused(f"global of round {g.round}: tensor {n!r} is {t.dtype}, not floating point")
            if not np.all(np.isfinite(t)):
                raise GlobalRefused(f"global of round {g.round}: tensor {n!r} holds NaN or Inf")

    # -- predicting --------------------------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a contiguous float32 (n, *x_shape) batch; one example of shape x_shape is a batch of 1."""
        t, _ = self._need()
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise DataError(f"inputs must be numeric, got {x.dtype}")
        if tuple(x.shape) == t.x_shape:
            x = x[None]
        if x.ndim != len(t.x_shape) + 1 or tuple(x.shape[1:]) != t.x_shape:
            raise DataError(f"inputs have shape {tuple(x.shape)}, the model expects (n, {', '.join(map(str, t.x_shape))})")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError("inputs contain NaN or Inf")
        return x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (n, num_classes), float32, through the fixed-size batch (last one padded)."""
        t, _ = self._need()
        x = self.check_input(x)
        n, b = x.shape[0], t.batch_size
        out = np.empty((n, t.num_classes), np.float32)
        xb = np.zeros((b, *t.x_shape), np.float32)
        for s in range(0, n, b):
            k = min(b, n - s)
            xb[:k] = x[s : s + k]
            if k < b:
                xb[k:] = 0.0  # padding rows: computed, then dropped
            out[s : s + k] = t.predict(xb)[:k]
        return out

    def predict(self, x: np.ndarray) -> Prediction:
        """Labels (argmax) and probabilities for ``x``, with the global model's run, round and id."""
        _, g = self._need()
        p = self.predict_proba(x)
        return Prediction(np.argmax(p, axis=1).astype(np.int64), p, g.run, g.round, g.model_id)
