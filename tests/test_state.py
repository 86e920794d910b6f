"""The aggregator's disk state: a checkpoint of O(model) bytes and an append-only history keyed by round."""

from __future__ import annotations

import csv
import json
import types

import numpy as np
import pytest

from fedmq.aggregator import state as state_mod
from fedmq.aggregator.state import Checkpoint, HistoryLog, write_history


def _row(rnd: int, **extra) -> dict:
    """A history row shaped like the service's (scalars, a participants list, a rejection-count dict)."""
    return {"round": rnd, "outcome": "aggregated", "reason": "", "ts": 1.7e9 + rnd, "participants": 2.0,
            "asked": 2.0, "bytes_received": 1234.0 * rnd, "duration_s": 0.5, "global_round": float(rnd),
            "participants_list": ["agent-a", "agent-b"], "rejected": {"stale": rnd % 3, "wrong_model": 1}, **extra}


def _weights(n: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"dense/kernel": rng.standard_normal((n // 10, 10)).astype(np.float32),
            "dense/bias": rng.standard_normal(10).astype(np.float32)}


def _ck(next_round: int, last_row: dict | None = None, n: int = 1000) -> Checkpoint:
    return Checkpoint(next_round, next_round - 1, "model-x", _weights(n),
                      {"server/m": np.arange(4, dtype=np.float64), "rounds_done": np.array(next_round - 1)}, last_row)


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_facts(csv_row: dict, row: dict) -> None:
    """A CSV row carries every fact of its JSON row: numbers equal, lists/dicts as JSON cells."""
    assert set(k for k, v in csv_row.items() if v != "") >= {k for k, v in row.items() if v != ""}
    for k, v in row.items():
        cell = csv_row[k]
        if isinstance(v, (list, dict)):
            assert json.loads(cell) == v, k
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            assert float(cell) == pytest.approx(v, rel=1e-15), k
        else:
            assert cell == str(v), k


def test_checkpoint_round_trip(tmp_path):
    last = _row(4)
    ck = _ck(5, last)
    ck.save(tmp_path / "checkpoint.npz")
    got = Checkpoint.load(tmp_path / "checkpoint.npz")
    assert (got.next_round, got.global_round, got.model_id, got.last_row) == (5, 4, "model-x", last)
    assert got.legacy_history is None
    assert set(got.weights) == set(ck.weights) and set(got.strategy) == set(ck.strategy)
    for k in ck.weights:
        assert got.weights[k].dtype == ck.weights[k].dtype
        np.testing.assert_array_equal(got.weights[k], ck.weights[k])
    for k in ck.strategy:
        np.testing.assert_array_equal(got.strategy[k], ck.strategy[k])
    assert Checkpoint.load(tmp_path / "absent.npz") is None


def test_history_round_trip_and_csv_carries_the_same_facts(tmp_path):
    h = HistoryLog(tmp_path)
    assert h.restore(None) == []
    rows = [_row(1), _row(2, outcome="abandoned", reason="1/2 updates by the deadline"), _row(3)]
    for r in rows:
        h.append(r)
    # a row with new columns (an eval metric, a new rejection reason) arrives later: the CSV header grows
    rows.append(_row(4, eval_accuracy=0.8125, rejected={"stale": 0, "rate_limited": 7}))
    h.append(rows[-1])
    rows.append(_row(5))
    h.append(rows[-1])
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    got = _csv_rows(tmp_path / "history.csv")
    assert len(got) == len(rows)
    for c, r in zip(got, rows):
        _same_facts(c, r)
    assert got[0]["eval_accuracy"] == ""  # a column a row does not have stays empty
    # restore (a restart) returns the same rows and regenerates the same CSV
    h2 = HistoryLog(tmp_path)
    assert h2.restore(_ck(6, rows[-1])) == rows
    assert _csv_rows(tmp_path / "history.csv") == got
    assert h2.last_round == 5


def test_torn_last_line_is_dropped_and_the_next_append_is_clean(tmp_path):
    h = HistoryLog(tmp_path)
    h.restore(None)
    for r in range(1, 4):
        h.append(_row(r))
    ck = _ck(4, _row(3))
    torn = (json.dumps(_row(4)) + "\n").encode()[:57]  # the process died while appending round 4
    with open(tmp_path / "history.jsonl", "ab") as f:
        f.write(torn)
    h2 = HistoryLog(tmp_path)
    assert [r["round"] for r in h2.restore(ck)] == [1, 2, 3]
    assert not (tmp_path / "history.jsonl").read_bytes().endswith(torn)  # cut before anything is appended
    h2.append(_row(4))
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4]  # every line parses: no glued fragment
    assert [int(r["round"]) for r in _csv_rows(tmp_path / "history.csv")] == [1, 2, 3, 4]


def test_unreadable_middle_line_is_dropped_not_fatal(tmp_path):
    lines = [json.dumps(_row(1)), "{not json", json.dumps({"no_round": 1}), json.dumps({"round": "2"}),
             json.dumps(_row(2))]
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + "\n")
    assert [r["round"] for r in HistoryLog(tmp_path).restore(_ck(3, _row(2)))] == [1, 2]
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2


