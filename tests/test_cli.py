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
