"""bench/agent_footprint: memory and speed of an agent training each zoo model with ai-edge-litert.

Artifacts are exported here (TensorFlow), then each is trained in a fresh agent process with
TensorFlow blocked from import; that process reports its peak RSS (VmHWM) and steps/s.
``--agent-venv DIR`` also reports the installed size of an environment holding only
``pip install .[agent]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, now  # noqa: E402

AGENT = r"""
import importlib.abc, json, sys, time
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM:"): return int(l.split()[1]) / 1024
base = hwm()
import numpy as np
from fedmq.edge_agent.memory import limit_heap_growth
from fedmq.edge_agent.trainer import TFLiteTrainer
low = sys.argv[3] == "low_memory"
limit_heap_growth()  # what the agent service does at start-up
c = np.load(sys.argv[1])
t = TFLiteTrainer(c["artifact"].tobytes(), xnnpack=not low)
init = [c[f"init{i}"] for i in range(len(t.weight_names))]
n = int(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.normal(size=(n * t.batch_size, *t.x_shape)).astype(np.float32)
y = rng.integers(0, t.num_classes, size=n * t.batch_size).astype(np.int32)
t.fit(x[: t.batch_size], y[: t.batch_size], weights=init)  # warm-up
r = t.fit(x, y, epochs=1, lr=0.01, weights=init)
train = hwm()
steps_per_s, steps = r.steps / r.seconds, r.steps
t.evaluate(x[:100], y[:100])  # the agent's held-out evaluation, in training-size batches
round_mb = hwm()
del r
if low:
    t.release()  # what a low_memory agent does after sending its update
for l in open("/proc/self/status"):
    if l.startswith("VmRSS:"): idle = int(l.split()[1]) / 1024
print(json.dumps({"rss_mb": train, "round_mb": round_mb, "idle_mb": idle, "python_mb": base,
                  "steps_per_s": steps_per_s, "runtime": t.runtime, "steps": steps}))
"""

TARGETS = {"mlp": 64, "cnn": 100}


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent-venv", type=Path, help="a venv with only fedmq[agent] installed")
    ap.add_argument("--batch-size", type=int, default=10, help="the FedAvg paper's B = 10")
    args = ap.parse_args()
    import numpy as np

    from fedmq.aggregator.export.convert import export_model
    from fedmq.aggregator.export.trainable import TrainSpec
    from fedmq.aggregator.export.zoo import ZOO

    print(f"## bench/agent_footprint — {now()}\n\nMachine: {machine()}\n")
    print(f"Training batch size {args.batch_size}, SGD; agent process with TensorFlow blocked. Peak RSS (VmHWM) "
          "after set_weights + training + get_weights, and after the held-out evaluation too (a full agent "
          "round), and the resident size once the round is over (the test data and the global weights still "
          "held). Modes: `default` (LiteRT with its XNNPACK delegate), `low_memory` (agent config "
          "`[agent] low_memory = true`: no XNNPACK; the interpreter is released between rounds). Both fix "
          "glibc's mmap threshold, as the agent does.\n")
    print("| model | params | artifact KB | mode | peak RSS MB, training | … with evaluation | RSS MB between rounds "
          "| target MB | steps/s | examples/s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for name in ("mlp", "2nn", "sensor1d", "cnn"):
            ex = export_model(ZOO[name](), TrainSpec(batch_size=args.batch_size), verify_steps=0)
            path = Path(d) / f"{name}.npz"
            np.savez(path, artifact=np.frombuffer(ex.artifact, np.uint8),
                     **{f"init{i}": w for i, w in enumerate(ex.initial_weights)})
            steps = 30 if name == "cnn" else 300
            params = sum(int(np.prod(w.shape)) for w in ex.weights)
            for mode in ("default", "low_memory"):
                out = subprocess.run([sys.executable, "-c", AGENT, str(path), str(steps), mode], capture_output=True,
                                     text=True, check=True, cwd=str(ROOT), env=dict(os.environ))
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {name} | {params:,} | {len(ex.artifact) / 1024:,.0f} | {mode} | {r['rss_mb']:.1f} "
                      f"| {r['round_mb']:.1f} | {r['idle_mb']:.1f} | {TARGETS.get(name, '—')} | {r['steps_per_s']:,.0f} "
                      f"| {r['steps_per_s'] * args.batch_size:,.0f} |")
        print(f"\nRuntime: {r['runtime']}.")
    if args.agent_venv:
        sp = next(args.agent_venv.glob("lib/python*/site-packages"))
        has_tf = any(p.name.startswith("tensorflow") for p in sp.iterdir())
        print(f"\nInstall size of `pip install .[agent]` (site-packages incl. numpy): {dir_mb(sp):.0f} MB "
              f"(target ≤ 200 MB); TensorFlow present: {has_tf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
