"""The runtime self-test (issue 15.4): one training step of a real artifact in a child process.

A deliberately broken runtime is made only here: a ``sitecustomize`` on the children's PYTHONPATH
patches ai-edge-litert's signature runners so that the ``train`` signature kills the process with
SIGSEGV (what LiteRT 2.3.0 did under aarch64 emulation) or returns a NaN loss. The fallback runtime
in this environment is TensorFlow's tf.lite (tflite-runtime lives in the separate .tflite-venv).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.edge_agent import selftest
from fedmq.edge_agent.selftest import SelfTestFailed, choose_runtime

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("ai_edge_litert")
pytest.importorskip("tensorflow")

BROKEN = r'''
import os, signal
import numpy as np
import ai_edge_litert.interpreter as m

class _Broken:
    """The train runner's interpreter wrapper, with a step that crashes or returns NaN: whatever
    calls it (the runner's own __call__ or the agent's Signature) gets the broken step."""
    def __init__(self, w):
        self._w = w
    def __getattr__(self, name):
        return getattr(self._w, name)
    def Invoke(self, sub):
        if "{mode}" == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        return self._w.Invoke(sub)
    def GetTensor(self, index, sub):
        return np.full_like(self._w.GetTensor(index, sub), np.nan)

_init = m.SignatureRunner.__init__
def __init__(self, *a, **kw):
    _init(self, *a, **kw)
    if self._signature_key == "train":
        self._interpreter_wrapper = _Broken(self._interpreter_wrapper)
m.SignatureRunner.__init__ = __init__
'''


@pytest.fixture
def artifact(model_cache) -> bytes:
    return next(Path(model_cache).glob("*/model.tflite")).read_bytes()


@pytest.fixture
def broken_litert(tmp_path, monkeypatch):
    """Children started from now on get an ai-edge-litert whose train step segfaults (or returns NaN)."""

    def make(mode: str = "segv") -> None:
        d = tmp_path / f"broken-{mode}"
        d.mkdir()
        (d / "sitecustomize.py").write_text(BROKEN.replace("{mode}", mode))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])))

    return make


def reference_step(artifact: bytes, runtime: str) -> float:
    """The self-test's loss, computed here in-process with another runtime from the same seeded inputs."""
    from fedmq.edge_agent.trainer import TFLiteTrainer

    t = TFLiteTrainer(artifact, runtime=runtime)
    shapes = [t.weight_shapes[n] for n in t.weight_names]
    x, y, w0 = selftest._inputs(t.batch_size, t.x_shape, t.num_classes, shapes)
    return t.fit(x, y, epochs=1, lr=selftest.LR, weights=w0).loss


def test_a_working_runtime_passes_and_agrees_with_tensorflow(artifact, tmp_path):
    res = choose_runtime(artifact, None, tmp_path, compare=True)
    assert res.ok and res.runtime == "ai_edge_litert", res
    assert res.agrees_with.startswith("tensorflow") and res.disagreement == ""
    assert res.loss == pytest.approx(reference_step(artifact, "tensorflow"), rel=1e-4)
    assert 0 < res.step_norm < 1
    # cached per (artifact, runtime): the second call runs no child (a broken child would now fail)
    cached = (tmp_path / "selftest.json").read_text()
    assert artifact and res.runtime in cached
    again = choose_runtime(artifact, None, tmp_path, compare=True)
    assert again == res


def test_a_crashing_runtime_is_named_and_the_next_one_is_used(artifact, tmp_path, broken_litert):
    broken_litert("segv")
    res = choose_runtime(artifact, None, tmp_path)
    assert res.ok and res.runtime == "tensorflow", res
    assert res.loss == pytest.approx(reference_step(artifact, "ai_edge_litert"), rel=1e-4)  # this process: unbroken
    import json

    entries = json.loads((tmp_path / "selftest.json").read_text())
    litert = [v for k, v in entries.items() if ":ai_edge_litert:" in k]
    assert len(litert) == 1 and not litert[0]["ok"] and "SIGSEGV" in litert[0]["reason"]


def test_a_diverging_runtime_is_refused(artifact, tmp_path, broken_litert):
    broken_litert("nan")
    with pytest.raises(SelfTestFailed) as e:
        choose_runtime(artifact, "ai_edge_litert", tmp_path)
    assert "ai_edge_litert" in str(e.value) and "diverged" in str(e.value) and "agent.runtime" in str(e.value)


def test_the_trainer_under_run_falls_back(artifact, tmp_path, broken_litert, monkeypatch):
    """What ``fedmq-agent run`` does (selftest.enable): the trainer gets the runtime that passed."""
    from fedmq.edge_agent.trainer import TFLiteTrainer

    monkeypatch.setattr(selftest, "_enabled_dir", tmp_path)
    assert TFLiteTrainer(artifact).runtime.startswith("ai_edge_litert")  # positive control: unbroken
    broken_litert("segv")
    (tmp_path / "selftest.json").unlink()
    t = TFLiteTrainer(artifact)
    assert t.runtime.startswith("tensorflow")
    x = np.zeros((t.batch_size, *t.x_shape), np.float32)
    w = [np.full(t.weight_shapes[n], 0.01, np.float32) for n in t.weight_names]
    assert np.isfinite(t.fit(x, np.zeros(t.batch_size, np.int32), weights=w).loss)


def agent_check(tmp_path, artifact: bytes, runtime: str) -> subprocess.CompletedProcess:
    import hashlib

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models" / f"{hashlib.sha256(artifact).hexdigest()}.tflite").write_bytes(artifact)
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 100, 6), np.float32), y=np.zeros(4, np.int32))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nid = "a1"\ncache_dir = "{cache}"\nruntime = "{runtime}"\n'
                   f'[data]\nsource = "npz:{tmp_path / "data.npz"}"\n')
    return subprocess.run([sys.executable, "-m", "fedmq.edge_agent.cli", "check", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300)


def test_check_exits_2_naming_the_crashing_runtime(artifact, tmp_path, broken_litert):
    ok = agent_check(tmp_path / "ok", artifact, "ai_edge_litert")  # positive control
    assert ok.returncode == 0, ok.stderr
    assert "self-test of model" in ok.stdout and "ai_edge_litert" in ok.stdout and "agrees with tensorflow" in ok.stdout
    broken_litert("segv")
    bad = agent_check(tmp_path / "bad", artifact, "ai_edge_litert")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "ai_edge_litert" in bad.stderr and "SIGSEGV" in bad.stderr and "agent.runtime" in bad.stderr


def test_runtime_versions_read_without_importlib_metadata():
    """The self-test's cache key names each runtime's version as the installed metadata does, read from
    its .dist-info directory: the agent process never imports importlib.metadata (~1 MB on a device)."""
    code = ("import sys, json\nimport fedmq.edge_agent.cli, fedmq.edge_agent.service\n"
            "from fedmq.edge_agent import selftest\n"
            "v = {n: selftest._runtime_version(n) for n in ('ai_edge_litert', 'tflite_runtime', 'tensorflow')}\n"
            "print(json.dumps([v, 'importlib.metadata' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    import json
    from importlib.metadata import PackageNotFoundError, version

    got, imported = json.loads(r.stdout)
    assert imported is False
    for name, dist in (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime"),
                       ("tensorflow", "tensorflow")):
        try:
            want = version(dist)
        except PackageNotFoundError:
            want = "?"
        assert got[name] == want
    assert got["ai_edge_litert"] != "?"  # positive control: the runtime this environment has
