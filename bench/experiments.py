"""Long experiments on the real pipeline (MQTT, TFLite training in agent processes).

    python bench/experiments.py watch        # experiment 5: watch data, federated vs centralized
    python bench/experiments.py fmnist-2nn   # experiment 1, 2NN rows (needs `make datasets`)

Each configuration is a `fedmq-aggregator simulate` run; results are appended to
bench/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from common import machine, now  # noqa: E402

FM = dict(dataset="fashion-mnist", partition="iid", agents=100, fraction=0.1, model="zoo:2nn", flatten=True,
          strategy={"name": "fedavg"}, baseline=False, deadline_s=600)
EXPERIMENTS = {
    # experiment 5: one agent per subject 1-8, held-out subjects 9-10 (anchor: FedAvg 77.0%, centralized 82.3%)
    "watch": [
        dict(name="FedAvg E=2 B=16 lr 0.1 (anchor setting)", rounds=30, epochs=2, lr=0.1,
             strategy={"name": "fedavg"}),
        dict(name="FedAvg E=2 lr 0.1, decay 0.95/round", rounds=30, epochs=2, lr=0.1, lr_decay=0.95,
             strategy={"name": "fedavg"}),
        dict(name="FedAvgM (server momentum 0.5)", rounds=30, epochs=2, lr=0.1, lr_decay=0.95,
             strategy={"name": "fedavgm", "server": {"momentum": 0.5}}),
        dict(name="FedAdam (server lr 0.01)", rounds=30, epochs=2, lr=0.1, lr_decay=0.95,
             strategy={"name": "fedadam", "server": {"lr": 0.01}}),
    ],
    # beyond FedAvg on the watch data: local Adam, FedProx, fewer local epochs
    "watch-tune": [
        dict(name="FedAvg, local Adam lr 0.003, E=2", rounds=30, epochs=2, lr=0.003, optimizer="adam",
             strategy={"name": "fedavg"}),
        dict(name="FedAvgM 0.5, local Adam lr 0.003, E=2", rounds=30, epochs=2, lr=0.003, optimizer="adam",
             strategy={"name": "fedavgm", "server": {"momentum": 0.5}}),
        dict(name="FedProx mu 0.1, E=2 lr 0.1 decay 0.95", rounds=30, epochs=2, lr=0.1, lr_decay=0.95, mu=0.1,
             strategy={"name": "fedavg"}),
    ],
    "watch-more-rounds": [
        dict(name="FedAvgM 0.5, E=1, 60 rounds, lr 0.1 decay 0.97", rounds=60, epochs=1, lr=0.1, lr_decay=0.97,
             strategy={"name": "fedavgm", "server": {"momentum": 0.5}}),
        dict(name="FedAvgM 0.9 (server lr 0.3), E=1, 60 rounds, lr 0.1 decay 0.97", rounds=60, epochs=1, lr=0.1,
             lr_decay=0.97, strategy={"name": "fedavgm", "server": {"momentum": 0.9, "lr": 0.3}}),
    ],
    "watch-adam": [
        dict(name="FedAvgM 0.5, local Adam lr 0.003 decay 0.95, E=2", rounds=30, epochs=2, lr=0.003,
             lr_decay=0.95, optimizer="adam", strategy={"name": "fedavgm", "server": {"momentum": 0.5}}),
        dict(name="FedAvgM 0.7, local Adam lr 0.002 decay 0.97, E=2", rounds=30, epochs=2, lr=0.002,
             lr_decay=0.97, optimizer="adam", strategy={"name": "fedavgm", "server": {"momentum": 0.7}}),
    ],
    "watch-best": [
        dict(name="FedAvgM 0.9 (server lr 0.3), E=1, 60 rounds, lr 0.1 decay 0.97", rounds=60, epochs=1, lr=0.1,
             lr_decay=0.97, strategy={"name": "fedavgm", "server": {"momentum": 0.9, "lr": 0.3}}),
    ],
    # experiment 3: compression on the watch data (the best setting of watch-more-rounds), bytes per round and accuracy
    "watch-compression": [
        dict(name=f"{enc}", rounds=60, epochs=1, lr=0.1, lr_decay=0.97, encoding=enc, topk_fraction=0.01,
             strategy={"name": "fedavgm", "server": {"momentum": 0.9, "lr": 0.3}}, baseline=False)
        for enc in ("raw", "f16", "int8", "topk")
    ],
    # experiment 4: 2 of 10 agents Byzantine (IID split of the watch training subjects)
    "watch-byzantine": [
        dict(name=f"{attack}: {strat['name']}", rounds=20, epochs=2, lr=0.1, partition="iid", agents=10,
             byzantine=2, attack=attack, strategy=strat, baseline=False)
        for attack in ("sign_flip", "scale")
        for strat in ({"name": "fedavg"}, {"name": "median"}, {"name": "trimmed_mean", "beta": 0.2},
                      {"name": "krum", "f": 2})
    ],
    # experiment 1 (CNN, IID): the paper's CNN, 10 rounds (~75 s per round on 2 cores)
    "fmnist-cnn": [
        dict(name="CNN IID FedAvg E=5 B=10 lr 0.05", rounds=10, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "model": "zoo:cnn", "flatten": False}),
    ],
    # experiment 1, CNN on the 2-shard non-IID split (anchor: FedAvg 77.7% at round 20, 80% not reached)
    "fmnist-cnn-noniid": [
        dict(name="CNN non-IID FedAvg E=5 B=10 lr 0.05", rounds=20, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "model": "zoo:cnn", "flatten": False, "partition": "shards"}),
    ],
    # experiment 1, CNN FedSGD (E=1, B=all 600): 660 MB per training agent, so the agents release their
    # interpreter between rounds (low_memory); only the 10 selected per round hold one
    "fmnist-cnn-fedsgd": [
        dict(name="CNN IID FedSGD E=1 B=600 lr 0.1, low_memory agents", rounds=100, epochs=1, batch_size=600,
             lr=0.1, agent_low_memory=True, **{**FM, "model": "zoo:cnn", "flatten": False}),
    ],
    # experiment 1, 2NN FedSGD on the 2-shard non-IID split (anchor: 80% at round 228, 0.67 at round 100)
    "fmnist-2nn-fedsgd-noniid": [
        dict(name="2NN non-IID FedSGD E=1 B=all lr 0.1", rounds=300, epochs=1, batch_size=600, lr=0.1,
             **{**FM, "partition": "shards"}),
    ],
    # experiment 2: the seed's methods and beyond, side by side on the 2-shard non-IID split (2NN)
    "fmnist-methods": [
        dict(name=f"non-IID {label}", rounds=50, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards", "strategy": strat, **extra})
        for label, strat, extra in (
            ("simple mean", {"name": "mean"}, {}),
            ("sample-weighted", {"name": "weighted"}, {}),
            ("quality-weighted (softmax of val acc, T 0.05)",
             {"name": "quality", "quality": {"mapping": "softmax", "temperature": 0.05}},
             {"agent_eval_fraction": 0.1}),
            ("FedAvg", {"name": "fedavg"}, {}),
            ("hybrid: samples x quality, trimmed mean 0.1",
             {"name": "hybrid", "quality": {"mapping": "softmax", "temperature": 0.05}, "reducer": "trimmed_mean",
              "beta": 0.1}, {"agent_eval_fraction": 0.1}),
            ("FedAvgM 0.9 (server lr 0.3)", {"name": "fedavgm", "server": {"momentum": 0.9, "lr": 0.3}}, {}),
            ("FedAdam (server lr 0.01)", {"name": "fedadam", "server": {"lr": 0.01}}, {}),
            ("FedYogi (server lr 0.01)", {"name": "fedyogi", "server": {"lr": 0.01}}, {}),
            ("FedProx mu 0.1", {"name": "fedavg"}, {"mu": 0.1}),
        )
    ],
    "fmnist-methods-2": [
        dict(name=f"non-IID {label}", rounds=40, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards", "strategy": strat})
        for label, strat in (
            ("FedAvgM 0.9 (server lr 1.0)", {"name": "fedavgm", "server": {"momentum": 0.9, "lr": 1.0}}),
            ("FedAdam (server lr 0.03)", {"name": "fedadam", "server": {"lr": 0.03}}),
            ("FedYogi (server lr 0.03)", {"name": "fedyogi", "server": {"lr": 0.03}}),
        )
    ],
    # experiment 2, third pass: more clients per round (C) against client drift, and milder server momentum
    "fmnist-methods-3": [
        dict(name=f"non-IID {label}", rounds=rounds, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards", "strategy": strat, "fraction": c})
        for label, strat, c, rounds in (
            ("FedAvg, C 0.3", {"name": "fedavg"}, 0.3, 60),
            ("FedAdam (server lr 0.03), C 0.3", {"name": "fedadam", "server": {"lr": 0.03}}, 0.3, 60),
            ("FedAvgM 0.5 (server lr 1.0), C 0.1", {"name": "fedavgm", "server": {"momentum": 0.5, "lr": 1.0}}, 0.1, 60),
            ("FedAvgM 0.7 (server lr 0.5), C 0.3", {"name": "fedavgm", "server": {"momentum": 0.7, "lr": 0.5}}, 0.3, 60),
            ("FedAvg, C 1.0", {"name": "fedavg"}, 1.0, 40),
        )
    ],
    # experiment 2, fourth pass: C 0.3 oscillates around 83-84%; damp it (client lr decay, fewer local epochs)
    "fmnist-methods-4": [
        dict(name=f"non-IID {label}", rounds=80, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards", "strategy": strat, "fraction": 0.3, **extra})
        for label, strat, extra in (
            ("FedAvgM 0.7 (server lr 0.5), C 0.3, E 5, lr decay 0.97", {"name": "fedavgm", "server": {"momentum": 0.7, "lr": 0.5}},
             {"epochs": 5, "lr_decay": 0.97}),
            ("FedAvg, C 0.3, E 5, lr decay 0.97", {"name": "fedavg"}, {"epochs": 5, "lr_decay": 0.97}),
            ("FedAvg, C 0.3, E 1", {"name": "fedavg"}, {"epochs": 1}),
            ("FedAvgM 0.7 (server lr 0.5), C 0.3, E 2, lr decay 0.98", {"name": "fedavgm", "server": {"momentum": 0.7, "lr": 0.5}},
             {"epochs": 2, "lr_decay": 0.98}),
        )
    ],
    # experiment 2, fifth pass: every client each round (C 1.0) removes the sampling noise that makes
    # server momentum unstable at C 0.1-0.3
    "fmnist-methods-5": [
        dict(name=f"non-IID {label}", rounds=rounds, epochs=epochs, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards", "strategy": strat, "fraction": 1.0})
        for label, strat, epochs, rounds in (
            ("FedAvgM 0.9 (server lr 1.0), C 1.0, E 5", {"name": "fedavgm", "server": {"momentum": 0.9, "lr": 1.0}}, 5, 60),
            ("FedAvgM 0.7 (server lr 1.0), C 1.0, E 5", {"name": "fedavgm", "server": {"momentum": 0.7, "lr": 1.0}}, 5, 60),
            ("FedAdam (server lr 0.01), C 1.0, E 5", {"name": "fedadam", "server": {"lr": 0.01}}, 5, 60),
            ("FedAvg, C 1.0, E 5", {"name": "fedavg"}, 5, 100),
        )
    ],
    # experiment 2: the configuration that met the goal, on more seeds
    "fmnist-methods-best": [
        dict(name="non-IID FedAvgM 0.9 (server lr 1.0), C 1.0, E 5", rounds=60, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards", "fraction": 1.0,
                "strategy": {"name": "fedavgm", "server": {"momentum": 0.9, "lr": 1.0}}}),
    ],
    "fmnist-methods-best-100": [
        dict(name="non-IID FedAvgM 0.9 (server lr 1.0), C 1.0, E 5, 100 rounds", rounds=100, epochs=5, batch_size=10,
             lr=0.05, **{**FM, "partition": "shards", "fraction": 1.0,
                         "strategy": {"name": "fedavgm", "server": {"momentum": 0.9, "lr": 1.0}}}),
    ],
    # experiment 1 (2NN part): the FedAvg paper on Fashion-MNIST, 100 clients x 600, C = 0.1
    "fmnist-2nn": [
        dict(name="2NN IID FedAvg E=5 B=10 lr 0.05", rounds=20, epochs=5, batch_size=10, lr=0.05, **FM),
        dict(name="2NN IID FedSGD E=1 B=all lr 0.3", rounds=120, epochs=1, batch_size=600, lr=0.3, **FM),
        dict(name="2NN non-IID FedAvg E=5 B=10 lr 0.05", rounds=60, epochs=5, batch_size=10, lr=0.05,
             **{**FM, "partition": "shards"}),
    ],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "experiments")
    args = ap.parse_args()
    from fedmq.aggregator.simulate import SimConfig, Simulation

    rows = []
    for conf in EXPERIMENTS[args.experiment]:
        conf = dict(conf)
        name = conf.pop("name")
        for seed in range(args.seeds):
            run_dir = args.out / f"{args.experiment}-{len(rows)}-s{seed}"
            if args.seed_offset:
                run_dir = run_dir.with_name(run_dir.name + f"-o{args.seed_offset}")
            t0 = time.time()
            conf.setdefault("dataset", "watch")
            s = Simulation(SimConfig(seed=seed + args.seed_offset, **conf), run_dir, progress=False).run()
            hist = [json.loads(x) for x in (run_dir / "state/history.jsonl").read_text().splitlines()]
            acc = [h.get("eval_accuracy", 0) for h in hist if h["outcome"] == "aggregated"]
            first = lambda target: next((i + 1 for i, a in enumerate(acc) if a >= target), None)  # noqa: E731
            mb = np.mean([h.get("bytes_received", 0) for h in hist if h["outcome"] == "aggregated"]) / 1e6
            rows.append((name, seed + args.seed_offset, s["final_accuracy"], max(acc), s.get("centralized_accuracy"),
                         first(0.80), first(0.85), mb, time.time() - t0))
            print(rows[-1], flush=True)
    lines = [f"\n## bench/experiments {args.experiment} — {now()}\n", f"Machine: {machine()}\n",
             "| configuration | seed | final acc | best acc | centralized (same data, same epochs) "
             "| rounds to 80% | rounds to 85% | MB of updates per round | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, seed, fin, best, cen, r80, r85, mb, wall in rows:
        cen_s = f"{cen:.4f}" if cen is not None else "—"
        lines.append(f"| {n} | {seed} | {fin:.4f} | {best:.4f} | {cen_s} | {r80 or '—'} | {r85 or '—'} "
                     f"| {mb:.3f} | {wall:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
