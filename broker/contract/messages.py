"""Typed messages of protocol version 1 and their field-level validation.

Every payload is a msgpack map ``{"v": 1, "kind": <kind>, ...fields}``; all metadata lives in the
payload so the protocol works on MQTT 3.1.1. The field tables are documented in docs/protocol.md.
``to_wire`` builds the map (tensor data as zero-copy views); ``from_wire`` validates a decoded map
and raises DecodeError with a reason for anything wrong. Encoding and framing live in
fedmq.broker.contract.codec.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from fedmq.broker.contract.tensors import ENCODINGS, Compression, decode_tensor, encode_tensor
from fedmq.broker.contract.topics import NAME_RE
from fedmq.broker.errors import DecodeError

SCHEMA_VERSION = 1
HEX_ID_RE = re.compile(r"[0-9a-f]{8,64}\Z")  # ASCII only; \Z: no trailing newline
ARTIFACT_FORMAT = "tflite-trainable-v2"  # the one name of the model artifact format
STATES = ("online", "idle", "training", "error", "offline")  # error: cannot train (``error`` says why)
SERVICE_STATES = ("online", "offline", "done")  # the aggregator's own status (``done``: the run ended)


def req_run(m: Mapping[str, Any], kind: str) -> str:
    """The run id every message of a run carries (8-64 lowercase hex; new with every fresh state_dir)."""
    return req_str(m, "run", kind, HEX_ID_RE)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds for decoding untrusted payloads (checked before anything is allocated)."""

    max_payload_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 1024
    max_elements: int = 64 * 1024 * 1024  # per message, all tensors together
    max_metrics: int = 64
    max_agents: int = 100_000
    max_depth: int = 8
    max_str: int = 4096
    max_container: int = 200_000
    max_samples: int = 1_000_000_000  # num_samples above this is implausible: ``bad_samples``
    max_containers: int = 4096  # maps + arrays per payload (bounds the Python objects a payload makes)
    max_topk_expansion: int = 1000  # a topk tensor's size <= this x its entries (topk_fraction >= 0.001)


# -- field helpers -----------------------------------------------------------------------------
def _as_map(m: Any, kind: str) -> Mapping[str, Any]:
    if not isinstance(m, dict):  # decoded maps are dicts (typing.Mapping checks cost 20x)
        raise DecodeError(f"{kind}: message must be a map", reason="schema")
    return m


