"""Test helpers: write configs and data shards, start aggregator and agent processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmq.broker.commands.config import write_toml

ROOT = Path(__file__).resolve().parent.parent


def watch_shards(agents: list[str], out: Path, per_agent: int | None = None) -> dict[str, Path]:
    """One agent per watch subject (1..), optionally capped at ``per_agent`` windows."""
    from fedmq.aggregator.datasets import load_watch

    d = load_watch()
    paths = {}
    for i, a in enumerate(agents):
        s = d.subset(d.groups == (i % 8) + 1)
        n = per_agent or len(s.y)
        p = out / f"{a}.npz"
        np.savez(p, x=s.x[:n], y=s.y[:n])
        paths[a] = p
    return paths


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            self.popen.wait(30)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    tmp: Path
    broker: dict  # the [broker] table
    procs: list[Proc] = field(default_factory=list)
    model_cache: Path | None = None

    def spawn(self, name: str, module: str, config: Path, *extra: str) -> Proc:
        log = self.tmp / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen([sys.executable, "-m", module, "run", "--config", str(config), *extra],
                             stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                             start_new_session=True)
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def aggregator_config(self, name: str = "aggregator", **tables) -> Path:
        state = self.tmp / f"{name}-state"
        state.mkdir(exist_ok=True)
        if self.model_cache is not None and not (state / "models").exists():
            (state / "models").symlink_to(self.model_cache)
        t = {"broker": dict(self.broker), "service": {"id": "aggregator", "state_dir": str(state),
                                                      "export_final": False},
             "model": {"source": "zoo:sensor1d", "batch_size": 16, "verify_steps": 5},
             "rounds": {"rounds": 3, "min_agents": 1, "deadline_s": 60, "grace_s": 2},
             "train": {"epochs": 1, "lr": 0.05}, "strategy": {"name": "fedavg"}}
        for k, v in tables.items():
            t.setdefault(k, {}).update(v)
        return write_toml(self.tmp / f"{name}.toml", t)

    def agent_config(self, agent_id: str, data: Path, /, **tables) -> Path:
        agent = agent_id
        t = {"agent": {"id": agent, "cache_dir": str(self.tmp / f"{agent}-cache")},
             "broker": {**self.broker, **({"username": agent} if "username" in self.broker else {})},
             "data": {"source": f"npz:{data}"}}
        for k, v in tables.items():
            t.setdefault(k, {}).update(v)
        return write_toml(self.tmp / f"{agent}.toml", t)

    def start_aggregator(self, name="aggregator", **tables) -> Proc:
        return self.spawn(name, "fedmq.aggregator.cli", self.aggregator_config(name, **tables))

    def start_agent(self, agent_id: str, data: Path, /, **tables) -> Proc:
        return self.spawn(agent_id, "fedmq.edge_agent.cli", self.agent_config(agent_id, data, **tables))

    def stop_all(self) -> None:
        for p in self.procs:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.text()[-4000:]}" for p in self.procs)