def test_round_appended_without_its_checkpoint_is_not_duplicated(tmp_path):
    """Write order is history append, then checkpoint: a kill between the two leaves round 3 in the
    history only. The restart runs round 3 again; the history must then hold round 3 once (the re-run's)."""
    h = HistoryLog(tmp_path)
    h.restore(None)
    for r in (1, 2):
        h.append(_row(r))
        _ck(r + 1, _row(r)).save(tmp_path / "checkpoint.npz")
    h.append(_row(3, participants=1.0))  # ... and the process is killed before its checkpoint
    ck = Checkpoint.load(tmp_path / "checkpoint.npz")
    assert ck.next_round == 3
    h2 = HistoryLog(tmp_path)
    assert [r["round"] for r in h2.restore(ck)] == [1, 2]
    h2.append(_row(3, participants=2.0))  # the re-run of round 3
    rows, dirty = h2.read()
    assert [r["round"] for r in rows] == [1, 2, 3] and not dirty
    assert rows[-1]["participants"] == 2.0
    assert [int(r["round"]) for r in _csv_rows(tmp_path / "history.csv")] == [1, 2, 3]
    with pytest.raises(ValueError, match="already holds round 3"):
        h2.append(_row(3))


def test_duplicate_rows_on_disk_are_keyed_by_round(tmp_path):
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                    [_row(1), _row(2, participants=1.0), _row(2, participants=2.0)]))
    rows = HistoryLog(tmp_path).restore(_ck(3, _row(2, participants=2.0)))
    assert [(r["round"], r["participants"]) for r in rows] == [(1, 2.0), (2, 2.0)]
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2


def test_lost_history_file_gets_the_checkpoints_last_row_back(tmp_path):
    h = HistoryLog(tmp_path)
    h.restore(None)
    for r in (1, 2, 3):
        h.append(_row(r))
    (tmp_path / "history.jsonl").unlink()
    rows = HistoryLog(tmp_path).restore(_ck(4, _row(3)))
    assert [r["round"] for r in rows] == [3]


def test_fresh_run_starts_an_empty_history(tmp_path):
    write_history([_row(1), _row(2)], tmp_path)
    assert HistoryLog(tmp_path).restore(None) == []
    assert (tmp_path / "history.jsonl").read_text() == ""


def test_format_1_checkpoint_with_embedded_history_is_migrated(tmp_path):
    """An old checkpoint (history inside, format 1) still loads; its rows move to the append-only file."""
    import io

    old_rows = [_row(1), _row(2)]
    meta = {"next_round": 3, "global_round": 2, "model_id": "model-x", "history": old_rows, "format": 1}
    arrays = {f"g/{k}": v for k, v in _weights().items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "checkpoint.npz").write_bytes(buf.getvalue())
    ck = Checkpoint.load(tmp_path / "checkpoint.npz")
    assert ck.legacy_history == old_rows and ck.next_round == 3
    assert HistoryLog(tmp_path).restore(ck) == old_rows
    assert [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()] == old_rows
    Checkpoint(3, 2, "model-x", ck.weights, ck.strategy, old_rows[-1]).save(tmp_path / "checkpoint.npz")
    assert Checkpoint.load(tmp_path / "checkpoint.npz").legacy_history is None


