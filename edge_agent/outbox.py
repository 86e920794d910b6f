"""Finished updates on disk until the broker acknowledged them (or their round closed).

paho keeps unacknowledged publishes in memory only: if the agent dies after training, the
update would be lost. Each finished update is written (atomically) before it is published and
kept until its round closes (a newer global model or announcement): after an agent restart, or
an aggregator restart that re-opens the round, it is re-sent instead of being trained again.
"""

from __future__ import annotations

from pathlib import Path

from fedmq.broker.storage import atomic_write


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, round_no: int) -> Path:
        return self.dir / f"round-{round_no:08d}.msgpack"

    def put(self, round_no: int, payload: bytes) -> None:
        atomic_write(self._path(round_no), payload)

    def get(self, round_no: int) -> bytes | None:
        p = self._path(round_no)
        return p.read_bytes() if p.is_file() else None

    def drop_before(self, round_no: int) -> None:
        for p in self.dir.glob("round-*.msgpack"):
            if int(p.stem.split("-")[1]) < round_no:
                p.unlink(missing_ok=True)
