"""bench/agent_footprint: memory of the agent process, and memory and speed of its trainer, per zoo model.

The process table: a real ``fedmq-agent run`` subprocess through two rounds on a provisioned
Mosquitto (TLS + passwords + ACL) with a real aggregator process; its RSS per phase and VmHWM.
The trainer table: artifacts exported here (TensorFlow), each trained in a fresh process with
TensorFlow blocked from import and only ``TFLiteTrainer`` (no MQTT, TLS, messages): peak RSS and steps/s.
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
import time
from dataclasses import dataclass
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
PROCESS_TARGETS = {("mlp", "default"): 64, ("mlp", "low_memory"): 64, ("cnn", "default"): 110,
                   ("cnn", "low_memory"): 100}


# -- the whole agent process ----------------------------------------------------------------------------

AGENT_CMD = ["-m", "fedmq.edge_agent.cli"]
PHASES = ("idle", "model received", "global received", "training", "sending", "round 2", "after the run")


@dataclass
class ProcessRun:
    """One ``fedmq-agent run`` through a round: VmHWM at the end and the largest RSS seen per phase."""

    model: str
    mode: str
    hwm_mb: float
    phase_mb: dict[str, float]
    rounds: int
    seconds: float


def _status_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB; (0, 0) once it is gone."""
    rss = hwm = 0.0
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


def _wait(pred, timeout: float, what: str, interval: float = 0.05):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _merge_toml(path: Path, port: int, tables: dict) -> None:
    """Add ``tables`` to a provisioned config (keeping its own keys) and point it at ``port``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    from fedmq.broker.commands.config import write_toml

    doc = tomllib.loads(path.read_text())
    doc["broker"]["port"] = port
    for name, keys in tables.items():
        doc.setdefault(name, {}).update(keys)
    write_toml(path, doc)


def run_process(name: str, mode: str, work: Path, model_cache: Path, examples: int, batch_size: int,
                rounds: int = 2, timeout: float = 240, agent_python: str = sys.executable) -> ProcessRun:
    """A provisioned Mosquitto (TLS + passwords + ACL), an aggregator process and one ``fedmq-agent run``
    process training ``name`` for ``rounds`` rounds; the agent's RSS is sampled every 10 ms and each
    sample is put in the phase the agent is in (its log lines and cache_dir/global.msgpack mark them)."""
    import numpy as np

    from fedmq.broker.ops.launcher import LocalBroker, SecureFiles
    from fedmq.broker.ops.provision import ProvisionSpec, provision

    work.mkdir(parents=True)
    prov = provision(ProvisionSpec("fp-" + name, ["agent-a"], work / "prov", host="localhost"))
    b = prov.broker_dir
    (work / "broker").mkdir()
    lb = LocalBroker(SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                                 str(b / "server.key")), workdir=str(work / "broker"), max_packet_size=2_000_000).start()
    procs: list[subprocess.Popen] = []
    try:
        state = work / "aggregator-state"
        state.mkdir()
        (state / "models").symlink_to(model_cache)
        agg_cfg = prov.client_dir("aggregator") / "aggregator.toml"
        _merge_toml(agg_cfg, lb.port, {
            "service": {"state_dir": str(state), "export_final": False},
            "model": {"source": f"zoo:{name}", "batch_size": batch_size, "verify_steps": 0},
            "rounds": {"rounds": rounds, "min_agents": 1, "grace_s": 1, "deadline_s": timeout},
            "train": {"epochs": 1, "lr": 0.01}})
        rng = np.random.default_rng(0)
        shape = (28, 28, 1) if name == "cnn" else (64,)
        data = work / "data.npz"
        np.savez(data, x=rng.normal(size=(examples, *shape)).astype(np.float32),
                 y=rng.integers(0, 10, size=examples).astype(np.int32))
        cache = work / "agent-cache"
        a_cfg = prov.client_dir("agent-a") / "agent.toml"
        _merge_toml(a_cfg, lb.port, {"agent": {"cache_dir": str(cache), "low_memory": mode == "low_memory"},
                                     "data": {"source": f"npz:{data}", "eval_fraction": 0.1}})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        agent_log = work / "agent.log"
        # the agent first, alone: its idle phase is measured before any model exists on the broker
        agent = subprocess.Popen([agent_python, *AGENT_CMD, "run", "--config", str(a_cfg)],
                                 stdout=open(agent_log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        procs.append(agent)
        phase_mb = dict.fromkeys(PHASES, 0.0)
        t0 = time.monotonic()

        def log_text() -> str:
            return agent_log.read_text(errors="replace")

        def sample(phase: str) -> None:
            rss, _ = _status_mb(agent.pid)
            phase_mb[phase] = max(phase_mb[phase], rss)

        def sampling(phase: str, until, what: str, limit: float = timeout):
            def pred():
                sample(phase)
                for p, what in zip(procs, ("agent", "aggregator")):
                    if p.poll() is not None and not (what == "aggregator" and phase in ("round 2", "after the run")):
                        raise RuntimeError(f"the {what} exited ({p.returncode}): see {work}")
                return until()
            return _wait(pred, limit, what, interval=0.01)

        sampling("idle", lambda: " up: " in log_text(), "the agent to start")
        # phases: idle (connected, no aggregator yet), model received (the manifest, its self-test and the
        # trainer, until the global is written), global received (that moment), training (until the log says
        # trained), sending (until the aggregator has aggregated round 1), round 2, after the run (2 s)
        t_idle = time.monotonic() + 1.0  # the connected, idle agent (no model on the broker yet)
        sampling("idle", lambda: time.monotonic() > t_idle, "idle")
        agg = subprocess.Popen([sys.executable, "-m", "fedmq.aggregator.cli", "run", "--config", str(agg_cfg)],
                               stdout=open(work / "aggregator.log", "wb"), stderr=subprocess.STDOUT, env=env,
                               cwd=str(ROOT))
        procs.append(agg)
        sampling("model received", lambda: (cache / "global.msgpack").exists(), "the global")
        sampling("global received", lambda: True, "global")
        sampling("training", lambda: "round 1: trained" in log_text(), "training")
        history = state / "history.jsonl"

        def aggregated(n: int):
            return lambda: history.exists() and sum(1 for _ in history.open()) >= n

        sampling("sending", aggregated(1), "round 1 aggregated")
        sampling("round 2", lambda: agg.poll() is not None, "the remaining rounds")
        t_after = time.monotonic() + 2.0
        sampling("after the run", lambda: time.monotonic() > t_after, "after the run")
        _, hwm = _status_mb(agent.pid)
        n = sum(1 for _ in history.open())
        return ProcessRun(name, mode, hwm, phase_mb, n, time.monotonic() - t0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        lb.cleanup()


def agent_runtime(agent_python: str) -> str:
    """The runtime the agent's interpreter would load first ("ai_edge_litert 2.3.0")."""
    code = "from fedmq.edge_agent.runtime import interpreter_class as c; print(c()[1])"
    return subprocess.run([agent_python, "-c", code], capture_output=True, text=True, check=True,
                          cwd=str(ROOT)).stdout.strip()


