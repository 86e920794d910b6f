"""The compressed downlink: a new global as an f16/int8 delta from the previous one, reconstructed exactly.

The aggregator computes ``d = new - prev``, encodes it (f16 or int8, fedmq.broker.contract.tensors),
decodes it exactly as a device will, and takes ``prev + decoded(d)`` (float32, elementwise) as the
new global itself: the devices' reconstruction and the aggregator's next base are the same bits, so
quantisation error never accumulates between them (it is part of the global, like any update).
IEEE float32 addition and multiplication are correctly rounded, so every device computes the same
result. ``weights_digest`` lets a device check its reconstruction.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import GlobalDelta, GlobalModel
from fedmq.broker.contract.tensors import Compression
from fedmq.broker.errors import DecodeError


def weights_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """sha256 over the tensors in name order: name, dtype, shape and little-endian bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(f"{name}|float32|{tuple(a.shape)}|".encode())
        h.update(a.reshape(-1).data.cast("B"))  # the same bytes as a.tobytes(), without the copy
    return h.digest()


def _add(base: Mapping[str, np.ndarray], d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.add(np.asarray(base[n], np.float32), np.asarray(d[n], np.float32), dtype=np.float32)
            for n in base}


def make_delta(prev: GlobalModel, new: Mapping[str, np.ndarray], new_round: int, encoding: str,
               created: float = 0.0) -> tuple[GlobalDelta, dict[str, np.ndarray]]:
    """The delta message from ``prev`` to ``new`` (the global of ``new_round``) and the global it
    reconstructs: use that as the global of ``new_round``."""
    if set(new) != set(prev.tensors):
        raise ValueError("new and previous globals have different tensors")
    diff = {n: np.subtract(np.asarray(new[n], np.float32), np.asarray(prev.tensors[n], np.float32),
                           dtype=np.float32) for n in prev.tensors}
    comp = Compression(encoding)
    wire = codec.encode(GlobalDelta(prev.run, new_round, prev.round, prev.model_id, created, b"\0" * 32, diff,
                                    comp))
    decoded = codec.decode(wire)  # exactly what a device gets
    assert isinstance(decoded, GlobalDelta)
    rec = _add(prev.tensors, decoded.tensors)
    return GlobalDelta(prev.run, new_round, prev.round, prev.model_id, created, weights_digest(rec), diff,
                       comp), rec


def apply_delta(base: GlobalModel, delta: GlobalDelta) -> GlobalModel:
    """The global ``delta`` makes from ``base``; DecodeError (``bad_delta``) if it does not apply or check."""
    if (base.run, base.model_id, base.round) != (delta.run, delta.model_id, delta.base_round):
        raise DecodeError(f"delta to round {delta.round} applies to round {delta.base_round} of run {delta.run}, "
                          f"not round {base.round} of run {base.run}", reason="bad_delta")
    if set(base.tensors) != set(delta.tensors) or any(
            tuple(base.tensors[n].shape) != tuple(delta.tensors[n].shape) for n in base.tensors):
        raise DecodeError(f"delta to round {delta.round} does not fit the global's tensors", reason="bad_delta")
    rec = _add(base.tensors, delta.tensors)
    if weights_digest(rec) != bytes(delta.result_sha256):
        raise DecodeError(f"delta to round {delta.round}: the reconstruction differs from the aggregator's",
                          reason="bad_delta")
    return GlobalModel(delta.round, delta.model_id, rec, delta.created, delta.run)
