"""``fedmq-aggregator simulate``: a whole fleet on one machine — real broker, real processes.

Starts a local broker (Mosquitto; the embedded amqtt broker when Mosquitto is missing), the
aggregator service and N agent processes (TFLite training, no TensorFlow in the agents), with the
dataset partitioned across agents. Shows a progress bar per round, writes a run directory and
prints a summary (with a centralized baseline trained on the same data when asked). Every process
it started is stopped on exit, Ctrl-C or failure.

Run directory: ``config.json`` (the settings), ``data/`` (agent shards, eval set), ``configs/``
(TOML per process), ``logs/``, ``state/`` (checkpoint, ``history.jsonl``/``history.csv``,
``final/model.keras`` and ``final/model.tflite``), ``plots/`` (accuracy and loss, bytes and participants per round),
``summary.json``.

Your own data (``--data``, docs/datasets.md): ``.npz`` files with ``x`` (examples) and ``y`` (integer
labels) — a directory or glob of files gives one agent per file, as they are; a single file is
split with ``--partition`` (``iid``, ``dirichlet``, ``shards``, or ``natural`` by its optional
``groups`` array) across ``--agents``. ``--eval`` names the held-out file; ``--model`` is required.
Every file is checked against the model (input shape, class count) before anything starts: a
misfit, like a refused model, is a ConfigError (exit 2) naming the file and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedmq.broker.commands.config import write_toml
from fedmq.broker.contract.messages import RoundMetrics
from fedmq.broker.contract.topics import Topics
from fedmq.broker.errors import ConfigError
from fedmq.broker.ops.launcher import LocalBroker
from fedmq.broker.transport.client import MqttClient, MqttConfig
from fedmq.broker.transport.receiver import Receiver

from .partition import PARTITIONS, partition

log = logging.getLogger(__name__)
DEFAULT_MODEL = {"watch": "zoo:sensor1d", "fashion-mnist": "zoo:2nn", "digits": "zoo:mlp"}


@dataclass
class SimConfig:
    dataset: str = "watch"
    partition: str = "natural"
    alpha: float = 0.5
    agents: int = 8
    train_groups: list[int] = field(default_factory=lambda: list(range(1, 9)))
    test_groups: list[int] = field(default_factory=lambda: [9, 10])
    model: str = ""
    batch_size: int = 16
    optimizer: str = "sgd"
    rounds: int = 30
    epochs: int = 2
    lr: float = 0.1
    lr_decay: float = 1.0
    mu: float = 0.0
    fraction: float = 1.0
    encoding: str = "raw"
    topk_fraction: float = 0.01
    strategy: dict = field(default_factory=lambda: {"name": "fedavg"})
    deadline_s: float = 300.0
    seed: int = 0
    baseline: bool = True
    max_examples_per_agent: int = 0
    flatten: bool = False  # 28x28x1 images as 784 features (2NN / MLP)
    agent_eval_fraction: float = 0.0  # local hold-out on agents (reports val_accuracy for quality weighting)
    byzantine: int = 0  # robustness experiments: the first k agents attack
    attack: str = "sign_flip"
    agent_low_memory: bool = False  # agents without XNNPACK, releasing the interpreter between rounds
    data: str = ""  # the operator's own .npz: a file (partitioned), or a directory / glob (one agent per file)
    eval_data: str = ""  # the held-out .npz (required with data)


def load_split(cfg: SimConfig):
    """(train x, train y, train groups, test x, test y) for the configured dataset."""
    from fedmq.aggregator.datasets import load_digits, load_fashion_mnist, load_watch

    if cfg.dataset == "watch":
        d = load_watch()
        tr, te = d.subset(np.isin(d.groups, cfg.train_groups)), d.subset(np.isin(d.groups, cfg.test_groups))
        return tr.x, tr.y, tr.groups, te.x, te.y
    if cfg.dataset == "fashion-mnist":
        tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
        xs = (tr.x, te.x)
        if cfg.flatten:
            xs = tuple(x.reshape(len(x), -1) for x in xs)
        return xs[0], tr.y, None, xs[1], te.y
    if cfg.dataset == "digits":
        d = load_digits()
        order = np.random.default_rng(cfg.seed).permutation(len(d.y))
        cut = int(0.8 * len(order))
        return d.x[order[:cut]], d.y[order[:cut]], None, d.x[order[cut:]], d.y[order[cut:]]
    raise ValueError(f"unknown dataset {cfg.dataset!r}: use watch, fashion-mnist or digits")


def model_io(source: str) -> tuple[tuple[int, ...], int]:
    """(input shape, class count) of the model ``source`` builds; ModelRefused (exit 2) for a refused model."""
    from .export.convert import check_model, load_model_fn

    model = load_model_fn(source)()
    check_model(model)
    return tuple(int(d) for d in model.inputs[0].shape[1:]), int(model.outputs[0].shape[-1])


def load_own_data(cfg: SimConfig) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """(one (x, y) per agent, held-out x, held-out y) from ``cfg.data``/``cfg.eval_data``, checked against the model."""
    from .datasets import check_fits, find_npz, load_npz

    if not cfg.model:
        raise ConfigError("--data needs --model (zoo:NAME or package.module:function) that fits the data")
    if not cfg.eval_data:
        raise ConfigError("--data needs --eval HELD_OUT.npz (x, y): the aggregator's held-out set")
    x_shape, classes = model_io(cfg.model)
    ev = load_npz(cfg.eval_data)
    check_fits(ev, cfg.eval_data, x_shape, classes)
    files = find_npz(cfg.data, exclude=Path(cfg.eval_data))
    if len(files) > 1:
        if cfg.partition not in ("auto", "natural"):
            log.info("--data has %d files: one agent per file, --partition %s not used", len(files), cfg.partition)
        shards = []
        for f in files:
            d = load_npz(f)
            check_fits(d, f, x_shape, classes)
            shards.append((d.x, d.y))
        log.info("own data: %d agents, one per file (%s ... %s)", len(files), files[0].name, files[-1].name)
        return shards, ev.x, ev.y
    d = load_npz(files[0], groups=True)
    check_fits(d, files[0], x_shape, classes)
    how = cfg.partition if cfg.partition != "auto" else ("natural" if d.groups is not None else "iid")
    if how == "natural" and d.groups is None:
        raise ConfigError(f"{files[0]}: --partition natural needs a 'groups' array (one client id per example) "
                          "in the file; or use iid, dirichlet or shards")
    n = len(np.unique(d.groups)) if how == "natural" else cfg.agents
    try:
        parts = partition(d.y, n, how, alpha=cfg.alpha, seed=cfg.seed, groups=d.groups)
    except ValueError as e:
        raise ConfigError(f"--partition {how}: {e}") from None
    empty = [i + 1 for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"--partition {how} of {files[0]} ({len(d.y)} examples) left agent(s) {empty} without "
                          "examples: use fewer --agents" + (" or a larger --alpha" if how == "dirichlet" else ""))
    return [(d.x[p], d.y[p]) for p in parts], ev.x, ev.y


class Simulation:
    def __init__(self, cfg: SimConfig, run_dir: Path, progress: bool = True) -> None:
        self.cfg = cfg
        # absolute: the processes it starts run inside the run directory, and the paths written
        # into their configs must not be resolved a second time from there
        self.run_dir = Path(run_dir).resolve()
        self.progress = progress
        self.procs: list[subprocess.Popen] = []
        self.broker: LocalBroker | None = None
        self.fleet = "sim"

    # -- set-up ------------------------------------------------------------------------------------------
    def prepare(self) -> list[str]:
        c = self.cfg
        for d in ("data", "configs", "logs", "state", "plots"):
            (self.run_dir / d).mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(c), indent=2))
        if c.data:
            return self._prepare_own(c)
        x, y, groups, xt, yt = load_split(c)
        if c.partition == "natural" and groups is not None:
            parts = partition(y, len(np.unique(groups)), "natural", groups=groups)
            if c.agents != len(parts):
                log.info("natural partition: %d agents (one per group)", len(parts))
        else:
            parts = partition(y, c.agents, c.partition, alpha=c.alpha, seed=c.seed)
        agents = [f"agent-{i + 1:03d}" for i in range(len(parts))]
        for a, idx in zip(agents, parts):
            if c.max_examples_per_agent:
                idx = idx[: c.max_examples_per_agent]
            np.savez(self.run_dir / "data" / f"{a}.npz", x=x[idx], y=y[idx])
        np.savez(self.run_dir / "data" / "eval.npz", x=xt, y=yt)
        self.train = (x[np.concatenate(parts)], y[np.concatenate(parts)])
        self.test = (xt, yt)
        return agents

    def _prepare_own(self, c: SimConfig) -> list[str]:
        shards, xt, yt = load_own_data(c)
        agents = [f"agent-{i + 1:03d}" for i in range(len(shards))]
        if c.max_examples_per_agent:
            shards = [(x[: c.max_examples_per_agent], y[: c.max_examples_per_agent]) for x, y in shards]
        for a, (x, y) in zip(agents, shards):
            np.savez(self.run_dir / "data" / f"{a}.npz", x=x, y=y)
        np.savez(self.run_dir / "data" / "eval.npz", x=xt, y=yt)
        self.train = (np.concatenate([x for x, _ in shards]), np.concatenate([y for _, y in shards]))
        self.test = (xt, yt)
        return agents

    def _spawn(self, name: str, module: str, config: Path) -> subprocess.Popen:
        logf = open(self.run_dir / "logs" / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen([sys.executable, "-m", module, "run", "--config", str(config)], stdout=logf,
                             stderr=subprocess.STDOUT, env=env, cwd=str(self.run_dir), start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, agents: list[str]) -> subprocess.Popen:
        c = self.cfg
        self.broker = LocalBroker(workdir=str(self.run_dir / "broker"), persistence=False)
        (self.run_dir / "broker").mkdir(exist_ok=True)
        self.broker.start()
        if self.broker.embedded:
            log.warning("Mosquitto not installed: using the embedded amqtt broker (MQTT 3.1.1)")
        btable = {"host": self.broker.host, "port": self.broker.port, "fleet": self.fleet,
                  "protocol": self.broker.protocol, "max_payload": 4_000_000}
        agg_cfg = write_toml(self.run_dir / "configs" / "aggregator.toml", {
            "broker": btable,
            "service": {"id": "aggregator", "state_dir": str(self.run_dir / "state")},
            "model": {"source": c.model or DEFAULT_MODEL[c.dataset], "batch_size": c.batch_size,
                      "optimizer": c.optimizer, "seed": c.seed},
            "rounds": {"rounds": c.rounds, "min_agents": len(agents),
                       "select": "fraction" if c.fraction < 1 else "all", "fraction": c.fraction,
                       "quorum_fraction": 1.0, "deadline_s": c.deadline_s, "grace_s": 5.0, "seed": c.seed},
            "train": {"epochs": c.epochs, "lr": c.lr, "lr_decay": c.lr_decay, "mu": c.mu, "encoding": c.encoding,
                      "topk_fraction": c.topk_fraction},
            "eval": {"dataset": f"npz:{self.run_dir / 'data' / 'eval.npz'}"},
            "strategy": c.strategy,
        })
        agg = self._spawn("aggregator", "fedmq.aggregator.cli", agg_cfg)
        for a in agents:
            attack = c.attack if agents.index(a) < c.byzantine else None
            cfg = write_toml(self.run_dir / "configs" / f"{a}.toml", {
                "agent": {"id": a, "cache_dir": str(self.run_dir / "cache" / a), "attack": attack,
                          "low_memory": c.agent_low_memory},
                "broker": btable,
                "data": {"source": f"npz:{self.run_dir / 'data' / f'{a}.npz'}",
                         "eval_fraction": c.agent_eval_fraction},
            })
            self._spawn(a, "fedmq.edge_agent.cli", cfg)
        return agg

    # -- running ------------------------------------------------------------------------------------------
    def watch(self, agg: subprocess.Popen) -> list[RoundMetrics]:
        """Follow the metrics topic with a progress bar until the aggregator exits."""
        from tqdm import tqdm

        t = Topics(self.fleet)
        client = MqttClient(MqttConfig(self.broker.host, self.broker.port, client_id="sim-observer",
                                       protocol=self.broker.protocol))
        client.connect()
        client.subscribe(t.metrics())
        rx = Receiver(t)
        seen: list[RoundMetrics] = []
        bar = tqdm(total=self.cfg.rounds, unit="round", disable=not self.progress, dynamic_ncols=True)
        try:
            while agg.poll() is None:
                m = client.get(timeout=0.5)
                if m is None:
                    if any(p.poll() not in (None, 0) for p in self.procs[1:]):
                        raise RuntimeError("an agent process failed: see " + str(self.run_dir / "logs"))
                    continue
                r = rx.feed(m.topic, m.payload)
                if r is None or not isinstance(r.message, RoundMetrics):
                    continue
                mm = r.message
                seen.append(mm)
                v = mm.values
                if mm.outcome == "aggregated":
                    bar.update(1)
                bar.set_postfix(round=mm.round, acc=f"{v.get('eval_accuracy', float('nan')):.3f}",
                                loss=f"{v.get('train_loss', float('nan')):.3f}",
                                agents=int(v.get("participants", 0)),
                                MB=f"{v.get('bytes_received', 0) / 1e6:.1f}")
        finally:
            bar.close()
            client.close()
        if agg.returncode == 2:  # the aggregator refused its configuration or model: a usage error here too
            tail = (self.run_dir / "logs" / "aggregator.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise ConfigError("the aggregator refused its configuration:\n  " + "\n  ".join(tail))
        if agg.returncode not in (0, None):
            raise RuntimeError(f"the aggregator exited with {agg.returncode}: see {self.run_dir / 'logs'}")
        return seen

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.broker is not None:
            self.broker.stop()

    # -- results ------------------------------------------------------------------------------------------
    def history(self) -> list[dict]:
        p = self.run_dir / "state" / "history.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def plots(self, hist: list[dict]) -> list[Path]:
        """The same plots `run` draws into its state dir (aggregator.plots), into run_dir/plots."""
        from .plots import write_plots

        return write_plots(hist, self.run_dir / "plots")

    def centralized_baseline(self) -> float:
        """The same model and optimizer trained on the union of the agents' data (TFLite trainer)."""
        from fedmq.edge_agent.trainer import TFLiteTrainer

        models = sorted((self.run_dir / "state" / "models").glob("*/model.tflite"))
        meta = json.loads((models[0].parent / "meta.json").read_text())
        with np.load(models[0].parent / "initial.npz") as z:
            init = [z[f"w{i}"] for i in range(len(meta["weights"]))]
        t = TFLiteTrainer(models[0].read_bytes(), meta["model_id"])
        t.set_weights(init)
        x, y = self.train
        for e in range(self.cfg.rounds * self.cfg.epochs):  # the same epochs and lr schedule
            t.fit(x, y, epochs=1, lr=self.cfg.lr * self.cfg.lr_decay ** (e // self.cfg.epochs), seed=e)
        return t.evaluate(*self.test, batch=256)[1]

    def run(self) -> dict:
        t0 = time.time()
        try:
            agents = self.prepare()
            agg = self.start(agents)
            self.watch(agg)
        finally:
            self.stop()
        hist = self.history()
        plots = self.plots(hist)
        done = [h for h in hist if h["outcome"] == "aggregated"]
        summary = {"rounds": len(done), "agents": len(agents), "dataset": self.cfg.dataset,
                   "strategy": self.cfg.strategy.get("name"), "seconds": round(time.time() - t0, 1),
                   "final_accuracy": done[-1].get("eval_accuracy") if done else None,
                   "best_accuracy": max((h.get("eval_accuracy", 0) for h in done), default=None),
                   "bytes_received": sum(h.get("bytes_received", 0) for h in done),
                   "plots": [str(p) for p in plots],
                   "final_model": [str(p) for p in sorted((self.run_dir / "state" / "final").glob("model.*"))]}
        if self.cfg.baseline and done:
            summary["centralized_accuracy"] = self.centralized_baseline()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="watch", choices=["watch", "fashion-mnist", "digits"])
    p.add_argument("--data", metavar="NPZ|DIR|GLOB",
                   help="your own data instead of --dataset: .npz files with x and y; a directory or glob = one agent "
                        "per file, one file = split with --partition across --agents (needs --eval and --model)")
    p.add_argument("--eval", dest="eval_data", metavar="NPZ", help="held-out .npz (x, y) for --data")
    p.add_argument("--partition", default=None, choices=PARTITIONS,
                   help="how one dataset is split across agents (default: natural for watch and for --data with a "
                        "groups array, else iid)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (partition dirichlet)")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--model", default="", help="zoo:NAME or module:function (default: by dataset)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round (E)")
    p.add_argument("--lr", type=float, default=0.1, help="local learning rate")
    p.add_argument("--lr-decay", type=float, default=1.0, help="local lr multiplier per round")
    p.add_argument("--mu", type=float, default=0.0, help="FedProx mu")
    p.add_argument("--fraction", type=float, default=1.0, help="agents asked per round (C)")
    p.add_argument("--encoding", default="raw", choices=["raw", "f16", "int8", "topk"])
    p.add_argument("--strategy", default="fedavg", help="strategy preset (fedmq-aggregator strategies)")
    p.add_argument("--server-lr", type=float, help="server learning rate of the strategy")
    p.add_argument("--run-dir", type=Path, help="output directory (default runs/<timestamp>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--byzantine", type=int, default=0, help="robustness experiments: the first k agents attack")
    p.add_argument("--attack", default="sign_flip", choices=["sign_flip", "scale"])
    p.add_argument("--agent-low-memory", action="store_true",
                   help="agents in low_memory mode (no XNNPACK; interpreter released between rounds)")
    p.add_argument("--no-baseline", action="store_true", help="skip the centralized baseline")
    p.add_argument("--no-progress", action="store_true")


def from_args(a: argparse.Namespace) -> tuple[SimConfig, Path]:
    strategy: dict = {"name": a.strategy}
    if a.server_lr is not None:
        strategy["server"] = {"lr": a.server_lr}
    if a.eval_data and not a.data:
        raise ConfigError("--eval is the held-out set of --data: give --data too")
    if a.data:
        partition_ = a.partition or "auto"
    else:
        partition_ = a.partition or ("natural" if a.dataset == "watch" else "iid")
        if partition_ == "natural" and a.dataset != "watch":
            partition_ = "iid"  # only watch has natural clients
    cfg = SimConfig(dataset="npz" if a.data else a.dataset, partition=partition_, alpha=a.alpha, agents=a.agents, model=a.model, batch_size=a.batch_size,
                    optimizer=a.optimizer, rounds=a.rounds, epochs=a.epochs, lr=a.lr, lr_decay=a.lr_decay, mu=a.mu, fraction=a.fraction,
                    encoding=a.encoding, strategy=strategy, seed=a.seed, baseline=not a.no_baseline,
                    byzantine=a.byzantine, attack=a.attack, agent_low_memory=a.agent_low_memory,
                    flatten=not a.data and a.dataset == "fashion-mnist" and (a.model or "zoo:2nn") in ("zoo:2nn", "zoo:mlp"),
                    data=a.data or "", eval_data=a.eval_data or "")
    run_dir = a.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return cfg, run_dir


def print_summary(s: dict) -> None:
    print(f"\nfedmq simulation: {s['agents']} agents, {s['rounds']} rounds of {s['strategy']} on {s['dataset']} "
          f"in {s['seconds']} s")
    if s.get("final_accuracy") is not None:
        print(f"  federated held-out accuracy:   {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f})")
    if "centralized_accuracy" in s:
        print(f"  centralized baseline (same data, same model): {s['centralized_accuracy']:.4f}")
    print(f"  bytes of updates received:     {s['bytes_received'] / 1e6:.1f} MB")
    for p in s["plots"] + s["final_model"]:
        print(f"  {p}")
