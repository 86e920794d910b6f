"""Run by tests/test_agent_runtime.py in a subprocess: train with a TFLite runtime, TensorFlow blocked.

Usage: python agent_parity_script.py CASE.npz OUT.npz  ->  prints one JSON line; OUT.npz gets the weights
after the parity steps (w0, w1, ...).
"""

import importlib.abc
import json
import sys


class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow.") or name in ("keras", "tf_keras"):
            raise ImportError(f"{name} is blocked: the agent must run without TensorFlow")
        return None


sys.meta_path.insert(0, BlockTensorFlow())

import numpy as np  # noqa: E402

from fedmq.edge_agent.trainer import TFLiteTrainer  # noqa: E402

case = np.load(sys.argv[1])
t = TFLiteTrainer(case["artifact"].tobytes())
nw = len(t.weight_names)
t.set_weights([case[f"init{i}"] for i in range(nw)])
assert t.prox, "the parity case is exported with the FedProx term"
losses = [t.step(x, y, m, float(case["lr"]), 0.01) for x, y, m in zip(case["x"], case["y"], case["mask"])]
np.savez(sys.argv[2], **{f"w{i}": w for i, w in enumerate(t.get_weights())})
fit = t.fit(case["fit_x"], case["fit_y"], epochs=2, lr=0.05, seed=1, weights=[case[f"init{i}"] for i in range(nw)])
print(json.dumps({
    "runtime": t.runtime,
    "max_diff": float(np.max(np.abs(np.array(losses) - case["ref"]))),
    "fit_loss": fit.loss,
    "numpy": np.__version__,
    "tf_loaded": any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules),
}))
