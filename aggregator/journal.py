"""The open round's journal: what a restarted aggregator needs to go on with the round it was in.

A receipt says "the aggregator holds your update", and the agent stops re-sending. Without a journal
the round lived in memory only: a crash lost every accepted update, and the restarted process had to
open the round afresh and have the whole fleet re-send (10,000 updates in one burst). With it, the
round survives the process: ``round.journal`` in the state directory holds the announcement, the
asked agents, and each accepted update's encoded bytes, written before its receipt is sent and before
its MQTT acknowledgement (``[service] journal``: ``fsync`` also makes them durable on disk before
either; ``write`` survives a process crash, not a host crash; ``off`` keeps the old behaviour).

Layout: ``MAGIC``, then records ``kind (1 byte) | length (u32 LE) | crc32 (u32 LE) | body``: one
``H`` (header: msgpack map), then ``U`` (an update's encoded message) and ``D`` (a new deadline,
msgpack float: a deadline extension). A torn or corrupt tail (the process died in a write) ends the
replay; the file is cut there before anything is appended. The journal is removed once the round's
checkpoint is written (aggregated) or the round is abandoned; one whose round the checkpoint already
counts, or of another run or model, is stale and removed at start.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from fedmq.broker.storage import fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"FEDMQ-ROUND-JOURNAL-1\n"
_REC = struct.Struct("<cII")
MAX_RECORD = 1 << 31  # larger than any update the decode limits admit; a longer length is corruption
MAX_HEADER = 64 << 20  # the header: the announcement and the asked ids (~1.2 MB at 100,000 devices)
MODES = ("fsync", "write", "off")


@dataclass
class JournalRecord:
    kind: bytes  #: b"U" (an update's encoded bytes) or b"D" (a new deadline)
    body: bytes


class RoundJournal:
    """Append-only journal of the open round (see the module docstring)."""

    def __init__(self, path: Path, mode: str = "fsync") -> None:
        if mode not in MODES:
            raise ValueError(f"journal mode must be one of {MODES}, not {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._fd: int | None = None
        self._dirty = False
        self.records = 0  #: records appended or replayed in the current round
        self.syncs = 0

    @property
    def active(self) -> bool:
        return self._fd is not None

    def begin(self, header: dict) -> None:
        """Start the journal of a new round (replacing any other), durably: header, fsync, dir fsync."""
        self.close()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._write(fd, MAGIC, None)
            body = msgpack.packb(header, use_bin_type=True)
            self._write(fd, _REC.pack(b"H", len(body), zlib.crc32(body)), body)
            os.fsync(fd)
            fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._dirty, self.records = fd, False, 0

    def append(self, kind: bytes, body: bytes | bytearray | memoryview) -> None:
        """Append one record (written to the kernel now; on disk at the next ``sync`` in fsync mode)."""
        if self._fd is None:
            raise RuntimeError("no open journal")
        n = memoryview(body).nbytes
        self._write(self._fd, _REC.pack(kind, n, zlib.crc32(body)), body)
        self._dirty = True
        self.records += 1

    def sync(self) -> bool:
        """Make what was appended durable (fsync mode; one fdatasync for a whole batch). True if it synced."""
        if self._fd is None or not self._dirty:
            return False
        self._dirty = False
        if self.mode == "fsync":
            os.fdatasync(self._fd)
            self.syncs += 1
            return True
        return False

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def discard(self) -> None:
        """The round is over (checkpointed or abandoned): remove its journal."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _write(fd: int, head: bytes, body) -> None:
        parts = [memoryview(head)] + ([memoryview(body).cast("B")] if body is not None else [])
        while parts:
            n = os.writev(fd, parts)
            while parts and n >= parts[0].nbytes:
                n -= parts[0].nbytes
                parts.pop(0)
            if parts and n:
                parts[0] = parts[0][n:]

    # -- reading back --------------------------------------------------------------------------
    def read_header(self) -> tuple[dict, int] | None:
        """The header of the journal on disk and the offset after it; None if there is none or it is unreadable."""
        try:
            with open(self.path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                rec = _read_record(f, MAX_HEADER)
                if rec is None or rec.kind != b"H":
                    return None
                header = msgpack.unpackb(rec.body, raw=False)
                return (header, f.tell()) if isinstance(header, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, MemoryError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            log.warning("round journal %s unreadable: %s", self.path, e)
            return None

    def replay(self, offset: int) -> Iterator[JournalRecord]:
        """The records after the header, one at a time (an update's bytes are read when it is its turn).
        When the iteration ends, the journal is open for appending after the last whole record."""
        good = offset
        with open(self.path, "rb") as f:
            f.seek(offset)
            while True:
                rec = _read_record(f)
                if rec is None:
                    break
                good = f.tell()
                self.records += 1
                yield rec
        size = self.path.stat().st_size
        fd = os.open(self.path, os.O_WRONLY)
        if size > good:
            log.warning("round journal %s: %d bytes of a torn last record cut (the process died writing it; "
                        "its update had no receipt)", self.path, size - good)
            os.ftruncate(fd, good)
        if self.mode == "fsync":  # the dead process may have written records it never synced: the receipts
            os.fsync(fd)          # sent again for them (and the redelivered copies' acks) must not be ahead
        os.lseek(fd, good, os.SEEK_SET)
        self._fd, self._dirty = fd, False


def boot_id() -> str:
    """This boot of the host (Linux; "" elsewhere): a ``write``-mode journal of another boot may have lost
    records its receipts vouched for (they were in the page cache only), so it is not taken back."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_record(f, limit: int = MAX_RECORD) -> JournalRecord | None:
    head = f.read(_REC.size)
    if len(head) < _REC.size:
        return None
    kind, n, crc = _REC.unpack(head)
    if kind not in (b"H", b"U", b"D") or n > limit:
        return None
    body = f.read(n)
    if len(body) < n or zlib.crc32(body) != crc:
        return None
    return JournalRecord(kind, body)
