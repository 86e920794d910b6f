"""bench/overhead (experiment 6): wall time per round of the real pipeline vs the same training in one process.

Pipeline: a finished `fedmq-aggregator simulate` run directory (its history timestamps: round
close to round close, i.e. announcement, 8 agent processes training with LiteRT, updates over
Mosquitto, aggregation, evaluation, publishing). In-process: the same artifact, data shards, epochs,
learning rate and FedAvg, with TFLiteTrainer and the strategy called directly — no MQTT, no
processes, one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, now  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a simulate run directory")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from fedmq.aggregator.strategies import ClientUpdate, build_strategy
    from fedmq.edge_agent.trainer import TFLiteTrainer

    cfg = json.loads((args.run_dir / "config.json").read_text())
    hist = [json.loads(x) for x in (args.run_dir / "state/history.jsonl").read_text().splitlines()]
    ts = [h["ts"] for h in hist]
    pipeline = [b - a for a, b in zip(ts, ts[1:])]
    model_dir = next((args.run_dir / "state/models").iterdir())
    meta = json.loads((model_dir / "meta.json").read_text())
    with np.load(model_dir / "initial.npz") as z:
        weights = {w["name"]: z[f"w{i}"] for i, w in enumerate(meta["weights"])}
    trainer = TFLiteTrainer((model_dir / "model.tflite").read_bytes(), meta["model_id"])
    shards = []
    for p in sorted((args.run_dir / "data").glob("agent-*.npz")):
        with np.load(p) as z:
            shards.append((p.stem, z["x"], z["y"]))
    ev = np.load(args.run_dir / "data/eval.npz")
    strat = build_strategy(cfg["strategy"])
    names = list(weights)
    inproc = []
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        strat.begin_round(weights, rnd)
        lr = cfg["lr"] * cfg.get("lr_decay", 1.0) ** (rnd - 1)
        for agent, x, y in shards:
            base = [weights[n] for n in names]
            r = trainer.fit(x, y, epochs=cfg["epochs"], lr=lr, seed=rnd, weights=base)
            strat.add(ClientUpdate(agent, r.num_samples, {n: w - b for n, w, b in zip(names, r.weights, base)},
                                   {"loss": r.loss}))
        weights = strat.finish().weights
        trainer.set_weights([weights[n] for n in names])
        trainer.evaluate(ev["x"], ev["y"], batch=256)
        inproc.append(time.perf_counter() - t0)
    p, q = statistics.median(pipeline), statistics.median(inproc)
    print(f"## bench/overhead (experiment 6) — {now()}\n\nMachine: {machine()}\n")
    print(f"Run: {args.run_dir.name}: {len(shards)} agents, E={cfg['epochs']}, batch {cfg['batch_size']}, "
          f"{cfg['dataset']} ({cfg['strategy']['name']}).\n")
    print("| | median s per round |\n|---|---:|")
    print(f"| real pipeline (Mosquitto, {len(shards)} agent processes, LiteRT) | {p:.3f} |")
    print(f"| same training in one process, no MQTT | {q:.3f} |")
    print(f"\nPipeline / in-process: {p / q:.2f} (goal ≤ 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
