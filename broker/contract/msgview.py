"""A strict, zero-copy msgpack reader for untrusted payloads.

``msgpack.unpackb`` copies every ``bin`` into a fresh ``bytes`` object: for a 40 MB update that
is a 40 MB allocation (page faults included) per message. This reader returns each ``bin`` as a
read-only ``memoryview`` slice of the received buffer, so tensors decode with ``np.frombuffer``
and no copy. It implements the msgpack spec's types except ``ext`` (fedmq never sends ext; it is
rejected), and enforces limits while walking: nesting depth, container and string lengths, and
that every declared length fits in the bytes actually present (a hostile header can never make
it allocate). It is cross-checked against ``msgpack.unpackb`` in the tests.

``read_payload`` is what the codec calls: payloads up to ``FAST_MAX_BYTES`` go through msgpack's C
unpacker with the same limits (``unpack_fast``, several times faster on small updates), larger ones
through this reader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from fedmq.broker.errors import DecodeError

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I8 = struct.Struct(">b").unpack_from
_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from
_I64 = struct.Struct(">q").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from


@dataclass(frozen=True)
class ReadLimits:
    """Bounds applied while walking a payload."""

    max_depth: int = 8
    max_container: int = 100_000
    max_str: int = 65_536
    max_containers: int = 4096  # maps + arrays in one payload: bounds Python object overhead per byte


class _Reader:
    __slots__ = ("buf", "mv", "pos", "end", "lim", "containers")

    def __init__(self, buf: bytes | bytearray | memoryview, lim: ReadLimits) -> None:
        self.mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
        self.buf = self.mv
        self.pos = 0
        self.end = len(self.mv)
        self.lim = lim
        self.containers = 0

    def _need(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise DecodeError(
                f"truncated payload: need {n} bytes at offset {p}, {self.end - p} left", reason="truncated"
            )
        self.pos = p + n
        return p

    def _str(self, n: int) -> str:
        if n > self.lim.max_str:
            raise DecodeError(f"string of {n} bytes exceeds limit {self.lim.max_str}", reason="too_large")
        p = self._need(n)
        try:
            return str(self.mv[p : p + n], "utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"invalid UTF-8 in string at offset {p}", reason="malformed") from None

    def _bin(self, n: int) -> memoryview:
        p = self._need(n)
        return self.mv[p : p + n].toreadonly()

    def _container(self, n: int, depth: int) -> None:
        if depth >= self.lim.max_depth:
            raise DecodeError(f"nesting deeper than {self.lim.max_depth}", reason="malformed")
        self.containers += 1
        if self.containers > self.lim.max_containers:
            raise DecodeError(f"more than {self.lim.max_containers} maps and arrays in one payload", reason="too_large")
        if n > self.lim.max_container:
            raise DecodeError(f"container of {n} entries exceeds limit {self.lim.max_container}", reason="too_large")
        # Every entry takes at least one byte: a declared count larger than what is left is a lie.
        if n > self.end - self.pos:
            raise DecodeError(f"container declares {n} entries, only {self.end - self.pos} bytes left",
                              reason="truncated")

    def _array(self, n: int, depth: int) -> list[Any]:
        self._container(n, depth)
        return [self.read(depth + 1) for _ in range(n)]

    def _map(self, n: int, depth: int) -> dict[Any, Any]:
        self._container(2 * n, depth)
        out: dict[Any, Any] = {}
        for _ in range(n):
            k = self.read(depth + 1)
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise DecodeError("map keys must be strings or integers", reason="malformed")
            if k in out:
                raise DecodeError(f"duplicate map key {k!r}", reason="malformed")
            out[k] = self.read(depth + 1)
        return out

    def read(self, depth: int = 0) -> Any:
        p = self._need(1)
        b = self.mv[p]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        mv = self.mv
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b == 0xC4:
            return self._bin(mv[self._need(1)])
        if b == 0xC5:
            return self._bin(_U16(mv, self._need(2))[0])
        if b == 0xC6:
            return self._bin(_U32(mv, self._need(4))[0])
        if b == 0xCA:
            return _F32(mv, self._need(4))[0]
        if b == 0xCB:
            return _F64(mv, self._need(8))[0]
        if b == 0xCC:
            return mv[self._need(1)]
        if b == 0xCD:
            return _U16(mv, self._need(2))[0]
        if b == 0xCE:
            return _U32(mv, self._need(4))[0]
        if b == 0xCF:
            return _U64(mv, self._need(8))[0]
        if b == 0xD0:
            return _I8(mv, self._need(1))[0]
        if b == 0xD1:
            return _I16(mv, self._need(2))[0]
        if b == 0xD2:
            return _I32(mv, self._need(4))[0]
        if b == 0xD3:
            return _I64(mv, self._need(8))[0]
        if b == 0xD9:
            return self._str(mv[self._need(1)])
        if b == 0xDA:
            return self._str(_U16(mv, self._need(2))[0])
        if b == 0xDB:
            return self._str(_U32(mv, self._need(4))[0])
        if b == 0xDC:
            return self._array(_U16(mv, self._need(2))[0], depth)
        if b == 0xDD:
            return self._array(_U32(mv, self._need(4))[0], depth)
        if b == 0xDE:
            return self._map(_U16(mv, self._need(2))[0], depth)
        if b == 0xDF:
            return self._map(_U32(mv, self._need(4))[0], depth)
        if b in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
            raise DecodeError("msgpack ext types are not accepted", reason="malformed")
        raise DecodeError(f"invalid msgpack type byte 0x{b:02x} at offset {p}", reason="malformed")


def unpack(buf: bytes | bytearray | memoryview, limits: ReadLimits | None = None) -> Any:
    """Decode one msgpack object that must span the whole buffer; bins come back as memoryviews."""
    r = _Reader(buf, limits or ReadLimits())
    obj = r.read(0)
    if r.pos != r.end:
        raise DecodeError(f"{r.end - r.pos} trailing bytes after the message", reason="malformed")
    return obj


# -- the fast path: msgpack's C unpacker under the same limits ---------------------------------------
#: payloads up to this size are decoded by msgpack's C unpacker (``unpack_fast``): the copy of their
#: bins costs less than the ~100 Python calls per message of the zero-copy reader (a 13.8 KB update:
#: 73 us instead of 158 us). Larger payloads take the zero-copy reader, where the copy matters.
FAST_MAX_BYTES = 1 << 20
#: maps longer than this are left to the strict reader (a legitimate message's maps are short: fields,
#: tensors, metrics); it also bounds what the C path allocates for a map's (key, value) pairs
_FAST_MAX_MAP = 4096
_Timestamp = msgpack.Timestamp
_CONTAINERS = (dict, list)
_SPECIAL = frozenset((dict, list, _Timestamp))  # values that need a closer look
_KEY_TYPES = frozenset((str, int))


class _FallBack(Exception):
    """The C path declines (a map longer than ``_FAST_MAX_MAP``): the strict reader decides."""


def _ext(code: int, data: bytes) -> Any:
    raise DecodeError("msgpack ext types are not accepted", reason="malformed")


def unpack_fast(buf: bytes | bytearray | memoryview, limits: ReadLimits | None = None) -> Any:
    """Decode like ``unpack`` with msgpack's C unpacker; bins come back as ``bytes`` (copies).

    The same limits and the same rejections as the reader, enforced from hooks msgpack calls once per
    map and per array (bottom-up): containers counted, depth computed from the children's depths,
    duplicate and non-str/int keys rejected, ext (timestamps included) refused; string, array and map
    lengths are checked by msgpack before it allocates. Hostile payloads cost at most about 32 bytes of
    Python objects per payload byte (tests/test_fuzz.py checks the bound).
    """
    lim = limits or ReadLimits()
    max_depth, max_containers = lim.max_depth, lim.max_containers
    depth: dict[int, int] = {}  # id(container) -> nesting below it, for those above 1 (all live: ids unique)
    dget = depth.get
    count = 0

    def too_many() -> DecodeError:
        return DecodeError(f"more than {max_containers} maps and arrays in one payload", reason="too_large")

    def nested(obj: Any, vals: Any) -> None:
        """``obj`` holds a container (or a timestamp): its depth is 1 + the deepest child's."""
        d = 1
        for v in vals:
            t = type(v)
            if t is dict or t is list:
                x = dget(id(v), 1)
                if x > d:
                    d = x
            elif t is _Timestamp:
                raise DecodeError("msgpack ext types are not accepted", reason="malformed")
        d += 1
        if d > max_depth:
            raise DecodeError(f"nesting deeper than {max_depth}", reason="malformed")
        depth[id(obj)] = d

    # The hooks run once per array and map (~20 per update): inlined and short-circuiting, they cost
    # about half of a shared helper's (a 12.8 KB update: 43 -> 2x us; bench/RESULTS.md "intake")
    def on_list(items: list) -> list:
        nonlocal count
        count += 1
        if count > max_containers:
            raise too_many()
        for v in items:
            if type(v) in _SPECIAL:
                nested(items, items)
                break
        return items

    def on_pairs(pairs: list) -> dict:
        nonlocal count
        out = dict(pairs)
        if len(out) != len(pairs):
            raise DecodeError("duplicate map key", reason="malformed")
        count += 1
        if count > max_containers:
            raise too_many()
        if not _KEY_TYPES.issuperset(map(type, out)):
            raise DecodeError("map keys must be strings or integers", reason="malformed")
        vals = out.values()
        if not _SPECIAL.isdisjoint(map(type, vals)):
            nested(out, vals)
        return out

    try:
        obj = msgpack.unpackb(buf, raw=False, strict_map_key=False, use_list=True, ext_hook=_ext, timestamp=0,
                              list_hook=on_list, object_pairs_hook=on_pairs, max_str_len=lim.max_str,
                              max_bin_len=memoryview(buf).nbytes, max_array_len=lim.max_container,
                              max_map_len=min(lim.max_container // 2, _FAST_MAX_MAP))
    except DecodeError:
        raise
    except msgpack.ExtraData:
        raise DecodeError("trailing bytes after the message", reason="malformed") from None
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8 in a string", reason="malformed") from None
    except TypeError:  # an unhashable (map or array) key
        raise DecodeError("map keys must be strings or integers", reason="malformed") from None
    except msgpack.StackError:
        raise DecodeError(f"nesting deeper than {lim.max_depth}", reason="malformed") from None
    except ValueError as e:
        text = str(e)
        if "max_map_len" in text:
            raise _FallBack from None
        if "exceeds max_" in text:
            raise DecodeError(f"a string or container too long: {text}", reason="too_large") from None
        if "incomplete input" in text:
            raise DecodeError("truncated payload", reason="truncated") from None
        raise DecodeError(f"malformed msgpack: {text or type(e).__name__}", reason="malformed") from None
    if type(obj) is _Timestamp:
        raise DecodeError("msgpack ext types are not accepted", reason="malformed")
    return obj


def read_payload(buf: bytes | bytearray | memoryview, limits: ReadLimits | None = None) -> Any:
    """Decode one untrusted payload: the C path for small ones, the zero-copy reader for the rest."""
    if memoryview(buf).nbytes <= FAST_MAX_BYTES:
        try:
            return unpack_fast(buf, limits)
        except _FallBack:
            pass
    return unpack(buf, limits)