def test_checkpoint_size_is_independent_of_history_length(tmp_path):
    """O(model): the checkpoint after 10,000 rounds is the size of the one after 10 (same model)."""
    model_bytes = sum(a.nbytes for a in _weights(20_000).values())
    sizes = {}
    for n in (10, 10_000):
        d = tmp_path / str(n)
        d.mkdir()
        h = HistoryLog(d)
        h.restore(None)
        rows = [_row(r) for r in range(1, n + 1)]
        h.sync(rows)  # appends all; a second sync appends nothing
        h.sync(rows)
        assert len((d / "history.jsonl").read_text().splitlines()) == n
        _ck(n + 1, rows[-1], n=20_000).save(d / "checkpoint.npz")
        sizes[n] = (d / "checkpoint.npz").stat().st_size
    assert model_bytes < sizes[10] < model_bytes + 8192
    assert abs(sizes[10_000] - sizes[10]) < 64  # only the digits of the round numbers differ


def test_sync_appends_only_new_rows(tmp_path, monkeypatch):
    h = HistoryLog(tmp_path)
    h.restore(None)
    rows = [_row(r) for r in range(1, 6)]
    h.sync(rows)
    appended = []
    real = HistoryLog.append
    monkeypatch.setattr(HistoryLog, "append", lambda self, r: (appended.append(r["round"]), real(self, r)))
    rows.append(_row(6))
    h.sync(rows)
    assert appended == [6]


# -- the service's own _checkpoint/_restore (no network: the client is never used) --------------------
def _service(tmp_path):
    from fedmq.aggregator.config import load_config
    from fedmq.aggregator.service import AggregatorService

    cfg = load_config(None, {"service": {"state_dir": str(tmp_path / "state")}})
    served = types.SimpleNamespace(model_id="model-x", initial_weights=lambda: _weights())
    svc = AggregatorService(cfg, client=types.SimpleNamespace(), served=served)
    svc._restore()
    return svc


def _run_round(svc, rnd: int, participants: float = 2.0) -> None:
    """What _close_round does to the state: a new global, a history row, the next round, a checkpoint."""
    svc.global_weights = {k: v + 1 for k, v in svc.global_weights.items()}
    svc.global_round = rnd
    svc.history.append(_row(rnd, participants=participants))
    svc.next_round = rnd + 1
    svc._checkpoint()


def test_service_kill_between_history_and_checkpoint_reruns_the_round_once(tmp_path, monkeypatch):
    svc = _service(tmp_path)
    for r in (1, 2):
        _run_round(svc, r)
    w2 = {k: v.copy() for k, v in svc.global_weights.items()}

    def killed(self, path):
        raise KeyboardInterrupt("SIGKILL stand-in: the process dies after the history append")

    monkeypatch.setattr(state_mod.Checkpoint, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _run_round(svc, 3, participants=1.0)
    monkeypatch.undo()
    assert [json.loads(x)["round"] for x in (tmp_path / "state/history.jsonl").read_text().splitlines()] == [1, 2, 3]
    svc2 = _service(tmp_path)  # the restart
    assert (svc2.next_round, svc2.global_round) == (3, 2)
    assert [h["round"] for h in svc2.history] == [1, 2]
    for k in w2:
        np.testing.assert_array_equal(svc2.global_weights[k], w2[k])
    _run_round(svc2, 3, participants=2.0)
    svc3 = _service(tmp_path)
    assert [(h["round"], h["participants"]) for h in svc3.history] == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert svc3.next_round == 4
    ck = Checkpoint.load(tmp_path / "state/checkpoint.npz")
    assert ck.last_row["round"] == 3 and ck.legacy_history is None
