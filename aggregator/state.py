"""What the aggregator keeps on disk: the checkpoint (state only) and the append-only run history.

The checkpoint (``checkpoint.npz``, replaced atomically and durably by fedmq.broker.storage) holds
what the next round needs and nothing that grows with the run: the next round id, the global
weights and their round, the model id, the strategy/optimizer state and the last history row
(one row, a repair hint). Its cost is O(model), whatever the number of rounds behind it.

The history is ``history.jsonl``: one JSON object per finished round, appended and fsynced before
the checkpoint that makes the round count. ``history.csv`` carries the same facts (lists and dicts,
such as the participants and the rejection counts, as JSON cells); it is derived: appended with each
row, rewritten from the JSON lines when a row brings a new column and on every restore.

Why this order (history append, then checkpoint) cannot duplicate or lose a round: a crash after the
append but before the checkpoint leaves a row for a round the checkpoint does not count
(``round >= next_round``); that round will run again, so restore drops such rows (and a torn last
line, which can only be a row being appended when the process died) and rewrites the file before
anything is appended to it. A checkpoint that exists therefore always has its rows on disk, and
rows are keyed by round (a duplicate keeps its last occurrence).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmq.broker.storage import atomic_write, fsync_dir

__all__ = ["Checkpoint", "HistoryLog", "atomic_write", "write_history"]  # atomic_write: model_store imports it

log = logging.getLogger(__name__)

FORMAT = 2  # 1: history embedded in the checkpoint (still read); 2: state only, history appended


@dataclass
class Checkpoint:
    next_round: int
    global_round: int
    model_id: str
    weights: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    last_row: dict | None = None  #: the history row of round next_round - 1 (repairs a lost history file)
    #: only from a format-1 checkpoint, which embedded the whole history; never written
    legacy_history: list[dict] | None = field(default=None, repr=False)
    run: str = ""  #: the run id every retained message carries ("" in checkpoints older than run ids)
    #: which strategy made ``strategy`` (its state): {"name", "server", "table"}; {} in older checkpoints
    strategy_info: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        meta = {"next_round": self.next_round, "global_round": self.global_round, "model_id": self.model_id,
                "last_row": self.last_row, "format": FORMAT, "run": self.run, "strategy_info": self.strategy_info}
        arrays = {f"g/{k}": v for k, v in self.weights.items()}
        arrays.update({f"s/{k}": np.asarray(v) for k, v in self.strategy.items()})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(path, buf.getbuffer())

    @classmethod
    def load(cls, path: Path) -> "Checkpoint | None":
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            weights = {k[2:]: z[k] for k in z.files if k.startswith("g/")}
            strat = {k[2:]: z[k] for k in z.files if k.startswith("s/")}
        legacy = meta.get("history") if meta.get("format", 1) == 1 else None
        return cls(int(meta["next_round"]), int(meta["global_round"]), str(meta["model_id"]), weights, strat,
                   meta.get("last_row"), legacy, str(meta.get("run", "")), dict(meta.get("strategy_info") or {}))


def _csv_cell(v):
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else v


def _columns(rows, cols: list[str] | None = None) -> list[str]:
    cols = list(cols or [])
    seen = set(cols)
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                cols.append(k)
    return cols


def _csv_text(rows: list[dict], cols: list[str], header: bool) -> str:
    if not cols:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    if header:
        w.writeheader()
    w.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def write_history(rows: list[dict], directory: Path) -> None:
    """Replace both history files with ``rows`` (migration and repair; rounds append with HistoryLog)."""
    atomic_write(directory / "history.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write(directory / "history.csv", _csv_text(rows, _columns(rows), header=True).encode())


class HistoryLog:
    """The append-only history of one state directory (see the module docstring for the crash reasoning)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.jsonl = self.directory / "history.jsonl"
        self.csv = self.directory / "history.csv"
        self.last_round = 0  #: the highest round on disk
        self._cols: list[str] = []

    def append_participants(self, round_no: int, run: str, participants: list[str]) -> None:
        """Append every participant of a closed round to ``participants.jsonl`` (rows elsewhere stay bounded).

        One JSON line per round, appended and fsynced; a round that ran again after a crash appears
        twice: its last line is the one its checkpoint counts.
        """
        line = json.dumps({"round": round_no, "run": run, "participants": participants}) + "\n"
        fd = os.open(self.directory / "participants.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------------------------
    def read(self) -> tuple[list[dict], bool]:
        """The rows on disk keyed by round (in round order) and whether the file needs a rewrite to be clean
        (a torn last line, an unreadable line, a duplicate round or rounds out of order)."""
        try:
            data = self.jsonl.read_bytes()
        except FileNotFoundError:
            return [], False
        lines = data.split(b"\n")
        dirty = False
        if lines and lines[-1] != b"":  # no newline at the end: the append the process died in
            log.warning("%s: dropping a torn last line (%d bytes)", self.jsonl, len(lines[-1]))
            dirty = True
        lines = lines[:-1]
        by_round: dict[int, dict] = {}
        prev = 0
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
                rnd = row["round"]
                if not isinstance(rnd, int) or isinstance(rnd, bool):
                    raise TypeError(f"round {rnd!r}")
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s: line %d unreadable (%s): dropped", self.jsonl, i + 1, e)
                dirty = True
                continue
            if rnd in by_round or rnd <= prev:
                dirty = True  # keyed by round: a later row of the same round replaces the earlier
            by_round[rnd] = row
            prev = max(prev, rnd)
        return [by_round[k] for k in sorted(by_round)], dirty

    def restore(self, ck: Checkpoint | None) -> list[dict]:
        """The history that belongs with ``ck`` (None: a fresh run), with the files made to match it.

        Rows of rounds the checkpoint does not count (``round >= next_round``) are dropped: their round
        runs again. A format-1 checkpoint's embedded history is migrated to the files.
        """
        next_round = ck.next_round if ck is not None else 1
        if ck is not None and ck.legacy_history is not None:
            rows, dirty = [r for r in ck.legacy_history if isinstance(r, dict)], True
            log.info("migrating %d history rows out of a format-1 checkpoint", len(rows))
        else:
            rows, dirty = self.read()
        kept = [r for r in rows if r["round"] < next_round]
        if len(kept) != len(rows):
            log.warning("history: dropping %d row(s) of round(s) >= %d, which the checkpoint does not count",
                        len(rows) - len(kept), next_round)
            dirty = True
        last = ck.last_row if ck is not None else None
        if isinstance(last, dict) and isinstance(last.get("round"), int) and last["round"] < next_round \
                and all(r["round"] != last["round"] for r in kept):
            log.warning("history: the row of round %d was missing: restored from the checkpoint", last["round"])
            kept = [r for r in kept if r["round"] != last["round"]]
            kept.append(last)
            kept.sort(key=lambda r: r["round"])
            dirty = True
        if dirty:
            atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._cols = _columns(kept)
        atomic_write(self.csv, _csv_text(kept, self._cols, header=True).encode())  # derived: always regenerated
        self.last_round = kept[-1]["round"] if kept else 0
        return kept

    # -- appending ---------------------------------------------------------------------------------
    def append(self, row: dict) -> None:
        """Append one round's row to both files; the JSON line is fsynced before this returns."""
        rnd = row["round"]
        if rnd <= self.last_round:
            raise ValueError(f"history already holds round {self.last_round}: cannot append round {rnd}")
        new = not self.jsonl.exists()
        with open(self.jsonl, "ab") as f:
            f.write(json.dumps(row).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.directory)
        self.last_round = rnd
        if any(k not in self._cols for k in row) or not self.csv.exists():
            rows, _ = self.read()  # a new column: the CSV header changes, so derive the whole file again
            self._cols = _columns(rows, self._cols)
            atomic_write(self.csv, _csv_text(rows, self._cols, header=True).encode())
        else:
            with open(self.csv, "a", newline="") as f:
                f.write(_csv_text([row], self._cols, header=False))

    def sync(self, rows: list[dict]) -> None:
        """Append the rows of ``rows`` (in round order) not yet on disk: O(new rows), not O(history)."""
        i = len(rows)
        while i > 0 and rows[i - 1]["round"] > self.last_round:
            i -= 1
        for r in rows[i:]:
            self.append(r)
