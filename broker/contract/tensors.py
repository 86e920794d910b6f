"""Tensor encodings on the wire: raw, float16, int8 and top-k sparse.

A tensor travels as a msgpack map::

    {"name": str, "enc": "raw"|"f16"|"int8"|"topk", "dtype": <logical dtype>, "shape": [int, ...],
     "data": bin, ["scale": float64 (int8)], ["idx": bin (topk, uint32 little-endian)]}

All multi-byte values are little-endian. ``dtype`` is the logical dtype the decoder returns
(``float32`` for every lossy encoding). Encodings and their error:

* ``raw``  — the array's own bytes; exact. Allowed dtypes: see ``RAW_DTYPES``.
* ``f16``  — IEEE half precision, round-to-nearest-even; relative error <= 2**-11 for normal
  values. Values beyond +-65504 are refused at encode time (they would become inf).
* ``int8`` — symmetric per-tensor quantisation: ``scale = max|x| / 127``,
  ``q = clip(rint(x / scale), -127, 127)`` (``rint`` rounds half to even), decoded as
  ``q * scale``; absolute error <= scale / 2. An all-zero tensor has scale 0.
* ``topk`` — the ``k = max(1, ceil(fraction * size))`` entries of largest magnitude (ties: the
  lower flat index wins; see ``topk_indices``), as sorted unique uint32 flat indices (``idx``) plus float32 values (``data``); the rest decode to 0.
  Pair it with error feedback on the sender (edge_agent keeps the residual).

Decoding is zero-copy for ``raw`` (``np.frombuffer`` over the received buffer, read-only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fedmq.broker.errors import DecodeError, EncodeError

RAW_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
}
_NAME_OF = {v: k for k, v in RAW_DTYPES.items()}
ENCODINGS = ("raw", "f16", "int8", "topk")
FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_RANK = 8


@dataclass(frozen=True)
class Compression:
    """How update tensors are encoded: ``encoding`` in ENCODINGS; ``topk_fraction`` for topk."""

    encoding: str = "raw"
    topk_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise EncodeError(f"unknown encoding {self.encoding!r}; use one of {', '.join(ENCODINGS)}")
        if not (0.0 < self.topk_fraction <= 1.0):
            raise EncodeError("topk_fraction must be in (0, 1]")


def dtype_name(dtype: np.dtype) -> str:
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _NAME_OF[dt]
    except KeyError:
        raise EncodeError(f"dtype {dtype} cannot travel on the wire; allowed: {', '.join(RAW_DTYPES)}") from None


def _le_contiguous(a: np.ndarray) -> np.ndarray:
    dt = RAW_DTYPES[dtype_name(a.dtype)]
    if a.dtype != dt or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=dt)
    return a


def _bytes_view(a: np.ndarray) -> memoryview:
    """A flat byte view of a contiguous array, without a copy."""
    return a.reshape(-1).view(np.uint8).data if a.size else memoryview(b"")


def topk_count(size: int, fraction: float) -> int:
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` entries of largest magnitude; ties go to the lower index.

    The one top-k selection of fedmq: the encoder sends these entries and the error-feedback
    residual (fedmq.edge_agent.compress) keeps every other one, so the two must agree exactly.
    Deterministic (no dependence on argpartition's tie order); NaN counts as the largest.
    """
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    mag = np.abs(flat)
    if np.isnan(mag).any():  # NaN sorts above everything; argsort below handles it deterministically
        order = np.argsort(-np.nan_to_num(mag, nan=np.inf), kind="stable")[:k]
        return np.sort(order)
    thresh = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    above = np.flatnonzero(mag > thresh)
    ties = np.flatnonzero(mag == thresh)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def encode_tensor(name: str, array: np.ndarray, compression: Compression | None = None) -> dict[str, Any]:
    """Describe ``array`` as a wire map. ``raw`` data is a zero-copy view of ``array``."""
    comp = compression or Compression()
    a = np.asarray(array)
    if a.ndim > MAX_RANK:
        raise EncodeError(f"tensor {name!r} has rank {a.ndim} > {MAX_RANK}")
    out: dict[str, Any] = {"name": name, "enc": comp.encoding, "shape": list(a.shape)}
    if comp.encoding == "raw":
        a = _le_contiguous(a)
        out["dtype"] = dtype_name(a.dtype)
        out["data"] = _bytes_view(a)
        return out
    if a.dtype.kind != "f":
        raise EncodeError(f"encoding {comp.encoding} applies to float tensors, {name!r} is {a.dtype}")
    out["dtype"] = "float32"
    flat = np.asarray(a, dtype=np.float32).reshape(-1)
    if comp.encoding == "f16":
        if flat.size and not np.all(np.abs(flat) <= FLOAT16_MAX):
            raise EncodeError(f"tensor {name!r} has values outside float16 range (+-65504) or non-finite; use raw")
        out["data"] = _bytes_view(flat.astype("<f2"))
    elif comp.encoding == "int8":
        amax = float(np.max(np.abs(flat))) if flat.size else 0.0
        if not math.isfinite(amax):
            raise EncodeError(f"tensor {name!r} has non-finite values")
        scale = amax / 127.0
        if np.float32(scale) > 0:  # (a float64 scale below ~1e-45 is 0 in float32: all values round to 0)
            q = np.clip(np.rint(flat / np.float32(scale)), -127, 127).astype(np.int8)
        else:
            q = np.zeros(flat.size, dtype=np.int8)
        out["scale"] = scale
        out["data"] = _bytes_view(q)
    else:  # topk
        idx = topk_indices(flat, topk_count(flat.size, comp.topk_fraction)).astype("<u4")
        out["idx"] = _bytes_view(idx)
        out["data"] = _bytes_view(np.ascontiguousarray(flat[idx], dtype="<f4"))
    return out


