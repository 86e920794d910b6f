"""Durable file writes: the one way fedmq replaces a file on disk.

Checkpoints, the agent's outbox, its error-feedback residual and its model cache must survive a
crash or power loss at any instant as either the old or the new file, never a torn one. So a
write goes to a temporary file in the same directory, is fsynced, renamed over the target
(atomic on POSIX) and the directory is fsynced so the rename itself is on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | bytearray | memoryview | Iterable[bytes],
                 mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` (bytes, or an iterable of byte chunks written in turn, so that a
    large file need not be one buffer) atomically and durably; returns the path.

    ``mode``: the new file's permission bits (0o600 for secrets: the temporary file is created
    with them, so the data is never readable by others, even for an instant). ``None`` keeps the
    mode of the file being replaced, or 0o644 for a new file. On any failure the temporary file
    is removed and the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600; exactly ``mode``, whatever the umask
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
