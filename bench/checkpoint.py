"""Per-round checkpoint cost with 10 vs 10,000 rounds of history behind it (issue 13 point 6).

"now": what the service's _checkpoint does today (aggregator/state.py): append the round's row to
history.jsonl/history.csv (fsynced), then write the state-only checkpoint (fedmq.broker.storage).
"format 1": the former way, re-implemented here for comparison: the whole history embedded in the
checkpoint and both history files rewritten every round. Median wall time of one round's checkpoint
(fsyncs included, so the disk matters) and the bytes it writes.

    .venv/bin/python bench/checkpoint.py [--params 200000] [--repeat 15] [--write-results]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, now  # noqa: E402

from fedmq.aggregator.state import Checkpoint, HistoryLog, write_history  # noqa: E402
from fedmq.broker.storage import atomic_write  # noqa: E402


def row(r: int) -> dict:
    return {"round": r, "outcome": "aggregated", "reason": "", "ts": 1.7e9 + r, "participants": 4.0, "asked": 4.0,
            "bytes_received": 3.2e6, "duration_s": 2.5, "global_round": float(r), "eval_loss": 0.41,
            "eval_accuracy": 0.87, "participants_list": [f"agent-{i:03d}" for i in range(4)],
            "rejected": {"stale": 1, "wrong_model": 0}}


def save_format1(path: Path, ck: Checkpoint, history: list[dict]) -> None:
    meta = {"next_round": ck.next_round, "global_round": ck.global_round, "model_id": ck.model_id,
            "history": history, "format": 1}
    arrays = {f"g/{k}": v for k, v in ck.weights.items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
    write_history(history, path.parent)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def measure(kind: str, n_hist: int, weights: dict, repeat: int) -> tuple[list[float], int]:
    """(seconds of each round's checkpoint, bytes written by one) with ``n_hist`` rounds behind it."""
    with tempfile.TemporaryDirectory(prefix="fedmq-ckbench-") as tmp:
        d = Path(tmp)
        hist = [row(r) for r in range(1, n_hist + 1)]
        log = HistoryLog(d)
        if kind == "now":
            write_history(hist, d)
            log.restore(Checkpoint(n_hist + 1, n_hist, "m", weights, {}, hist[-1]))
        times, written = [], 0
        for i in range(repeat + 2):
            r = n_hist + 1 + i
            hist.append(row(r))
            ck = Checkpoint(r + 1, r, "m", weights, {}, hist[-1])
            before = (d / "history.jsonl").stat().st_size if (d / "history.jsonl").exists() else 0
            t = time.perf_counter()
            if kind == "now":
                log.sync(hist)
                ck.save(d / "checkpoint.npz")
            else:
                save_format1(d / "checkpoint.npz", ck, hist)
            dt = time.perf_counter() - t
            if i >= 2:  # two warm-up rounds
                times.append(dt)
            if kind == "now":
                jl = (d / "history.jsonl").stat().st_size - before
                written = (d / "checkpoint.npz").stat().st_size + 2 * jl  # jsonl line + csv line (about the same)
            else:
                written = dir_bytes(d)
        return times, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=200_000, help="float32 parameters in the model (800 KB)")
    ap.add_argument("--repeat", type=int, default=15, help="rounds per trial")
    ap.add_argument("--trials", type=int, default=3, help="interleaved trials (fsync times drift with disk load)")
    ap.add_argument("--write-results", action="store_true", help="append a section to bench/RESULTS.md")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = {"dense/kernel": rng.standard_normal(a.params - 100).astype(np.float32),
               "dense/bias": rng.standard_normal(100).astype(np.float32)}
    lines = [f"## bench/checkpoint — {now()}", "", f"Machine: {machine()}. Model {a.params:,} float32 parameters "
             f"({a.params * 4 / 1e6:.1f} MB); median over {a.trials} interleaved trials x {a.repeat} rounds' checkpoints "
             "(fsyncs included; the disk is shared with other work, so the milliseconds are noisy, the bytes are "
             "not).", "",
             "| checkpoint | history rounds | ms per round | bytes written per round |", "|---|---|---|---|"]
    configs = [(kind, n) for kind in ("format 1", "now") for n in (10, 10_000)]
    samples: dict = {c: [] for c in configs}
    nbytes: dict = {}
    for _ in range(a.trials):
        for kind, n in configs:
            t, nbytes[kind, n] = measure("now" if kind == "now" else "old", n, weights, a.repeat)
            samples[kind, n] += t
    res = {c: statistics.median(v) for c, v in samples.items()}
    for kind, n in configs:
        lines.append(f"| {kind} | {n:,} | {res[kind, n] * 1e3:.2f} | {nbytes[kind, n]:,} |")
    lines += ["", f"10,000 vs 10 rounds: format 1 {res['format 1', 10_000] / res['format 1', 10]:.1f}x, "
              f"now {res['now', 10_000] / res['now', 10]:.2f}x.", ""]
    print("\n".join(lines))
    if a.write_results:
        p = Path(__file__).resolve().parent / "RESULTS.md"
        with open(p, "a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