def topk_dense(flat_size: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(flat_size, dtype=np.float32)
    out[idx] = values
    return out


def _shape(obj: Any, name: str, max_elements: int) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape: each dimension on its own AND the product of the non-zero ones.

    Bounding only the product would let ``[0, 2**40, 2**40]`` through (product 0) and make numpy
    raise on reshape; so every dimension is <= ``max_elements`` and so is the product of
    ``max(d, 1)`` over the dimensions.
    """
    if type(obj) is not list or len(obj) > MAX_RANK:
        raise DecodeError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} ints", reason="bad_shape")
    size = 1
    span = 1
    for d in obj:
        if type(d) is not int or d < 0:
            raise DecodeError(f"tensor {name!r}: shape entries must be non-negative ints", reason="bad_shape")
        if d > max_elements:
            raise DecodeError(f"tensor {name!r}: dimension {d} exceeds the limit {max_elements}", reason="too_large")
        size *= d
        if d > 1:
            span *= d
        if span > max_elements:
            raise DecodeError(
                f"tensor {name!r}: declared {span}+ elements exceed the limit {max_elements}", reason="too_large"
            )
    return tuple(obj), size


def _scale_ok(v: Any) -> bool:
    """An int8 scale: a non-bool int or float, finite, >= 0 and finite in float32 too."""
    if type(v) not in (float, int) or not -(2**64) < v < 2**64:
        return False
    f = float(v)
    return math.isfinite(f) and f >= 0 and math.isfinite(float(np.float32(f)))


def _bin(obj: Any, field: str, name: str) -> memoryview:
    if type(obj) not in (bytes, memoryview):
        raise DecodeError(f"tensor {name!r}: field {field!r} must be bin", reason="schema")
    return memoryview(obj)


def decode_tensor(m: Mapping[str, Any], max_elements: int, max_topk_expansion: int = 1000) -> tuple[str, np.ndarray]:
    """Validate a wire map and return ``(name, array)``; never allocates a declared size unchecked.

    Allocation: raw none (a view), f16 2 x the data, int8 4 x the data, topk the dense result of
    at most ``max_topk_expansion`` elements per sent entry.
    """
    if not isinstance(m, dict):  # decoded maps are dicts (typing.Mapping checks cost 20x)
        raise DecodeError("tensor entry must be a map", reason="schema")
    name = m.get("name")
    if type(name) is not str or not (0 < len(name) <= 256):
        raise DecodeError("tensor name must be a string of 1-256 characters", reason="schema")
    enc = m.get("enc")
    if type(enc) is not str or enc not in ENCODINGS:
        raise DecodeError(f"tensor {name!r}: unknown encoding {enc!r:.40}", reason="bad_encoding")
    dname = m.get("dtype")
    if type(dname) is not str or dname not in RAW_DTYPES:
        raise DecodeError(f"tensor {name!r}: dtype {dname!r:.40} not allowed", reason="bad_dtype")
    shape, size = _shape(m.get("shape"), name, max_elements)
    data = m.get("data")
    if type(data) is bytes:  # the C decoder's bins: used as they are, without a memoryview
        nbytes = len(data)
    else:
        data = _bin(data, "data", name)
        nbytes = data.nbytes
    if enc == "raw":
        dt = RAW_DTYPES[dname]
        if nbytes != size * dt.itemsize:
            raise DecodeError(
                f"tensor {name!r}: shape {list(shape)} x {dname} needs {size * dt.itemsize} bytes, got {nbytes}",
                reason="bad_shape",
            )
        return name, np.frombuffer(data, dtype=dt).reshape(shape)
    if dname != "float32":
        raise DecodeError(f"tensor {name!r}: encoding {enc} decodes to float32 only", reason="bad_dtype")
    if enc == "f16":
        if nbytes != size * 2:
            raise DecodeError(f"tensor {name!r}: f16 needs {size * 2} bytes, got {nbytes}", reason="bad_shape")
        return name, np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(shape)
    if enc == "int8":
        scale: Any = m.get("scale")
        if not _scale_ok(scale):
            raise DecodeError(f"tensor {name!r}: int8 scale must be a finite float >= 0", reason="schema")
        if nbytes != size:
            raise DecodeError(f"tensor {name!r}: int8 needs {size} bytes, got {nbytes}", reason="bad_shape")
        out = np.frombuffer(data, dtype=np.int8).astype(np.float32)
        out *= np.float32(scale)  # in place: one float32 array, 4 x the data
        return name, out.reshape(shape)
    # topk
    idx_b = _bin(m.get("idx"), "idx", name)
    if idx_b.nbytes % 4 or nbytes != idx_b.nbytes or idx_b.nbytes // 4 > size:
        raise DecodeError(f"tensor {name!r}: topk idx/values lengths inconsistent with shape", reason="bad_shape")
    if size > max_topk_expansion * max(1, idx_b.nbytes // 4):
        raise DecodeError(f"tensor {name!r}: topk of {idx_b.nbytes // 4} entries for {size} elements expands more "
                          f"than {max_topk_expansion}x", reason="too_large")
    idx = np.frombuffer(idx_b, dtype="<u4")
    vals = np.frombuffer(data, dtype="<f4")
    if idx.size:
        if int(idx[-1]) >= size or int(idx[0]) < 0 or (idx.size > 1 and not np.all(idx[1:] > idx[:-1])):
            raise DecodeError(f"tensor {name!r}: topk indices must be sorted, unique and < size", reason="bad_shape")
    return name, topk_dense(size, idx, vals).reshape(shape)
