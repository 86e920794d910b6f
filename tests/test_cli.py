"""Console scripts: --help works, exit codes mean something, provisioning from the command line."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("cmd", ["fedmq-broker", "fedmq-agent", "fedmq-aggregator"])
def test_help(cmd):
    out = subprocess.run([str(BIN / cmd), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_provision_cli(tmp_path):
    out = subprocess.run([str(BIN / "fedmq-broker"), "provision", "--fleet", "demo", "--count", "3",
                          "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for a in ("agent-001", "agent-002", "agent-003"):
        assert (tmp_path / f"p/agents/{a}/agent.toml").is_file()
    users = [line.split(":")[0] for line in (tmp_path / "p/broker/passwd").read_text().splitlines()]
    assert users == ["aggregator", "agent-001", "agent-002", "agent-003"]


def test_provision_rejects_bad_agent_id(tmp_path):
    out = subprocess.run([str(BIN / "fedmq-broker"), "provision", "--fleet", "demo", "--agents", "ok,Bad+Id",
                          "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Bad+Id" in out.stderr
    assert not (tmp_path / "p").exists()


def test_example_configs_validate(tmp_path):
    from fedmq.aggregator.config import load_config as load_agg
    from fedmq.edge_agent.config import load_config as load_agent

    root = Path(__file__).resolve().parent.parent / "examples"
    cfg = load_agg(str(root / "aggregator.toml"))
    assert cfg.strategy["name"] == "fedavgm" and cfg.rounds.rounds == 30
    a = load_agent(str(root / "agent.toml"))
    assert a.agent.id == "agent-001" and a.data.source.startswith("npz:")


@pytest.mark.parametrize("text, key", [
    ("[rounds]\nselect = \"some\"\n", "rounds.select"),
    ("[rounds]\nquorm = 3\n", "did you mean 'quorum'"),
    ("[broker]\nport = 99999\n", "broker.port"),
    ("[strategy]\nname = \"fedavgg\"\n", "did you mean 'fedavg'"),
    ("[bogus]\nx = 1\n", "unknown table [bogus]"),
    ("[train]\nencoding = \"zip\"\n", "train.encoding"),
])
def test_bad_aggregator_config_names_the_key_and_exits_2(tmp_path, text, key):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    out = subprocess.run([str(BIN / "fedmq-aggregator"), "run", "--config", str(p), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert key in out.stderr


def test_bad_agent_config_and_env_override(tmp_path):
    import os

    p = tmp_path / "agent.toml"
    p.write_text("[agent]\nid = \"a1\"\n[data]\nsource = \"npz:/nonexistent.npz\"\n[broker]\npassword = \"s3cret\"\n")
    out = subprocess.run([str(BIN / "fedmq-agent"), "check", "--config", str(p)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "not found" in out.stderr and "s3cret" not in out.stderr + out.stdout
    env = {**os.environ, "FEDMQ_BROKER_PORT": "notaport"}
    out = subprocess.run([str(BIN / "fedmq-agent"), "check", "--config", str(p)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2 and "FEDMQ_BROKER_PORT" in out.stderr


@pytest.mark.parametrize("prox", [False, True])
def test_export_cli_writes_a_verified_artifact(tmp_path, prox):
    import json

    from fedmq.edge_agent.trainer import TFLiteTrainer

    out = tmp_path / "m.tflite"
    cmd = [str(BIN / "fedmq-aggregator"), "export", "--model", "zoo:mlp", "--batch-size", "8", "--verify-steps", "5",
           "--out", str(out)] + (["--prox"] if prox else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["prox"] is prox and meta["verification"]["steps"] == 5
    t = TFLiteTrainer(out.read_bytes(), meta["model_id"])
    assert t.prox is prox and t.batch_size == 8


def test_export_cli_unknown_model_exits_2(tmp_path):
    """A model that cannot be served as given is a usage error (ModelRefused), as in run --check."""
    r = subprocess.run([str(BIN / "fedmq-aggregator"), "export", "--model", "zoo:nope", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "zoo" in r.stderr