def _get(m: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in m:
        raise DecodeError(f"{kind}: missing field {key!r}", reason="schema")
    return m[key]


def req_int(m: Mapping[str, Any], key: str, kind: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = _get(m, key, kind)
    if type(v) is not int or not (lo <= v <= hi):
        raise DecodeError(f"{kind}: field {key!r} must be an int in [{lo}, {hi}], got {v!r:.40}", reason="schema")
    return v


def req_float(m: Mapping[str, Any], key: str, kind: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    v = _get(m, key, kind)
    if type(v) is int and -(2**64) < v < 2**64:
        v = float(v)
    if type(v) is not float or not math.isfinite(v) or not (lo <= v <= hi):
        raise DecodeError(f"{kind}: field {key!r} must be a finite number in [{lo}, {hi}]", reason="schema")
    return float(v)


def req_str(m: Mapping[str, Any], key: str, kind: str, pattern: re.Pattern[str] | None = None,
            max_len: int = 256) -> str:
    v = _get(m, key, kind)
    if type(v) is not str or len(v) > max_len or (pattern is not None and not pattern.match(v)):
        raise DecodeError(f"{kind}: field {key!r} has an invalid value {v!r:.60}", reason="schema")
    return v


MAX_ERROR_LEN = 500  # a status's ``error`` text


def opt_str(m: Mapping[str, Any], key: str, kind: str, max_len: int = 256) -> str:
    """An optional string field: "" when absent; present, it must be a string of at most max_len."""
    if key not in m:
        return ""
    return req_str(m, key, kind, max_len=max_len)


def req_bin(m: Mapping[str, Any], key: str, kind: str) -> memoryview:
    v = _get(m, key, kind)
    if type(v) not in (bytes, memoryview):
        raise DecodeError(f"{kind}: field {key!r} must be bin", reason="schema")
    return memoryview(v)


def metrics_map(v: Any, kind: str, limits: DecodeLimits, key: str = "metrics") -> dict[str, float]:
    if not isinstance(v, dict) or len(v) > limits.max_metrics:
        raise DecodeError(f"{kind}: {key!r} must be a map of at most {limits.max_metrics} entries", reason="schema")
    out: dict[str, float] = {}
    for k, x in v.items():
        if type(k) is not str or len(k) > 64:
            raise DecodeError(f"{kind}: {key!r} keys must be short strings", reason="schema")
        if type(x) not in (int, float) or (type(x) is int and not -(2**64) < x < 2**64):
            raise DecodeError(f"{kind}: {key}[{k!r}] must be a number", reason="schema")
        out[k] = float(x)  # non-finite values are kept: strategies decide (and report) what to do
    return out


def tensors_from_wire(v: Any, kind: str, limits: DecodeLimits) -> dict[str, np.ndarray]:
    if not isinstance(v, list) or len(v) > limits.max_tensors:
        raise DecodeError(f"{kind}: 'tensors' must be a list of at most {limits.max_tensors}", reason="schema")
    out: dict[str, np.ndarray] = {}
    budget = limits.max_elements
    for t in v:
        name, arr = decode_tensor(t, budget, limits.max_topk_expansion)
        if name in out:
            raise DecodeError(f"{kind}: duplicate tensor name {name!r}", reason="schema")
        budget -= arr.size
        out[name] = arr
    return out


def tensors_to_wire(tensors: Mapping[str, np.ndarray], compression: Compression | None = None) -> list[dict]:
    return [encode_tensor(n, a, compression) for n, a in tensors.items()]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor (weights or model inputs)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_wire(cls, m: Any, kind: str) -> "TensorSpec":
        if not isinstance(m, dict):  # decoded maps are dicts (typing.Mapping checks cost 20x)
            raise DecodeError(f"{kind}: tensor spec must be a map", reason="schema")
        shape = _get(m, "shape", kind)
        if type(shape) is not list or len(shape) > 8 or any(type(d) is not int or not 0 <= d < 2**31 for d in shape):
            raise DecodeError(f"{kind}: tensor spec shape must be a list of at most 8 ints in [0, 2**31)",
                              reason="schema")
        return cls(req_str(m, "name", kind), tuple(shape), req_str(m, "dtype", kind, max_len=16))


# -- messages ----------------------------------------------------------------------------------
class Message:
    """Base of the protocol's messages; ``KIND`` is the value of the ``kind`` field."""

    KIND: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "Message":  # pragma: no cover
        raise NotImplementedError


@dataclass
class TrainConfig:
    """Local training settings an announcement hands to agents."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    mu: float = 0.0  # FedProx proximal coefficient; 0 disables it
    compression: Compression = field(default_factory=Compression)
    seed: int = 0
    #: agents spread their uploads uniformly over this many seconds after training (0 = at once)
    upload_window_s: float = 0.0
    #: how the aggregator publishes each new global besides the full keyframe: "raw" (keyframe only),
    #: or a ``global_delta`` from the previous global in "f16" / "int8" (agents holding it fetch only that)
    downlink: str = "raw"

    def to_wire(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "mu": self.mu,
                "encoding": self.compression.encoding, "topk_fraction": self.compression.topk_fraction,
                "seed": self.seed, "upload_window_s": self.upload_window_s, "downlink": self.downlink}

    @classmethod
    def from_wire(cls, m: Any, kind: str) -> "TrainConfig":
        if not isinstance(m, dict):  # decoded maps are dicts (typing.Mapping checks cost 20x)
            raise DecodeError(f"{kind}: 'config' must be a map", reason="schema")
        enc = _get(m, "encoding", kind)
        if type(enc) is not str or enc not in ENCODINGS:
            raise DecodeError(f"{kind}: unknown encoding {enc!r}", reason="schema")
        return cls(
            epochs=req_int(m, "epochs", kind, 0, 10_000),
            batch_size=req_int(m, "batch_size", kind, 1, 1 << 20),
            lr=req_float(m, "lr", kind, 0.0, 1e6),
            mu=req_float(m, "mu", kind, 0.0, 1e6),
            compression=Compression(enc, req_float(m, "topk_fraction", kind, 1e-9, 1.0)),
            seed=req_int(m, "seed", kind, 0, 2**32 - 1),
            upload_window_s=req_float(m, "upload_window_s", kind, 0.0, 86_400.0) if "upload_window_s" in m else 0.0,
            downlink=_downlink(m, kind),
        )


@dataclass
class ModelManifest(Message):
    """The model artifact (trainable .tflite) and what an agent needs to use it without model code."""

    KIND: ClassVar[str] = "model"
    model_id: str  # sha256 hex of ``artifact``
    artifact: bytes | memoryview
    weights: list[TensorSpec]
    inputs: list[TensorSpec]  # x then y of the train signature (fixed batch)
    train_batch_size: int
    created: float
    extra: dict[str, float] = field(default_factory=dict)  # default hyperparameters etc.
    format: str = ARTIFACT_FORMAT
    run: str = ""  # the run that serves this model (required on the wire)

    def to_wire(self) -> dict[str, Any]:
        return {"run": self.run, "model_id": self.model_id, "format": self.format, "artifact": self.artifact,
                "weights": [w.to_wire() for w in self.weights], "inputs": [i.to_wire() for i in self.inputs],
                "train_batch_size": self.train_batch_size, "created": self.created, "extra": self.extra}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "ModelManifest":
        k = cls.KIND
        m = _as_map(m, k)
        weights = _get(m, "weights", k)
        inputs = _get(m, "inputs", k)
        if type(weights) is not list or len(weights) > limits.max_tensors:
            raise DecodeError(f"{k}: 'weights' must be a list", reason="schema")
        if type(inputs) is not list or len(inputs) > 16:
            raise DecodeError(f"{k}: 'inputs' must be a list", reason="schema")
        return cls(
            model_id=req_str(m, "model_id", k, HEX_ID_RE),
            artifact=req_bin(m, "artifact", k),
            weights=[TensorSpec.from_wire(w, k) for w in weights],
            inputs=[TensorSpec.from_wire(w, k) for w in inputs],
            train_batch_size=req_int(m, "train_batch_size", k, 1, 1 << 20),
            created=req_float(m, "created", k),
            extra=metrics_map(_get(m, "extra", k), k, limits, "extra"),
            format=req_str(m, "format", k, max_len=64),
            run=req_run(m, k),
        )


@dataclass
class GlobalModel(Message):
    """The global weights after round ``round`` (0 = initial weights)."""

    KIND: ClassVar[str] = "global"
    round: int
    model_id: str
    tensors: dict[str, np.ndarray]
    created: float
    run: str = ""  # required on the wire; rounds are ordered within a run only

    def to_wire(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "model_id": self.model_id, "created": self.created,
                "tensors": tensors_to_wire(self.tensors)}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "GlobalModel":
        k = cls.KIND
        m = _as_map(m, k)
        return cls(req_int(m, "round", k), req_str(m, "model_id", k, HEX_ID_RE),
                   tensors_from_wire(_get(m, "tensors", k), k, limits), req_float(m, "created", k), req_run(m, k))


def sampled(seed: int, round_no: int, agent: str, fraction: float) -> bool:
    """The seeded hash rule of ``select = "fraction"``: is ``agent`` asked in ``round_no``?

    ``int.from_bytes(sha256(f"{seed}/{round_no}/{agent}")[:8], "big") / 2**64 < fraction``: every
    agent evaluates it for itself, so the announcement's size does not grow with the fleet.
    """
    h = hashlib.sha256(f"{seed}/{round_no}/{agent}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


@dataclass(frozen=True)
class Sample:
    """``select = "fraction"`` on the wire: agents for which ``sampled(seed, round, id, fraction)`` holds."""

    seed: int
    fraction: float

    def to_wire(self) -> dict[str, Any]:
        return {"seed": self.seed, "fraction": self.fraction}

    @classmethod
    def from_wire(cls, m: Any, kind: str) -> "Sample":
        if not isinstance(m, dict):  # decoded maps are dicts (typing.Mapping checks cost 20x)
            raise DecodeError(f"{kind}: 'sample' must be null or a map", reason="schema")
        return cls(req_int(m, "seed", kind, 0, 2**63 - 1), req_float(m, "fraction", kind, 0.0, 1.0))


DOWNLINKS = ("raw", "f16", "int8")


def _downlink(m: Mapping[str, Any], kind: str) -> str:
    v = m.get("downlink", "raw")
    if type(v) is not str or v not in DOWNLINKS:
        raise DecodeError(f"{kind}: downlink must be one of {DOWNLINKS}", reason="schema")
    return v


@dataclass
class GlobalDelta(Message):
    """The global of ``round`` as a compressed delta from the global of ``base_round`` (topic ``delta``).

    ``tensors`` (f16 or int8) decode to ``d``; the global is ``base + d`` in float32, elementwise (what
    the aggregator itself uses as the global: the reconstruction is exact on every device).
    ``result_sha256`` is fedmq.broker.contract.downlink.weights_digest of that global: a device checks
    its reconstruction against it.
    """

    KIND: ClassVar[str] = "global_delta"
    run: str
    round: int
    base_round: int
    model_id: str
    created: float
    result_sha256: bytes | memoryview
    tensors: dict[str, np.ndarray]
    compression: Compression = field(default_factory=lambda: Compression("int8"))

    def to_wire(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "base_round": self.base_round, "model_id": self.model_id,
                "created": self.created, "result_sha256": self.result_sha256,
                "tensors": tensors_to_wire(self.tensors, self.compression)}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "GlobalDelta":
        k = cls.KIND
        m = _as_map(m, k)
        rnd = req_int(m, "round", k, 1)
        digest = req_bin(m, "result_sha256", k)
        if digest.nbytes != 32:
            raise DecodeError(f"{k}: result_sha256 must be 32 bytes", reason="schema")
        return cls(req_run(m, k), rnd, req_int(m, "base_round", k, 0, rnd - 1), req_str(m, "model_id", k, HEX_ID_RE),
                   req_float(m, "created", k), digest, tensors_from_wire(_get(m, "tensors", k), k, limits))


@dataclass
class RoundAnnouncement(Message):
    """Opens round ``round`` (retained). Who is asked: ``agents`` (a list) if given, else ``sample``
    (the hash rule) if given, else every agent that was online when the round opened."""

    KIND: ClassVar[str] = "round"
    round: int
    model_id: str
    base_round: int  # the global model's round the deltas must be computed against
    opened: float
    deadline: float  # unix time
    config: TrainConfig
    agents: list[str] | None = None
    quorum: int = 1
    run: str = ""  # required on the wire
    sample: Sample | None = None  # the hash rule of select = "fraction" (optional on the wire)
    #: agents the rule would ask that the aggregator excluded (refused updates, a reported error);
    #: optional on the wire, only with ``agents`` = null
    excluded: list[str] | None = None

    def to_wire(self) -> dict[str, Any]:
        d = {"run": self.run, "round": self.round, "model_id": self.model_id, "base_round": self.base_round,
             "opened": self.opened, "deadline": self.deadline, "config": self.config.to_wire(),
             "agents": self.agents, "quorum": self.quorum,
             "sample": None if self.sample is None else self.sample.to_wire()}
        if self.excluded:
            d["excluded"] = self.excluded
        return d

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "RoundAnnouncement":
        k = cls.KIND
        m = _as_map(m, k)
        agents = _get(m, "agents", k)
        if agents is not None:
            if type(agents) is not list or len(agents) > limits.max_agents or not all(
                type(a) is str and NAME_RE.match(a) for a in agents
            ):
                raise DecodeError(f"{k}: 'agents' must be null or a list of agent ids", reason="schema")
        excluded = m.get("excluded")
        if excluded is not None and (type(excluded) is not list or len(excluded) > limits.max_agents or not all(
                type(a) is str and NAME_RE.match(a) for a in excluded)):
            raise DecodeError(f"{k}: 'excluded' must be absent, null or a list of agent ids", reason="schema")
        return cls(req_int(m, "round", k, 1), req_str(m, "model_id", k, HEX_ID_RE),
                   req_int(m, "base_round", k), req_float(m, "opened", k), req_float(m, "deadline", k),
                   TrainConfig.from_wire(_get(m, "config", k), k), agents,
                   req_int(m, "quorum", k, 1, limits.max_agents), req_run(m, k),
                   None if m.get("sample") is None else Sample.from_wire(m["sample"], k), excluded or None)

    def asks(self, agent: str) -> bool:
        if self.agents is not None:
            return agent in self.agents
        if self.excluded and agent in self.excluded:
            return False
        if self.sample is not None:
            return sampled(self.sample.seed, self.round, agent, self.sample.fraction)
        return True


@dataclass
class Update(Message):
    """An agent's delta (local weights - global weights of ``base_round``) for ``round``."""

    KIND: ClassVar[str] = "update"
    round: int
    agent: str
    model_id: str
    update_id: str  # random hex; the receiver de-duplicates on (round, agent) and update_id
    num_samples: int
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = 0.0
    compression: Compression = field(default_factory=Compression)
    #: the global round the delta was computed against (the announcement's base_round);
    #: None in the constructor means ``round - 1`` (every earlier round aggregated)
    base_round: int = None  # type: ignore[assignment]
    run: str = ""  # the run of the announcement it answers (required on the wire)

    def __post_init__(self) -> None:
        if self.base_round is None:
            self.base_round = max(0, self.round - 1)

    def to_wire(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "base_round": self.base_round, "agent": self.agent,
                "model_id": self.model_id, "update_id": self.update_id, "num_samples": self.num_samples,
                "metrics": self.metrics, "created": self.created,
                "tensors": tensors_to_wire(self.tensors, self.compression)}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "Update":
        k = cls.KIND
        m = _as_map(m, k)
        rnd = req_int(m, "round", k, 1)
        ns = _get(m, "num_samples", k)
        if type(ns) is not int:
            raise DecodeError(f"{k}: num_samples must be an int, got {ns!r:.40}", reason="schema")
        if not (1 <= ns <= limits.max_samples):
            raise DecodeError(f"{k}: num_samples must be an int in [1, {limits.max_samples}], got {ns!r:.40}",
                              reason="bad_samples")
        return cls(
            round=rnd, agent=req_str(m, "agent", k, NAME_RE),
            model_id=req_str(m, "model_id", k, HEX_ID_RE), update_id=req_str(m, "update_id", k, HEX_ID_RE),
            num_samples=ns,
            tensors=tensors_from_wire(_get(m, "tensors", k), k, limits),
            metrics=metrics_map(_get(m, "metrics", k), k, limits), created=req_float(m, "created", k),
            base_round=req_int(m, "base_round", k, 0, rnd - 1),
            run=req_run(m, k),
        )


@dataclass
class Status(Message):
    """An agent's retained status; its last will is the same message with state "offline"."""

    KIND: ClassVar[str] = "status"
    agent: str
    state: str
    ts: float
    runtime: str = ""
    interpreter: str = ""
    num_samples: int = 0
    version: str = ""
    error: str = ""  # why the agent cannot train (state "error"): its data does not fit, the model is refused

    def to_wire(self) -> dict[str, Any]:
        d = {"agent": self.agent, "state": self.state, "ts": self.ts, "runtime": self.runtime,
             "interpreter": self.interpreter, "num_samples": self.num_samples, "version": self.version}
        if self.error:
            d["error"] = self.error
        return d

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "Status":
        k = cls.KIND
        m = _as_map(m, k)
        state = _get(m, "state", k)
        if type(state) is not str or state not in STATES:
            raise DecodeError(f"{k}: state must be one of {STATES}", reason="schema")
        return cls(req_str(m, "agent", k, NAME_RE), state, req_float(m, "ts", k),
                   req_str(m, "runtime", k), req_str(m, "interpreter", k),
                   req_int(m, "num_samples", k, 0, 2**40), req_str(m, "version", k, max_len=64),
                   opt_str(m, "error", k, max_len=MAX_ERROR_LEN))


@dataclass
class RoundMetrics(Message):
    """Results of a closed round, published by the aggregator."""

    KIND: ClassVar[str] = "metrics"
    round: int
    ts: float
    outcome: str  # "aggregated" | "abandoned" | "unchanged"
    participants: list[str]
    values: dict[str, float]
    rejected: dict[str, float]
    run: str = ""  # required on the wire

    def to_wire(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "ts": self.ts, "outcome": self.outcome,
                "participants": self.participants,
                "values": self.values, "rejected": self.rejected}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "RoundMetrics":
        k = cls.KIND
        m = _as_map(m, k)
        parts = _get(m, "participants", k)
        if type(parts) is not list or len(parts) > limits.max_agents or not all(
            type(a) is str and NAME_RE.match(a) for a in parts
        ):
            raise DecodeError(f"{k}: 'participants' must be a list of agent ids", reason="schema")
        return cls(req_int(m, "round", k), req_float(m, "ts", k), req_str(m, "outcome", k, max_len=32), parts,
                   metrics_map(_get(m, "values", k), k, limits, "values"),
                   metrics_map(_get(m, "rejected", k), k, limits, "rejected"), req_run(m, k))


@dataclass
class Chunk(Message):
    """One piece of a payload too large for a single packet (see fedmq.broker.contract.chunking)."""

    KIND: ClassVar[str] = "chunk"
    blob_id: str
    index: int
    total: int
    offset: int
    size: int  # size of the whole blob
    sha256: bytes | memoryview  # of the whole blob
    data: bytes | memoryview

    def to_wire(self) -> dict[str, Any]:
        return {"blob_id": self.blob_id, "index": self.index, "total": self.total, "offset": self.offset,
                "size": self.size, "sha256": self.sha256, "data": self.data}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "Chunk":
        k = cls.KIND
        m = _as_map(m, k)
        digest = req_bin(m, "sha256", k)
        if digest.nbytes != 32:
            raise DecodeError(f"{k}: sha256 must be 32 bytes", reason="schema")
        total = req_int(m, "total", k, 1, 1 << 24)
        size = req_int(m, "size", k, 1, 2**40)
        return cls(req_str(m, "blob_id", k, HEX_ID_RE), req_int(m, "index", k, 0, total - 1), total,
                   req_int(m, "offset", k, 0, size - 1), size, digest, req_bin(m, "data", k))


@dataclass
class Receipt(Message):
    """The aggregator's answer to one update (``agents/<agent>/receipt``, that agent only; not retained).

    ``accepted`` true: the aggregator holds the update for the round (also for a copy of an accepted
    update, ``reason = "duplicate"``). False: refused with ``reason``; ``retry`` says whether the same
    update may count if re-sent into its round later (``no_open_round``, ``future``).
    """

    KIND: ClassVar[str] = "receipt"
    run: str
    round: int
    agent: str
    update_id: str
    accepted: bool
    reason: str = ""
    retry: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "agent": self.agent, "update_id": self.update_id,
                "accepted": self.accepted, "reason": self.reason, "retry": self.retry}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "Receipt":
        k = cls.KIND
        m = _as_map(m, k)
        acc, retry = _get(m, "accepted", k), _get(m, "retry", k)
        if type(acc) is not bool or type(retry) is not bool:
            raise DecodeError(f"{k}: 'accepted' and 'retry' must be booleans", reason="schema")
        return cls(req_run(m, k), req_int(m, "round", k, 1), req_str(m, "agent", k, NAME_RE),
                   req_str(m, "update_id", k, HEX_ID_RE), acc, req_str(m, "reason", k, max_len=64), retry)


@dataclass
class ChunkSet(Message):
    """The pointer a chunked retained message leaves on its plain topic: which blob its chunks make.

    A subscriber assembles only the chunks of this blob from ``<topic>/chunk/<i>``; chunks of any
    other blob there (an earlier version, a previous aggregator process) are ignored. Published
    before the chunks, so a subscriber knows the blob before its first chunk arrives.
    """

    KIND: ClassVar[str] = "chunked"
    blob_id: str
    total: int
    size: int
    sha256: bytes | memoryview

    def to_wire(self) -> dict[str, Any]:
        return {"blob_id": self.blob_id, "total": self.total, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "ChunkSet":
        k = cls.KIND
        m = _as_map(m, k)
        digest = req_bin(m, "sha256", k)
        if digest.nbytes != 32:
            raise DecodeError(f"{k}: sha256 must be 32 bytes", reason="schema")
        return cls(req_str(m, "blob_id", k, HEX_ID_RE), req_int(m, "total", k, 1, 1 << 24),
                   req_int(m, "size", k, 1, 2**40), digest)


@dataclass
class ServiceStatus(Message):
    """The aggregator's own retained status (topic ``service``); its last will says "offline"."""

    KIND: ClassVar[str] = "service"
    service: str  # the aggregator's client id
    state: str  # SERVICE_STATES
    ts: float
    run: str
    model_id: str = ""
    global_round: int = 0
    round: int = 0  # the open round, 0 when none is open
    version: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"service": self.service, "state": self.state, "ts": self.ts, "run": self.run,
                "model_id": self.model_id, "global_round": self.global_round, "round": self.round,
                "version": self.version}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "ServiceStatus":
        k = cls.KIND
        m = _as_map(m, k)
        state = _get(m, "state", k)
        if type(state) is not str or state not in SERVICE_STATES:
            raise DecodeError(f"{k}: state must be one of {SERVICE_STATES}", reason="schema")
        model_id = _get(m, "model_id", k)
        if model_id != "":
            model_id = req_str(m, "model_id", k, HEX_ID_RE)
        return cls(req_str(m, "service", k, NAME_RE), state, req_float(m, "ts", k), req_run(m, k), model_id,
                   req_int(m, "global_round", k), req_int(m, "round", k), req_str(m, "version", k, max_len=64))


@dataclass
class Signed(Message):
    """An envelope: ``body`` (an encoded message) signed with the fleet's key (fedmq.broker.contract.signing)."""

    KIND: ClassVar[str] = "signed"
    key_id: str
    sig: bytes | memoryview
    body: bytes | memoryview
    alg: str = "ed25519"

    def to_wire(self) -> dict[str, Any]:
        return {"alg": self.alg, "key_id": self.key_id, "sig": self.sig, "body": self.body}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], limits: DecodeLimits) -> "Signed":
        k = cls.KIND
        m = _as_map(m, k)
        alg = _get(m, "alg", k)
        if alg != "ed25519":
            raise DecodeError(f"{k}: unsupported signature algorithm {alg!r:.40}", reason="schema")
        sig = req_bin(m, "sig", k)
        if sig.nbytes != 64:
            raise DecodeError(f"{k}: an ed25519 signature is 64 bytes", reason="schema")
        return cls(req_str(m, "key_id", k, HEX_ID_RE), sig, req_bin(m, "body", k))


KINDS: dict[str, type[Message]] = {
    c.KIND: c for c in (ModelManifest, GlobalModel, RoundAnnouncement, Update, Status, RoundMetrics, Chunk,
                        ChunkSet, ServiceStatus, Receipt, Signed, GlobalDelta)
}
