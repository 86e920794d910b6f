"""Finished updates on disk until their round closes, keyed by run, model and round.

paho keeps unacknowledged publishes in memory only: if the agent dies after training, the
update would be lost. Each finished update is written (atomically) before it is published and
kept until its round closes (a newer global model or announcement of the same run): after an
agent restart, or an aggregator restart that re-opens the round, it is re-sent instead of being
trained again. An entry is re-sent only into the round it was made for: same run, same model id,
same round and same base round; an entry of another run or model is dropped, never sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedmq.broker.storage import atomic_write

_NAME = re.compile(r"r(\d{8})-([0-9a-f]{8,64})-([0-9a-f]{8,64})-b(\d{8})\.msgpack\Z")


@dataclass(frozen=True)
class OutboxKey:
    run: str
    model_id: str
    round: int
    base_round: int

    def filename(self) -> str:
        return f"r{self.round:08d}-{self.run}-{self.model_id}-b{self.base_round:08d}.msgpack"


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob("round-*.msgpack"):  # the old layout (round number only): unusable, dropped
            p.unlink(missing_ok=True)

    def keys(self) -> list[OutboxKey]:
        out = []
        for p in self.dir.glob("r*.msgpack"):
            m = _NAME.match(p.name)
            if m:
                out.append(OutboxKey(m.group(2), m.group(3), int(m.group(1)), int(m.group(4))))
        return sorted(out, key=lambda k: k.round)

    def put(self, key: OutboxKey, payload: bytes) -> None:
        atomic_write(self.dir / key.filename(), payload)

    def get(self, key: OutboxKey) -> bytes | None:
        p = self.dir / key.filename()
        return p.read_bytes() if p.is_file() else None

    def drop(self, key: OutboxKey) -> None:
        (self.dir / key.filename()).unlink(missing_ok=True)

    def drop_other_runs(self, run: str, model_id: str | None = None) -> int:
        """Drop entries of any other run (or, given ``model_id``, of another model); return how many."""
        n = 0
        for k in self.keys():
            if k.run != run or (model_id is not None and k.model_id != model_id):
                self.drop(k)
                n += 1
        return n

    def drop_before(self, run: str, round_no: int) -> None:
        """Rounds of ``run`` below ``round_no`` are closed: their entries can never count."""
        for k in self.keys():
            if k.run == run and k.round < round_no:
                self.drop(k)
