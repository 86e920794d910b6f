"""Splitting large payloads into chunks and reassembling them, bounded and idempotent.

A payload larger than the maximum is sent as ``Chunk`` messages (fedmq.broker.contract.messages) carrying the
blob id, index, total, offset, blob size and the SHA-256 of the whole blob. The reassembler
accepts chunks in any order, ignores duplicates (QoS 1 redelivers), verifies the hash, expires
blobs idle for a TTL, and bounds memory with fair shares:

* data is **placed by offset**: a chunk holds ``data`` for bytes ``[offset, offset + len)`` of the
  blob; ranges may not overlap or leave the blob (``chunk_offset``); the blob is complete when its
  ranges cover ``size`` bytes, whatever the ``index`` values (``index`` only names the chunk, and
  the topic index of a retained chunk must equal it);
* memory is charged **as bytes arrive** (plus ``PART_OVERHEAD`` per chunk), never by the declared
  size: a 100-byte chunk declaring 256 MiB costs ~100 bytes;
* each sender (the agent, or the channel for aggregator messages) has its own byte budget and
  blob count, and there is a total; ``ReassemblyLimits.for_fleet`` sizes them so that the total
  holds every sender's full share: one sender can never make another's upload fail;
* a refused blob's id is remembered for the TTL and its later chunks are dropped (``chunk_dropped``),
  not held.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

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
    """Bounds of the reassembler; see ``for_fleet`` for sizes derived from the model and the fleet."""

    max_blob_bytes: int = 256 * 1024 * 1024  # one blob's declared size
    max_source_bytes: int = 512 * 1024 * 1024  # bytes held for one sender, all its blobs together
    max_total_bytes: int = 1024 * 1024 * 1024  # bytes held for everyone
    max_blobs: int = 256
    max_blobs_per_source: int = 4
    max_chunks: int = 100_000
    ttl_s: float = 120.0  # an incomplete blob with no new chunk for this long is dropped
    remember_done: int = 4096  # completed blob ids kept to ignore late duplicates
    remember_refused: int = 4096  # refused blob ids kept (for ttl_s) to drop their later chunks

    def __post_init__(self) -> None:
        for name in ("max_blob_bytes", "max_source_bytes", "max_total_bytes", "max_blobs", "max_blobs_per_source",
                     "max_chunks", "remember_done", "remember_refused"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"ReassemblyLimits.{name} must be a positive int, got {v!r}")
        if not (isinstance(self.ttl_s, (int, float)) and math.isfinite(self.ttl_s) and self.ttl_s > 0):
            raise ValueError(f"ReassemblyLimits.ttl_s must be a positive number, got {self.ttl_s!r}")

    @classmethod
    def for_fleet(cls, model_bytes: int, asked_agents: int, *, senders_extra: int = 4,
                  ttl_s: float = 120.0) -> "ReassemblyLimits":
        """Limits for a fleet whose raw update is about ``model_bytes`` and ``asked_agents`` agents send.

        A blob may be 1.25 x the model plus 64 KiB (metrics, envelope, tensor maps); a sender may
        hold two such blobs (an update and its resend with a new id) plus its status; the total holds
        that share for every agent plus ``senders_extra`` spare senders (the aggregator's own
        channels on the agent side), so a full share for one sender never eats another's.
        """
        if type(model_bytes) is not int or model_bytes < 0 or type(asked_agents) is not int or asked_agents < 1:
            raise ValueError("for_fleet needs model_bytes >= 0 and asked_agents >= 1 (ints)")
        blob = model_bytes + model_bytes // 4 + 64 * 1024
        per_source = 2 * blob + 64 * 1024
        senders = asked_agents + senders_extra
        return cls(max_blob_bytes=blob, max_source_bytes=per_source, max_total_bytes=per_source * senders,
                   max_blobs=3 * senders, max_blobs_per_source=3, ttl_s=ttl_s)


#: bytes charged per held chunk on top of its data (the bytes object and the bookkeeping)
PART_OVERHEAD = 128


@dataclass
class _Partial:
    total: int
    size: int
    sha256: bytes
    sender: Hashable
    last: float  # time of the last accepted chunk
    starts: list[int] = field(default_factory=list)  # sorted offsets of the held parts
    parts: dict[int, bytes] = field(default_factory=dict)  # offset -> data
    received: int = 0  # data bytes held
    charged: int = 0  # bytes charged to the budgets (data + PART_OVERHEAD per part)


def release_memory() -> bool:
    """Ask glibc to give freed heap pages back to the OS (``malloc_trim``); False where unavailable."""
    global _trim
    if _trim is None:
        try:
            fn = ctypes.CDLL("libc.so.6").malloc_trim
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _trim = fn
        except (OSError, AttributeError):
            _trim = False
    if _trim is False or _trim is None:
        return False
    _trim(0)
    return True


_trim: Any = None  # None = not looked up yet, False = unavailable, else libc's malloc_trim


class Reassembler:
    """Collects chunks per (source, blob id); ``add`` returns the whole blob once complete.

    ``source`` names the stream a blob arrives on (the topic without ``/chunk/<i>``); ``sender``
    is whom its bytes are charged to (the agent id; defaults to ``source``). Call ``expire()``
    periodically (``Receiver.tick`` does) so idle blobs are dropped even when no chunk arrives.
    """

    def __init__(self, limits: ReassemblyLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or ReassemblyLimits()
        self._clock = clock
        self._partials: dict[tuple[Hashable, str], _Partial] = {}
        self._done: OrderedDict[tuple[Hashable, str], None] = OrderedDict()
        self._refused: OrderedDict[tuple[Hashable, str], float] = OrderedDict()
        self._by_sender: dict[Hashable, list[int]] = {}  # sender -> [blobs, bytes charged]
        self._reserved = 0
        self._last_scan = -math.inf
        self.duplicates = 0
        self.expired = 0
        self.freed_bytes = 0  # bytes released by expiry/refusal since the last ``take_freed``

    @property
    def reserved_bytes(self) -> int:
        """Bytes currently charged (data held + PART_OVERHEAD per held chunk)."""
        return self._reserved

    @property
    def in_flight(self) -> int:
        return len(self._partials)

    def sender_bytes(self, sender: Hashable) -> int:
        return self._by_sender.get(sender, [0, 0])[1]

    def take_freed(self) -> int:
        n, self.freed_bytes = self.freed_bytes, 0
        return n

    def _charge(self, p: _Partial, n: int) -> None:
        p.charged += n
        self._reserved += n
        self._by_sender[p.sender][1] += n

    def _drop(self, key: tuple[Hashable, str], freed: bool = False) -> None:
        p = self._partials.pop(key, None)
        if p is None:
            return
        self._reserved -= p.charged
        acct = self._by_sender[p.sender]
        acct[0] -= 1
        acct[1] -= p.charged
        if acct[0] <= 0:
            del self._by_sender[p.sender]
        if freed:
            self.freed_bytes += p.charged
        p.parts.clear()  # the bytes objects go now, not when the last reference to p does

    def _refuse(self, key: tuple[Hashable, str], now: float, err: ChunkError) -> ChunkError:
        self._drop(key, freed=True)
        self._refused[key] = now
        self._refused.move_to_end(key)
        while len(self._refused) > self.limits.remember_refused:
            self._refused.popitem(last=False)
        return err

    def discard_source(self, source: Hashable, keep: str | None = None) -> int:
        """Drop every incomplete blob of ``source`` except blob ``keep``; return how many were dropped.

        Used when a retained stream's pointer names a new blob: chunks of other blobs can never be used.
        """
        old = [k for k in self._partials if k[0] == source and k[1] != keep]
        for k in old:
            self._drop(k, freed=True)
        return len(old)

    def expire(self, now: float | None = None) -> int:
        """Drop blobs idle for more than the TTL and forget old refusals; return how many blobs were dropped."""
        now = self._clock() if now is None else now
        self._last_scan = now
        ttl = self.limits.ttl_s
        old = [k for k, p in self._partials.items() if now - p.last > ttl]
        for k in old:
            p = self._partials[k]
            log.info("chunked blob %s from %s expired incomplete (%d of %d bytes)", k[1], k[0], p.received, p.size)
            self._drop(k, freed=True)
        while self._refused and now - next(iter(self._refused.values())) > ttl:
            self._refused.popitem(last=False)
        self.expired += len(old)
        return len(old)

    def add(self, chunk: Chunk, source: Hashable = None, sender: Hashable = None) -> bytes | None:
        """Add one chunk. Returns the blob when complete, None otherwise; raises ChunkError to reject."""
        lim = self.limits
        now = self._clock()
        if now - self._last_scan >= 1.0:  # expiry also runs here, at most once a second
            self.expire(now)
        sender = source if sender is None else sender
        key = (source, chunk.blob_id)
        if key in self._done:
            self.duplicates += 1
            return None
        if key in self._refused:
            raise ChunkError(f"chunk {chunk.index} of refused blob {chunk.blob_id} dropped", reason="chunk_dropped")
        p = self._partials.get(key)
        digest = bytes(chunk.sha256)
        if p is None:
            if chunk.size > lim.max_blob_bytes:
                raise self._refuse(key, now, ChunkError(
                    f"blob {chunk.blob_id} declares {chunk.size} bytes > limit {lim.max_blob_bytes}",
                    reason="chunk_too_large"))
            if chunk.total > lim.max_chunks or chunk.total > chunk.size:
                raise self._refuse(key, now, ChunkError(
                    f"blob {chunk.blob_id} declares {chunk.total} chunks (limit {lim.max_chunks}, size {chunk.size})",
                    reason="chunk_too_many"))
            acct = self._by_sender.get(sender, [0, 0])
            if acct[0] >= lim.max_blobs_per_source:
                raise self._refuse(key, now, ChunkError(
                    f"sender {sender} has {lim.max_blobs_per_source} blobs in flight already", reason="chunk_flood"))
            if len(self._partials) >= lim.max_blobs:
                raise self._refuse(key, now, ChunkError(
                    f"{len(self._partials)} blobs already in flight (limit {lim.max_blobs})", reason="chunk_flood"))
            p = _Partial(chunk.total, chunk.size, digest, sender, now)
            self._partials[key] = p
            self._by_sender.setdefault(sender, [0, 0])[0] += 1
        elif (chunk.total, chunk.size, digest) != (p.total, p.size, p.sha256):
            raise self._refuse(key, now, ChunkError(
                f"chunk {chunk.index} of blob {chunk.blob_id} disagrees with earlier chunks",
                reason="chunk_inconsistent"))
        data = memoryview(chunk.data)
        n = data.nbytes
        off = chunk.offset
        if n == 0 or off + n > p.size:
            raise self._refuse(key, now, ChunkError(
                f"chunk {chunk.index} of blob {chunk.blob_id}: bytes [{off}, {off + n}) lie outside the blob "
                f"of {p.size}", reason="chunk_offset"))
        held = p.parts.get(off)
        if held is not None:
            if len(held) == n:  # a redelivery (same place, same length): the hash decides at the end
                self.duplicates += 1
                p.last = now
                return None
            raise self._refuse(key, now, ChunkError(
                f"chunk {chunk.index} of blob {chunk.blob_id} overlaps data at offset {off}", reason="chunk_offset"))
        i = bisect.bisect_left(p.starts, off)
        if (i > 0 and p.starts[i - 1] + len(p.parts[p.starts[i - 1]]) > off) or \
                (i < len(p.starts) and off + n > p.starts[i]):
            raise self._refuse(key, now, ChunkError(
                f"chunk {chunk.index} of blob {chunk.blob_id} overlaps data already received", reason="chunk_offset"))
        if len(p.parts) >= p.total:
            raise self._refuse(key, now, ChunkError(
                f"blob {chunk.blob_id} got more than its {p.total} declared chunks", reason="chunk_inconsistent"))
        cost = n + PART_OVERHEAD
        if self._by_sender[sender][1] + cost > lim.max_source_bytes:
            raise self._refuse(key, now, ChunkError(
                f"sender {sender} would hold more than {lim.max_source_bytes} bytes of chunks", reason="chunk_budget"))
        if self._reserved + cost > lim.max_total_bytes:
            raise self._refuse(key, now, ChunkError(
                f"reassembly memory budget {lim.max_total_bytes} bytes exhausted", reason="chunk_memory"))
        p.starts.insert(i, off)
        p.parts[off] = bytes(data)
        p.received += n
        p.last = now
        self._charge(p, cost)
        if p.received < p.size:
            return None
        # non-overlapping ranges inside [0, size) whose lengths sum to size: they tile the blob
        blob = b"".join(p.parts[o] for o in p.starts)
        self._drop(key)
        if hashlib.sha256(blob).digest() != p.sha256:
            raise self._refuse(key, now, ChunkError(f"blob {chunk.blob_id} failed its SHA-256 check",
                                                    reason="chunk_hash"))
        self._done[key] = None
        while len(self._done) > lim.remember_done:
            self._done.popitem(last=False)
        return blob