def process_table(batch_size: int, models: list[str], agent_pythons: list[str]) -> None:
    """The whole ``fedmq-agent run`` process through two rounds on a provisioned broker."""
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    print(f"## bench/agent_footprint: the agent process — {now()}\n\nMachine: {machine()}\n")
    print("One `fedmq-agent run` process (TensorFlow installed but not imported) on a Mosquitto provisioned by "
          "`fedmq-broker provision` (TLS, passwords, ACL), with a real aggregator process, through 2 rounds "
          f"(batch {batch_size}, 1 epoch; CNN 600 and MLP 300 local examples, 10% held out). RSS sampled every "
          "10 ms; per phase the largest sample; peak = VmHWM of the process at the end.\n")
    print("| model | runtime | mode | " + " | ".join(PHASES) + " | peak (VmHWM) MB | target MB |")
    print("|---|---|---|" + "---:|" * (len(PHASES) + 2))
    runtimes = {py: agent_runtime(py) for py in agent_pythons}
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "models"
        cache.mkdir()
        for name in models:
            load_or_export(ModelSection(source=f"zoo:{name}", batch_size=batch_size, verify_steps=0), cache)
            for i, py in enumerate(agent_pythons):
                for mode in ("default", "low_memory"):
                    r = run_process(name, mode, Path(d) / f"{name}-{mode}-{i}", cache,
                                    600 if name == "cnn" else 300, batch_size, agent_python=py)
                    print(f"| {name} | {runtimes[py]} | {mode} | " + " | ".join(f"{r.phase_mb[p]:.1f}" for p in PHASES)
                          + f" | {r.hwm_mb:.1f} | {PROCESS_TARGETS[(name, mode)]} |", flush=True)
    print()


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent-venv", type=Path, help="a venv with only fedmq[agent] installed")
    ap.add_argument("--batch-size", type=int, default=10, help="the FedAvg paper's B = 10")
    ap.add_argument("--only", choices=("trainer", "process"), help="one of the two tables (default both)")
    ap.add_argument("--models", default="mlp,cnn", help="process table: zoo models, comma-separated (default mlp,cnn)")
    ap.add_argument("--agent-python", action="append", metavar="PYTHON",
                    help="process table: the agent's interpreter, repeatable (default this one; e.g. "
                         ".tflite-venv/bin/python for tflite-runtime)")
    args = ap.parse_args()
    if args.only != "trainer":
        process_table(args.batch_size, args.models.split(","), args.agent_python or [sys.executable])
    if args.only == "process":
        return 0
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
