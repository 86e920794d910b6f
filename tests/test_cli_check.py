"""``run --check`` / ``fedmq-agent check``: what ``run`` needs is validated without connecting,
through the real console scripts; each problem exits 2 with a message naming the key and the fix,
and the same config with the fix applied exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent

MODEL_MODULE = '''
def build():
    raise RuntimeError("--check must not build the model")
'''


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(cwd), env=_env(**env))


def _agg(tmp: Path, text: str, *extra: str, **env: str) -> subprocess.CompletedProcess:
    p = tmp / "aggregator.toml"
    p.write_text(text)
    return _run([str(BIN / "fedmq-aggregator"), "run", "--config", str(p), "--check", *extra], tmp, **env)


@pytest.fixture
def project(tmp_path):
    """A user project holding a model module (not on the import path by itself) and eval data."""
    (tmp_path / "proj" / "mymodels").mkdir(parents=True)
    (tmp_path / "proj" / "mymodels" / "__init__.py").write_text("")
    (tmp_path / "proj" / "mymodels" / "net.py").write_text(MODEL_MODULE)
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int32))
    return tmp_path


def _agg_config(tmp: Path, **over: str) -> str:
    v = {"source": '"mymodels.net:build"', "state_dir": f'"{tmp / "state"}"', "dataset": f'"npz:{tmp / "eval.npz"}"',
         "rounds": ""} | over
    return (f'[service]\nstate_dir = {v["state_dir"]}\n[model]\nsource = {v["source"]}\n'
            f'[eval]\ndataset = {v["dataset"]}\n[rounds]\n{v["rounds"]}\n')


def test_aggregator_valid_config_exits_0(project):
    out = _agg(project, _agg_config(project), PYTHONPATH=str(project / "proj"))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    assert not (project / "state").exists()  # checked, not created


def test_aggregator_model_module_not_importable(project):
    out = _agg(project, _agg_config(project))  # the project is not on PYTHONPATH
    assert out.returncode == 2, out.stderr
    assert "model.source = 'mymodels.net:build'" in out.stderr
    assert "PYTHONPATH" in out.stderr and "pip install -e" in out.stderr
    assert "Traceback" not in out.stderr
    # the fix the message names works (the same config, exit 0)
    assert _agg(project, _agg_config(project), PYTHONPATH=str(project / "proj")).returncode == 0


def test_aggregator_model_function_missing(project):
    out = _agg(project, _agg_config(project, source='"mymodels.net:nope"'), PYTHONPATH=str(project / "proj"))
    assert out.returncode == 2, out.stderr
    assert "has no function 'nope'" in out.stderr and "build" in out.stderr


@pytest.mark.parametrize("name, rc", [("mlp", 0), ("nope", 2)])
def test_aggregator_zoo_model(project, name, rc):
    out = _agg(project, _agg_config(project, source=f'"zoo:{name}"'))
    assert out.returncode == rc, out.stderr
    if rc:
        assert "no zoo model 'nope'" in out.stderr and "mlp" in out.stderr


def test_aggregator_eval_data_missing(project):
    out = _agg(project, _agg_config(project, dataset=f'"npz:{project / "missing.npz"}"'),
               PYTHONPATH=str(project / "proj"))
    assert out.returncode == 2, out.stderr
    assert "eval.dataset" in out.stderr and "missing.npz" in out.stderr


def test_aggregator_eval_data_without_labels(project):
    np.savez(project / "nolabels.npz", x=np.zeros((4, 3), np.float32))
    out = _agg(project, _agg_config(project, dataset=f'"npz:{project / "nolabels.npz"}"'),
               PYTHONPATH=str(project / "proj"))
    assert out.returncode == 2, out.stderr
    assert "eval.dataset" in out.stderr


@pytest.mark.parametrize("rounds, needle", [
    ('select = "list"\nagents = ["a-1", "a-2"]\nquorum = 3', "rounds.quorum = 3 can never be met"),
    ("min_agents = 0", "rounds.min_agents = 0"),
])
def test_aggregator_quorum_cannot_be_met(project, rounds, needle):
    out = _agg(project, _agg_config(project, rounds=rounds), PYTHONPATH=str(project / "proj"))
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr


def test_aggregator_quorum_that_can_be_met(project):
    rounds = 'select = "list"\nagents = ["a-1", "a-2"]\nquorum = 2\nmin_agents = 5'  # min_agents: not for lists
    out = _agg(project, _agg_config(project, rounds=rounds), PYTHONPATH=str(project / "proj"))
    assert out.returncode == 0, out.stderr


def test_aggregator_state_dir_not_writable(project):
    (project / "afile").write_text("not a directory")
    out = _agg(project, _agg_config(project, state_dir=f'"{project / "afile" / "state"}"'),
               PYTHONPATH=str(project / "proj"))
    assert out.returncode == 2, out.stderr
    assert "service.state_dir" in out.stderr and "not a directory" in out.stderr


def test_aggregator_reports_every_problem_at_once(project):
    (project / "afile").write_text("x")
    out = _agg(project, _agg_config(project, state_dir=f'"{project / "afile"}"',
                                    dataset=f'"npz:{project / "missing.npz"}"'))
    assert out.returncode == 2, out.stderr
    for needle in ("service.state_dir", "model.source", "eval.dataset"):
        assert needle in out.stderr


# -- the agent ---------------------------------------------------------------------------------------
def _agent(tmp: Path, text: str, how: str = "check", **env: str) -> subprocess.CompletedProcess:
    p = tmp / "agent.toml"
    p.write_text(text)
    cmd = [str(BIN / "fedmq-agent"), "check", "--config", str(p)] if how == "check" else \
        [str(BIN / "fedmq-agent"), "run", "--check", "--config", str(p)]
    return _run(cmd, tmp, **env)


def _agent_config(tmp: Path, source: str | None = None, cache_dir: str | None = None, runtime: str = "") -> str:
    return (f'[agent]\nid = "a-1"\ncache_dir = "{cache_dir or tmp / "cache"}"\nruntime = "{runtime}"\n'
            f'[data]\nsource = "{source or "npz:" + str(tmp / "data.npz")}"\n')


@pytest.fixture
def device(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((5, 3), np.float32), y=np.zeros(5, np.int32))
    return tmp_path


@pytest.mark.parametrize("how", ["check", "run"])
def test_agent_valid_config_exits_0(device, how):
    out = _agent(device, _agent_config(device), how)
    assert out.returncode == 0, out.stderr
    assert "config ok: agent a-1, 5 examples of shape (3,)" in out.stdout and "runtime" in out.stdout
    assert not (device / "cache").exists()


@pytest.mark.parametrize("how", ["check", "run"])
def test_agent_data_missing(device, how):
    out = _agent(device, _agent_config(device, source=f"npz:{device / 'missing.npz'}"), how)
    assert out.returncode == 2, out.stderr
    assert "data.source" in out.stderr and "missing.npz" in out.stderr


def test_agent_data_corrupt(device):
    (device / "bad.npz").write_bytes(b"this is not an npz file")
    out = _agent(device, _agent_config(device, source=f"npz:{device / 'bad.npz'}"))
    assert out.returncode == 2, out.stderr
    assert "data.source" in out.stderr and "cannot be loaded" in out.stderr and "Traceback" not in out.stderr


def test_agent_data_without_examples(device):
    np.savez(device / "empty.npz", x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int32))
    out = _agent(device, _agent_config(device, source=f"npz:{device / 'empty.npz'}"))
    assert out.returncode == 2, out.stderr
    assert "at least one example" in out.stderr


@pytest.mark.parametrize("how", ["check", "run"])
def test_agent_cache_dir_not_writable(device, how):
    (device / "afile").write_text("x")
    out = _agent(device, _agent_config(device, cache_dir=str(device / "afile" / "cache")), how)
    assert out.returncode == 2, out.stderr
    assert "agent.cache_dir" in out.stderr and "not a directory" in out.stderr


def test_agent_runtime_missing(device):
    import importlib.util

    if importlib.util.find_spec("tflite_runtime") is not None:
        pytest.skip("tflite_runtime is installed here")
    out = _agent(device, _agent_config(device, runtime="tflite_runtime"))
    assert out.returncode == 2, out.stderr
    assert "pip install 'fedmq[" in out.stderr
