"""The wire format: msgpack framing of fedmq.broker.contract.messages, with limits checked before parsing.

``encode`` returns ``bytes``; ``Encoder.encode`` returns a view into a reused buffer (no fresh
40 MB allocation per message) that stays valid until its next call. ``decode`` checks the size
first, decodes it under the reader's limits (fedmq.broker.contract.msgview: msgpack's C unpacker up to
``FAST_MAX_BYTES``, the zero-copy reader above) and validates the schema;
every failure is a DecodeError whose ``reason`` is a short label for counters.

Memory: ``decode`` never allocates from a declared size before checking it against the bytes
present. Its peak allocation is at most ``DECODE_AMPLIFICATION * len(payload) + DECODE_OVERHEAD``
bytes plus, for ``topk`` tensors, the dense result (4 bytes per declared element; at most
``max_topk_expansion`` elements per sent entry and ``max_elements`` per message). ``raw`` tensors
are read-only (zero-copy views of payloads above ``FAST_MAX_BYTES``). tests/test_fuzz.py checks this bound with tracemalloc.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from fedmq.broker.contract.messages import KINDS, SCHEMA_VERSION, DecodeLimits, Message
from fedmq.broker.contract.msgview import ReadLimits, read_payload
from fedmq.broker.errors import DecodeError, EncodeError

DEFAULT_LIMITS = DecodeLimits()
#: bytes allocated per payload byte at most (Python objects of the msgpack structure; f16 x2, int8 x4)
DECODE_AMPLIFICATION = 32
#: constant part of the bound: container headers (at most ``max_containers``), numpy array headers
DECODE_OVERHEAD = 2 * 1024 * 1024


def _envelope(msg: Message) -> dict[str, Any]:
    if type(msg).KIND not in KINDS:
        raise EncodeError(f"{type(msg).__name__} is not a protocol message")
    wire = {"v": SCHEMA_VERSION, "kind": msg.KIND}
    wire.update(msg.to_wire())
    return wire


#: a shared buffer grown past this by one large message is dropped once the message is copied out: msgpack
#: doubles its buffer, so a 6.7 MB update left 13.3 MB resident on the device between rounds
KEEP_BUFFER_BYTES = 1 << 20


class Encoder:
    """Encodes into one reused buffer: one copy of the tensor bytes, no per-call allocation."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        self._view: memoryview | None = None

    def shrink(self, keep: int = KEEP_BUFFER_BYTES) -> None:
        """Drop the buffer when the last message made it larger than ``keep`` bytes (its view too)."""
        if self._view is not None and self._view.nbytes > keep:
            self._view.release()
            self._view = None
            self._packer = msgpack.Packer(use_bin_type=True, autoreset=False)

    def encode(self, msg: Message) -> memoryview:
        """Return a view of the payload, valid until the next call on this encoder."""
        if self._view is not None:
            self._view.release()
            self._view = None
        try:
            self._packer.reset()
        except BufferError:  # a caller still holds a slice of the old view: start a new buffer
            self._packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        self._packer.pack(_envelope(msg))
        self._view = self._packer.getbuffer()
        return self._view


_shared = Encoder()
_shared_lock = threading.Lock()


def _tensor_bytes(msg: Message) -> int:
    tensors = getattr(msg, "tensors", None)
    return sum(int(getattr(t, "nbytes", 0)) for t in tensors.values()) if isinstance(tensors, dict) else 0


def encode(msg: Message) -> bytes:
    """Encode a message to ``bytes`` (through a shared, reused buffer: one copy of the tensors).

    A message with more than KEEP_BUFFER_BYTES of tensors gets a buffer of its own, sized for it at
    once: msgpack would otherwise double its way there (up to 2x the payload, then kept). A
    generous size costs no memory the message does not fill (the OS maps pages on first write)."""
    hint = _tensor_bytes(msg)
    if hint > KEEP_BUFFER_BYTES:
        packer = msgpack.Packer(use_bin_type=True, autoreset=False, buf_size=hint + (1 << 16))
        packer.pack(_envelope(msg))
        return packer.bytes()
    with _shared_lock:
        out = bytes(_shared.encode(msg))
        _shared.shrink()
        return out


def peek_kind(payload: bytes | memoryview, limits: DecodeLimits = DEFAULT_LIMITS) -> str:
    """Return the kind of a payload after checking the envelope (no tensors are decoded)."""
    return _check_envelope(_walk(payload, limits))


def _walk(payload: bytes | bytearray | memoryview, limits: DecodeLimits) -> Any:
    n = memoryview(payload).nbytes
    if n > limits.max_payload_bytes:
        raise DecodeError(f"payload of {n} bytes exceeds the limit {limits.max_payload_bytes}", reason="too_large")
    if n == 0:
        raise DecodeError("empty payload", reason="malformed")
    return read_payload(payload, ReadLimits(limits.max_depth, limits.max_container, limits.max_str, limits.max_containers))


def _check_envelope(m: Any) -> str:
    if not isinstance(m, dict):
        raise DecodeError("payload is not a msgpack map", reason="malformed")
    v = m.get("v")
    if type(v) is not int:  # missing, or a bool/float/str/container: not a version this build speaks
        raise DecodeError(f"payload has no integer schema version 'v' (got {v!r:.40})", reason="bad_version")
    if v != SCHEMA_VERSION:
        raise DecodeError(f"unsupported schema version {v} (this build speaks {SCHEMA_VERSION})",
                          reason="bad_version")
    kind = m.get("kind")
    if type(kind) is not str or kind not in KINDS:  # a map/list kind is unhashable: check the type first
        raise DecodeError(f"unknown message kind {kind!r:.40}", reason="bad_kind")
    return kind


def decode(payload: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS,
           expect: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """Decode and validate one payload. Arrays are zero-copy, read-only views of ``payload``."""
    m = _walk(payload, limits)
    kind = _check_envelope(m)
    cls = KINDS[kind]
    if expect is not None and not issubclass(cls, expect):
        raise DecodeError(f"unexpected message kind {kind!r} here", reason="bad_kind")
    return cls.from_wire(m, limits)
