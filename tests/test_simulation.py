"""The simulation command end to end: a reduced experiment 5 (watch data, one agent per subject)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_mosquitto

pytestmark = [pytest.mark.network, needs_mosquitto]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~25 s: export, centralized baseline and 4 rounds of 8 agent processes
def test_reduced_watch_experiment(tmp_path):
    """As `make demo` runs it: a run directory relative to the current directory."""
    run = tmp_path / "runs" / "demo"
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "fedmq.aggregator.cli", "simulate", "--dataset", "watch", "--rounds", "4",
                          "--epochs", "1", "--run-dir", "runs/demo", "--no-progress"],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["rounds"] == 4 and s["agents"] == 8  # subjects 1-8, one agent each
    assert s["final_accuracy"] > 0.5  # held-out subjects 9-10; chance is 1/7
    assert 0.5 < s["centralized_accuracy"] <= 1.0
    assert "federated held-out accuracy" in out.stdout and "centralized baseline" in out.stdout
    for p in ("config.json", "state/history.csv", "state/history.jsonl", "plots/accuracy_loss.png",
              "plots/bytes.png", "state/final/model.keras", "state/final/model.tflite", "summary.json"):
        assert (run / p).is_file(), p
    rows = [json.loads(line) for line in (run / "state/history.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rows] == [8.0] * 4
    # every process it started is gone
    ps = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
