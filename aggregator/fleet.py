"""The fleet table: what the aggregator knows of every device, for the operator (status, HTTP, dashboard).

One ``Device`` row per agent that ever sent a valid status or update (bounded by the broker's
users: the ACL only lets provisioned devices write). Rows are updated in O(1) per message by the
protocol thread and read as snapshots by the HTTP thread (one lock, held for a dict copy).

Exclusion: a device whose updates for a round were all refused, ``exclude_after`` rounds in a row,
or that reports an error in its status (its data does not fit the model, the model is refused),
is marked ``excluded`` and is not asked again until it reports ready (a later status without an
error: a restart, a reconnect, or the next presence re-sync after it fixed itself).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from operator import attrgetter
from pathlib import Path
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

#: rejections that say the device's update itself is wrong (content, not timing): only these count
#: towards exclusion. Timing and delivery (late, future, stale, stale_base after a restart, no_open_round,
#: duplicate, wrong_run, not_asked), limits (rate_limited, too_many) and our own bugs (internal) never do.
#: ``norm_outlier`` is not one: it is a statistical judgement (k x the median norm) that an honest device
#: with unusual data can get several rounds in a row (seen in the chaos run); the guard still refuses it.
DEVICE_FAULTS = frozenset({"wrong_model", "bad_tensors", "non_finite", "bad_weight", "zero_weight",
                           "missing_quality", "bad_quality"})
REPORTED_ERROR = "reported error"
MAX_REASONS = 64  # distinct reason labels kept per device (labels come from fedmq.broker.contract.reasons)


@dataclass(slots=True)  # ~40 % smaller rows: a 10,000-device table is per-device state the aggregator keeps
class Device:
    agent: str
    state: str = "unknown"  # the last status: online | idle | training | error | offline
    runtime: str = ""
    interpreter: str = ""
    version: str = ""
    num_samples: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0  # wall time of its last valid status or update
    rounds_asked: int = 0
    rounds_contributed: int = 0
    last_round: int = 0  # the last round its update counted in
    refused_streak: int = 0  # rounds in a row in which it sent updates and none counted
    last_rejection: str = ""
    rejections: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    excluded: str = ""  # "" or why it is not asked
    excluded_at: float = 0.0
    # per round (not exported): did it send something refused / accepted in the open round
    _refused: bool = False
    _accepted: bool = False

    @property
    def online(self) -> bool:
        return self.state not in ("offline", "unknown")

    def to_json(self) -> dict:
        # field by field, not dataclasses.asdict (a deep copy: ~2 s per save of a 10,000-device table,
        # on the protocol thread; this is ~40x faster)
        d = {k: getattr(self, k) for k in _EXPORTED}
        d["rejections"] = dict(self.rejections)
        d["online"] = self.online
        return d


#: the fields a device row shows (the per-round ``_`` flags are not exported)
_EXPORTED = tuple(f.name for f in fields(Device) if not f.name.startswith("_"))


def _rows(f: IO[bytes]) -> Iterator[Any]:
    """The ``devices`` rows of a fleet.json, one line at a time when it has the layout ``save`` writes."""
    first = f.readline()
    if not first.rstrip().endswith(b'"devices":['):
        try:
            doc = json.loads(first + f.read())
        except ValueError:
            return
        yield from (doc.get("devices", []) if isinstance(doc, dict) else [])
        return
    for line in f:
        line = line.strip()
        if line in (b"", b"]}"):
            continue
        try:
            yield json.loads(line.rstrip(b","))
        except ValueError:  # a torn or edited line: that row is skipped, the others restored
            continue


class FleetTable:
    """Every known device; O(1) work per status, update and asked device."""

    def __init__(self, exclude_after: int = 3) -> None:
        self.exclude_after = exclude_after  # 0: never exclude for refused updates
        self.devices: dict[str, Device] = {}
        self.excluded: set[str] = set()  # ids of excluded devices: per-tick and per-round work is O(excluded)
        self.lock = threading.Lock()

    def _get(self, agent: str, now: float) -> Device:
        d = self.devices.get(agent)
        if d is None:
            d = self.devices[agent] = Device(agent, first_seen=now)
        return d

    def _exclude(self, d: Device, why: str, now: float) -> None:
        d.excluded, d.excluded_at = why, now
        self.excluded.add(d.agent)

    def _readmit(self, d: Device, streak: int = 0) -> None:
        d.excluded, d.refused_streak = "", streak
        self.excluded.discard(d.agent)

    # -- the protocol thread ------------------------------------------------------------------
    def on_status(self, agent: str, state: str, runtime: str, interpreter: str, version: str, num_samples: int,
                  error: str, now: float, retained: bool = False) -> None:
        """A valid status. A retained one is an old report (replayed at our connect): it updates the row
        but never re-admits an excluded device."""
        with self.lock:
            d = self._get(agent, now)
            was = d.state
            # interned: a fleet reports a handful of distinct states, runtimes and versions, each decoded anew
            # per status (the lengths are bounded by the schema)
            d.state, d.last_seen = sys.intern(state), now
            if state != "offline":
                d.runtime, d.interpreter, d.version = sys.intern(runtime), sys.intern(interpreter), sys.intern(version)
                d.num_samples = num_samples
            if error:
                d.last_error = error
                if d.excluded != REPORTED_ERROR:
                    log.warning("device %s reports an error and is no longer asked until it reports ready: %s",
                                agent, error[:200])
                self._exclude(d, REPORTED_ERROR, now)
                return
            if not d.excluded or retained or state not in ("online", "idle"):
                return
            # ready again: an error it reported is gone, or (refused updates) it restarted or reconnected
            if d.excluded == REPORTED_ERROR or was == "offline":
                log.info("device %s reports ready again (was excluded: %s)", agent, d.excluded)
                self._readmit(d)

    def readmit_expired(self, now: float, after_s: float) -> None:
        """Probation: a device excluded for refused updates is asked again after ``after_s`` (0 = never);
        one more refused round excludes it again."""
        if after_s <= 0:
            return
        with self.lock:
            for a in list(self.excluded):
                d = self.devices[a]
                if d.excluded != REPORTED_ERROR and now - d.excluded_at >= after_s:
                    self._readmit(d, max(0, self.exclude_after - 1))
                    log.info("device %s: exclusion over after %.0fs (probation: one more refused round excludes "
                             "it again)", d.agent, after_s)

    def on_update(self, agent: str, reason: str | None, now: float) -> None:
        with self.lock:
            d = self._get(agent, now)
            d.last_seen = now
            if reason is None:
                d._accepted = True
                return
            d.rejections[reason] += 1
            if len(d.rejections) > MAX_REASONS:
                del d.rejections[min(d.rejections, key=d.rejections.__getitem__)]
            d.last_rejection = reason
            if reason in DEVICE_FAULTS:
                d._refused = True

    def on_open(self, asked: list[str]) -> None:
        with self.lock:
            for a in asked:
                d = self._get(a, time.time())
                d.rounds_asked += 1
                d._refused = d._accepted = False

    def on_close(self, round_no: int, asked: list[str], participants: list[str]) -> list[str]:
        """Count the round for its asked devices; return the ones excluded now."""
        newly: list[str] = []
        with self.lock:
            for a in participants:
                d = self._get(a, time.time())
                d.rounds_contributed += 1
                d.last_round = round_no
            for a in asked:
                d = self.devices.get(a)
                if d is None:
                    continue
                if d._accepted:
                    d.refused_streak = 0
                elif d._refused:
                    d.refused_streak += 1
                    if self.exclude_after and d.refused_streak >= self.exclude_after and not d.excluded:
                        self._exclude(d, f"updates refused {d.refused_streak} rounds in a row (last: "
                                      f"{d.last_rejection})", time.time())
                        newly.append(a)
                d._refused = d._accepted = False
        for a in newly:
            log.warning("device %s excluded: %s; it is asked again once it reports ready (a restart or reconnect)",
                        a, self.devices[a].excluded)
        return newly

    def is_excluded(self, agent: str) -> bool:
        return agent in self.excluded

    # -- readers (any thread) -------------------------------------------------------------------
    def snapshot(self) -> list[dict]:
        with self.lock:
            rows = [d.to_json() for d in self.devices.values()]
        rows.sort(key=lambda r: r["agent"])
        return rows

    def counts(self) -> dict:
        with self.lock:
            states = Counter(d.state for d in self.devices.values())
            excluded = sum(1 for d in self.devices.values() if d.excluded)
            online = sum(1 for d in self.devices.values() if d.online)
        return {"known": len(self.devices), "online": online, "excluded": excluded, "states": dict(states)}

    # -- persistence (so `fedmq-aggregator status` can read it with no service running) --------
    def save(self, path: Path, extra: dict | None = None) -> None:
        """``{"ts": ..., **extra, "devices": [rows sorted by id]}``, one row per line (one JSON document
        all the same), written row batch by row batch: the whole table is never one list of dicts and
        one string in memory (at 10,000 devices that was a peak of ~36 MB of RSS every 30 s), and
        ``load`` reads it back a line at a time. Called on the protocol thread, the only writer of the rows."""
        from fedmq.broker.storage import atomic_write

        atomic_write(path, self._json_chunks(extra))

    def _json_chunks(self, extra: dict | None, batch: int = 256) -> Iterator[bytes]:
        with self.lock:
            devices = sorted(self.devices.values(), key=attrgetter("agent"))
        head = json.dumps({"ts": time.time(), **(extra or {})}, separators=(",", ":"))
        yield (head[:-1] + ',"devices":[\n').encode()
        for i in range(0, len(devices), batch):
            rows = ",\n".join(json.dumps(d.to_json(), separators=(",", ":")) for d in devices[i:i + batch])
            yield ((i and ",\n" or "") + rows).encode()
        yield b"\n]}\n"

    def load(self, path: Path) -> None:
        """Restore counters of a previous process (states are not restored: statuses re-arrive).

        Row by row from the one-row-per-line layout ``save`` writes (a 10,000-device file parsed whole
        cost a 15 MB peak at every restart); a file in another layout (an older one) is parsed whole."""
        try:
            f = path.open("rb")
        except OSError:
            return
        with f, self.lock:
            for r in _rows(f):
                if not isinstance(r, dict) or not isinstance(r.get("agent"), str):
                    continue
                d = self._get(sys.intern(r["agent"]), float(r.get("first_seen", 0.0) or 0.0))
                for k in ("runtime", "interpreter", "version", "last_rejection", "last_error", "excluded"):
                    if isinstance(r.get(k), str):
                        setattr(d, k, sys.intern(r[k]) if k in ("runtime", "interpreter", "version") else r[k])
                for k in ("num_samples", "rounds_asked", "rounds_contributed", "last_round", "refused_streak"):
                    if isinstance(r.get(k), int):
                        setattr(d, k, r[k])
                if isinstance(r.get("last_seen"), (int, float)):
                    d.last_seen = float(r["last_seen"])
                if isinstance(r.get("rejections"), dict):
                    d.rejections = Counter({str(k): int(v) for k, v in r["rejections"].items()
                                            if isinstance(v, int)})
                if isinstance(r.get("excluded_at"), (int, float)):
                    d.excluded_at = float(r["excluded_at"])
                if d.excluded:
                    self.excluded.add(d.agent)
                d.state = "unknown"  # until its status arrives again (a replayed retained status is no restart)
