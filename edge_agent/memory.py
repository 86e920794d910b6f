"""Process-level memory settings for small devices.

``limit_heap_growth`` makes glibc serve every allocation above 128 KiB with its own mmap and
give it back on free. By default glibc raises that threshold after the first large free, so
model-size buffers (weights, deltas, payloads: megabytes each, allocated every round) end up
on the heap and the process's RSS stays at its high-water mark. Measured on the FedAvg CNN
(bench/agent_footprint): about -6 MB of peak RSS. No effect (and no error) off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def limit_heap_growth(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes; True when applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    log.debug("glibc mmap/trim thresholds fixed at %d bytes: %s", threshold, ok)
    return ok


def trim_heap() -> None:
    """Give free heap memory back to the OS (glibc ``malloc_trim(0)``): after a round, the buffers it
    freed below the mmap threshold (many small ones add up) leave the process's RSS. No-op off glibc."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            if _libc and not hasattr(_libc, "malloc_trim"):
                _libc = False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def note(what: str) -> None:
    """Log (at DEBUG) the process's RSS and its peak at a point of the round: where a device's memory goes,
    with ``fedmq-agent run -v``. Linux only (``/proc/self/status``); elsewhere silent."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    try:
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    except (OSError, ValueError):
        return
    log.debug("memory %s: RSS %.1f MB, peak %.1f MB", what, kb.get("VmRSS", 0) / 1024, kb.get("VmHWM", 0) / 1024)
