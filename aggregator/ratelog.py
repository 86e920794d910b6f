"""Bounded logging of what the network sends: a hostile device must not be able to fill the disk.

Rejections are logged in full once per (agent, reason) per interval, the rest as one summary
line per interval with counts; an unexpected exception's traceback is logged once per distinct
cause (exception type + innermost source line).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter


class BoundedLog:
    """Log rejections at a bounded rate: the first of each (agent, reason) per interval in full,
    the rest as one summary line per interval with counts ("… suppressed: {agent/reason: n}").

    At most ``max_keys`` distinct keys are remembered per interval; beyond that, counts only.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 1000,
                 clock=time.monotonic) -> None:
        self.log = logger
        self.interval = interval_s
        self.max_keys = max_keys
        self.clock = clock
        self._start = clock()
        self._seen: set[tuple[str, str]] = set()
        self._suppressed: Counter[str] = Counter()
        self._tracebacks: set[tuple] = set()

    def _roll(self, now: float) -> None:
        if now - self._start < self.interval:
            return
        if self._suppressed:
            top = dict(self._suppressed.most_common(20))
            self.log.warning("rejections suppressed in the last %.0fs: %d in total %s", now - self._start,
                             sum(self._suppressed.values()), top)
        self._start = now
        self._seen.clear()
        self._suppressed.clear()

    def reject(self, agent: str | None, reason: str, fmt: str, *args) -> None:
        now = self.clock()
        self._roll(now)
        key = (agent or "?", reason)
        if key in self._seen or len(self._seen) >= self.max_keys:
            self._suppressed[f"{key[0]}/{reason}"] += 1
            return
        self._seen.add(key)
        self.log.warning(fmt + " (further %s from %s logged as counts for %.0fs)", *args, reason, key[0],
                         self.interval)

    def tick(self) -> None:
        self._roll(self.clock())

    def internal(self, what: str, exc: BaseException) -> None:
        """Log an unexpected exception: its traceback once per distinct cause, then one line per interval."""
        tb = traceback.extract_tb(exc.__traceback__)
        last = tb[-1] if tb else None
        cause = (type(exc).__name__, last.filename if last else "", last.lineno if last else 0)
        if cause not in self._tracebacks and len(self._tracebacks) < self.max_keys:
            self._tracebacks.add(cause)
            self.log.error("internal error while %s (counted as 'internal'; traceback logged once per cause)",
                           what, exc_info=exc)
        else:
            self.reject(None, "internal", "internal error while %s: %s: %s", what, type(exc).__name__,
                        str(exc)[:200])
