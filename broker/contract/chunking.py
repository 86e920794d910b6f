"""Splitting large payloads into chunks and reassembling them, bounded and idempotent.

A payload larger than the maximum is sent as ``Chunk`` messages (fedmq.broker.contract.messages) carrying the
blob id, index, total, offset, blob size and the SHA-256 of the whole blob. The reassembler
accepts chunks in any order, ignores duplicates (QoS 1 redelivers), verifies the hash, expires
incomplete blobs after a TTL and bounds memory: blob size, blobs in flight (overall and per
source) and bytes reserved in total (a blob reserves its declared size on its first chunk, so a
flood of half-sent blobs cannot grow memory past the bound).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

from fedmq.broker.contract.messages import Chunk
from fedmq.broker.errors import ChunkError

log = logging.getLogger(__name__)

#: bytes of envelope around a chunk's data (map keys, ids, hash): generous upper bound
CHUNK_OVERHEAD = 256


def new_blob_id() -> str:
    return os.urandom(16).hex()


def split(payload: bytes | bytearray | memoryview, max_data: int, blob_id: str | None = None) -> list[Chunk]:
    """Split ``payload`` into chunks of at most ``max_data`` data bytes (views, no copies)."""
    if max_data <= 0:
        raise ValueError("max_data must be positive")
    mv = memoryview(payload).cast("B")
    size = mv.nbytes
    if size == 0:
        raise ValueError("cannot chunk an empty payload")
    digest = hashlib.sha256(mv).digest()
    bid = blob_id or new_blob_id()
    total = math.ceil(size / max_data)
    return [Chunk(bid, i, total, i * max_data, size, digest, mv[i * max_data : (i + 1) * max_data])
            for i in range(total)]


@dataclass(frozen=True)
class ReassemblyLimits:
    max_blob_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 512 * 1024 * 1024
    max_blobs: int = 64
    max_blobs_per_source: int = 4
    max_chunks: int = 100_000
    ttl_s: float = 120.0
    remember_done: int = 4096  # completed blob ids kept to ignore late duplicates


@dataclass
class _Partial:
    total: int
    size: int
    sha256: bytes
    source: Hashable
    created: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Collects chunks per (source, blob id); ``add`` returns the whole blob once complete."""

    def __init__(self, limits: ReassemblyLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or ReassemblyLimits()
        self._clock = clock
        self._partials: dict[tuple[Hashable, str], _Partial] = {}
        self._done: OrderedDict[tuple[Hashable, str], None] = OrderedDict()
        self._reserved = 0
        self.duplicates = 0
        self.expired = 0

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def in_flight(self) -> int:
        return len(self._partials)

    def _drop(self, key: tuple[Hashable, str]) -> None:
        p = self._partials.pop(key, None)
        if p is not None:
            self._reserved -= p.size

    def expire(self) -> int:
        """Drop incomplete blobs older than the TTL; return how many were dropped."""
        now = self._clock()
        old = [k for k, p in self._partials.items() if now - p.created > self.limits.ttl_s]
        for k in old:
            log.info("chunked blob %s from %s expired incomplete (%d/%d chunks)",
                     k[1], k[0], len(self._partials[k].parts), self._partials[k].total)
            self._drop(k)
        self.expired += len(old)
        return len(old)

    def add(self, chunk: Chunk, source: Hashable = None) -> bytes | None:
        """Add one chunk. Returns the blob when complete, None otherwise; raises ChunkError to reject."""
        lim = self.limits
        self.expire()
        key = (source, chunk.blob_id)
        if key in self._done:
            self.duplicates += 1
            return None
        p = self._partials.get(key)
        digest = bytes(chunk.sha256)
        if p is None:
            if chunk.size > lim.max_blob_bytes:
                raise ChunkError(f"blob {chunk.blob_id} declares {chunk.size} bytes > limit {lim.max_blob_bytes}",
                                 reason="chunk_too_large")
            if chunk.total > lim.max_chunks:
                raise ChunkError(f"blob {chunk.blob_id} declares {chunk.total} chunks > limit {lim.max_chunks}",
                                 reason="chunk_too_many")
            if len(self._partials) >= lim.max_blobs:
                raise ChunkError(f"{len(self._partials)} blobs already in flight (limit {lim.max_blobs})",
                                 reason="chunk_flood")
            if sum(1 for k in self._partials if k[0] == source) >= lim.max_blobs_per_source:
                raise ChunkError(f"source {source} has {lim.max_blobs_per_source} blobs in flight already",
                                 reason="chunk_flood")
            if self._reserved + chunk.size > lim.max_total_bytes:
                raise ChunkError(f"reassembly memory budget {lim.max_total_bytes} bytes exhausted",
                                 reason="chunk_memory")
            p = _Partial(chunk.total, chunk.size, digest, source, self._clock())
            self._partials[key] = p
            self._reserved += chunk.size
        elif (chunk.total, chunk.size, digest) != (p.total, p.size, p.sha256):
            raise ChunkError(f"chunk {chunk.index} of blob {chunk.blob_id} disagrees with earlier chunks",
                             reason="chunk_inconsistent")
        n = memoryview(chunk.data).nbytes
        if chunk.offset + n > p.size or (n == 0):
            raise ChunkError(f"chunk {chunk.index} of blob {chunk.blob_id} lies outside the blob",
                             reason="chunk_inconsistent")
        if chunk.index in p.parts:
            self.duplicates += 1
            return None
        if p.received + n > p.size:
            self._drop(key)
            raise ChunkError(f"blob {chunk.blob_id} received more bytes than declared", reason="chunk_inconsistent")
        p.parts[chunk.index] = bytes(chunk.data)
        p.received += n
        if len(p.parts) < p.total:
            return None
        self._drop(key)
        blob = b"".join(p.parts[i] for i in range(p.total))
        if len(blob) != p.size or hashlib.sha256(blob).digest() != p.sha256:
            raise ChunkError(f"blob {chunk.blob_id} failed its SHA-256 check", reason="chunk_hash")
        self._done[key] = None
        while len(self._done) > lim.remember_done:
            self._done.popitem(last=False)
        return blob
