"""The agent's systemd unit, as ``fedmq-agent install-service`` writes it from the package's copy.

Checked against systemd's own tools where they exist (``systemd-analyze verify`` parses it,
``systemd-analyze security --offline`` scores it), against the kernel (``MemoryDenyWriteExecute=``
under ``PR_SET_MDWE``: the runtimes train and infer without W+X memory) and against strace (every
system call the agent makes is one ``SystemCallFilter=`` allows). Exit codes through the real
console script: bad credentials on a real broker exit 3, a cache_dir the service cannot write
exits 2; the unit restarts on neither.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker.commands.entrypoint import EXIT_AUTH, EXIT_USAGE
from fedmq.edge_agent import systemd

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install "
                                                           "systemd)")
EXPOSURE_MAX = 4.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_") and k != "STATE_DIRECTORY"}
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env(**env))


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value assigned (systemd allows repeating a key)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def exposure(path: Path) -> float:
    out = _run([ANALYZE, "security", "--offline=true", str(path)])
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr[-2000:]
    return float(m.group(1))


# -- what is rendered --------------------------------------------------------------------------------------


def test_the_unit_is_the_package_copy_and_the_docs_copy_is_gone():
    assert (ROOT / "edge_agent" / "data" / systemd.UNIT_NAME).read_text() == systemd.template()
    assert not (ROOT / "docs" / "fedmq-agent.service").exists()  # one source of truth


@pytest.mark.parametrize("cores,quota", [(4, "300%"), (2, "100%"), (1, None)])
def test_rendered_unit(cores, quota, tmp_path):
    unit = parse_unit(systemd.render("/etc/fedmq/agent.toml", cores=cores))
    (exec_start,) = unit["Service.ExecStart"]
    assert exec_start == f"{BIN / 'fedmq-agent'} run --config /etc/fedmq/agent.toml"
    assert unit["Service.EnvironmentFile"] == ["-/etc/fedmq/agent.env"]
    assert unit["Service.StateDirectory"] == ["fedmq"]
    assert unit["Service.WorkingDirectory"] == ["/var/lib/fedmq"]
    prevent = {int(v) for v in unit["Service.RestartPreventExitStatus"][0].split()}
    assert {EXIT_USAGE, EXIT_AUTH} <= prevent and {EXIT_USAGE, EXIT_AUTH} == {2, 3}
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit.get("Service.CPUQuota") == ([quota] if quota else None)
    assert unit["Service.MemoryDenyWriteExecute"] == ["yes"]
    assert not [k for k in unit if "@" in k or any("@EXEC" in v or "@CPU" in v for v in unit[k])]


def test_a_relative_config_becomes_absolute_and_odd_paths_are_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unit = parse_unit(systemd.render("agent.toml", cores=2, command=["/opt/my env/bin/fedmq-agent"]))
    assert unit["Service.ExecStart"] == [f'"/opt/my env/bin/fedmq-agent" run --config {tmp_path / "agent.toml"}']
    assert systemd.quote("/a/100%") == "/a/100%%"  # % is a systemd specifier
    with pytest.raises(Exception, match="control character"):
        systemd.quote("/a\nExecStartPre=/bin/evil")


def test_python_m_when_there_is_no_script(monkeypatch, tmp_path):
    (tmp_path / "python").touch()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert systemd.agent_command() == [str(tmp_path / "python"), "-m", "fedmq.edge_agent.cli"]


def test_install_service_command_writes_and_prints(tmp_path):
    out = tmp_path / "sub" / "fedmq-agent.service"
    w = _run([str(BIN / "fedmq-agent"), "install-service", "--output", str(out), "--cores", "4", "--config",
              "/etc/fedmq/agent.toml"])
    assert w.returncode == 0, w.stderr
    assert f"wrote {out}" in w.stdout and "systemctl daemon-reload" in w.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    p = _run([str(BIN / "fedmq-agent"), "install-service", "--print", "--cores", "4"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == out.read_text() == systemd.render("/etc/fedmq/agent.toml", cores=4)
    # not writable (a file where the directory should be): exit 2 with the fix, no traceback
    (tmp_path / "afile").write_text("")
    bad = _run([str(BIN / "fedmq-agent"), "install-service", "--output", str(tmp_path / "afile" / "x.service")])
    assert bad.returncode == EXIT_USAGE and "--print" in bad.stderr and "Traceback" not in bad.stderr


# -- systemd's own tools -----------------------------------------------------------------------------------


@needs_analyze
def test_systemd_parses_the_unit(tmp_path):
    script = tmp_path / "a dir" / "fedmq-agent"  # a path that needs quoting
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    unit = tmp_path / systemd.UNIT_NAME
    unit.write_text(systemd.render("/etc/fedmq/agent.toml", cores=4, command=[str(script)]))
    out = _run([ANALYZE, "verify", str(unit)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Unknown key" not in out.stderr and "not executable" not in out.stderr, out.stderr
    # positive control: verify does look at ExecStart= (a missing program is reported)
    unit.write_text(systemd.render("/etc/fedmq/agent.toml", cores=4, command=[str(tmp_path / "missing")]))
    out = _run([ANALYZE, "verify", str(unit)])
    assert "missing" in out.stderr and "not executable" in out.stderr, out.stderr


@needs_analyze
def test_security_exposure_is_low(tmp_path):
    unit = tmp_path / systemd.UNIT_NAME
    unit.write_text(systemd.render("/etc/fedmq/agent.toml", cores=4))
    score = exposure(unit)
    assert score <= EXPOSURE_MAX, score
    # positive control: the same scale rates an unhardened unit as exposed
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(bare) > EXPOSURE_MAX


# -- what the hardening allows is what the runtimes need --------------------------------------------------

TRAIN_AND_INFER = textwrap.dedent("""
    import ctypes, json, mmap, sys
    import numpy as np
    from fedmq.edge_agent.trainer import TFLiteTrainer

    def wx():  # can this process map memory writable and executable?
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
            return True
        except OSError:
            return False

    before = wx()
    mdwe = sys.argv[2] == "mdwe"
    if mdwe:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: the kernel's MemoryDenyWriteExecute
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:
            print(json.dumps({"unsupported": ctypes.get_errno()}))
            sys.exit(0)
    t = TFLiteTrainer(open(sys.argv[1], "rb").read())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, *t.x_shape)).astype(np.float32)
    y = rng.integers(0, t.num_classes, 40)
    r = t.fit(x, y, epochs=2, lr=0.01, weights=[np.full(t.weight_shapes[n], 0.01, np.float32) for n in t.weight_names])
    loss, acc = t.evaluate(x, y)
    p = t.predict(x[:16])
    print(json.dumps({"before": before, "after": wx(), "runtime": t.runtime, "fit_loss": r.loss, "eval_loss": loss,
                      "probs_sum": float(p.sum(axis=1).mean())}))
""")


@pytest.fixture(scope="module")
def artifact(model_cache, tmp_path_factory) -> Path:
    """The session's sensor1d artifact (the cache may hold others: aggregators of other tests write there)."""
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    served = load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), model_cache)
    path = tmp_path_factory.mktemp("systemd-artifact") / "model.tflite"
    path.write_bytes(served.artifact)
    return path


def _train_and_infer(python: str, artifact: Path, mode: str, tmp_path: Path) -> dict:
    import json

    script = tmp_path / "train_and_infer.py"
    script.write_text(TRAIN_AND_INFER)
    out = _run([python, str(script), str(artifact), mode], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_deny_write_execute(python: str, artifact: Path, tmp_path: Path) -> None:
    free = _train_and_infer(python, artifact, "free", tmp_path)
    denied = _train_and_infer(python, artifact, "mdwe", tmp_path)
    if "unsupported" in denied:
        pytest.skip(f"this kernel has no PR_SET_MDWE (errno {errno.errorcode.get(denied['unsupported'])})")
    assert free["before"] and free["after"]  # W+X memory is possible here without it...
    assert denied["before"] and not denied["after"]  # ...and refused under it: the control works
    assert denied["runtime"] == free["runtime"]
    # the same training and inference, bit for bit (same seed, same data)
    assert denied["fit_loss"] == free["fit_loss"] and denied["eval_loss"] == free["eval_loss"]
    assert np.isfinite(denied["fit_loss"]) and abs(denied["probs_sum"] - 1.0) < 1e-4


def test_memory_deny_write_execute_litert(artifact, tmp_path):
    _memory_deny_write_execute(sys.executable, artifact, tmp_path)


@pytest.mark.tflite_runtime
def test_memory_deny_write_execute_tflite_runtime(artifact, tmp_path):
    py = ROOT / ".tflite-venv" / "bin" / "python"
    py = Path(os.environ.get("FEDMQ_TFLITE_PYTHON", py))
    if not py.exists():
        pytest.skip("no tflite-runtime environment (.tflite-venv or FEDMQ_TFLITE_PYTHON)")
    _memory_deny_write_execute(str(py), artifact, tmp_path)


def _syscall_groups() -> dict[str, set[str]]:
    out = _run([ANALYZE, "syscall-filter"]).stdout
    groups: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        if line.startswith("@"):
            cur = line.split()[0]
            groups[cur] = []
        elif cur and line.strip() and not line.strip().startswith("#"):
            groups[cur].append(line.strip())

    def expand(g: str) -> set[str]:
        s: set[str] = set()
        for m in groups[g]:
            s |= expand(m) if m.startswith("@") else {m}
        return s

    return {g: expand(g) for g in groups}


def _allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines allow (allow lists, then ~deny lists)."""
    groups = _syscall_groups()
    unit = parse_unit(systemd.render(cores=2))
    allowed: set[str] = set()
    for line in unit["Service.SystemCallFilter"]:
        deny = line.startswith("~")
        names: set[str] = set()
        for word in line.lstrip("~").split():
            names |= groups[word] if word.startswith("@") else {word}
        allowed = allowed - names if deny else allowed | names
    return allowed


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_every_system_call_the_agent_makes_is_allowed(artifact, tmp_path, secure_fleet):
    """The runtimes train and infer, and the agent connects over TLS to a real broker, under strace."""
    allowed = _allowed_syscalls()
    assert "mbind" in allowed and "execve" in allowed and "reboot" not in allowed and "mount" not in allowed

    families: set[str] = set()

    def traced(cmd: list[str], name: str, **kw) -> set[str]:
        log = tmp_path / f"{name}.strace"
        out = _run(["strace", "-f", "-qq", "-o", str(log), *cmd], cwd=ROOT, timeout=180, **kw)
        assert out.returncode == 0, out.stderr[-3000:]
        text = log.read_text()
        calls = {m.group(1) for m in re.finditer(r"^\d+\s+([a-z0-9_]+)\(", text, re.M)}
        families.update(re.findall(r"\bsocket\((AF_[A-Z0-9]+)", text))
        assert {"openat", "mmap"} <= calls, name  # the trace did record the process
        return calls

    script = tmp_path / "train_and_infer.py"
    script.write_text(TRAIN_AND_INFER)
    used = traced([sys.executable, str(script), str(artifact), "free"], "trainer")
    prov, lb = secure_fleet
    cfg = _agent_toml(prov, lb, tmp_path)
    used |= traced([str(BIN / "fedmq-agent"), "run", "--config", str(cfg), "--max-seconds", "3"], "agent")
    assert {"connect", "socket"} <= used  # the network part was traced too
    assert used - allowed == set()
    (allowed_families,) = parse_unit(systemd.render(cores=2))["Service.RestrictAddressFamilies"]
    assert "AF_INET" in families and families <= set(allowed_families.split()), families


# -- exit codes that mean something ----------------------------------------------------------------------


def _agent_toml(prov, lb, tmp: Path, password: str | None = None, cache_dir: str | None = None) -> Path:
    np.savez(tmp / "data.npz", x=np.zeros((5, 100, 6), np.float32), y=np.zeros(5, np.int32))
    text = (prov.out_dir / "agents" / "agent-a" / "agent.toml").read_text()
    text = re.sub(r"(?m)^port = \d+$", f"port = {lb.port}", text)
    if password is not None:
        text = re.sub(r'(?m)^password = ".*"$', f'password = "{password}"', text)
    text = text.replace('id = "agent-a"\n', f'id = "agent-a"\ncache_dir = "{cache_dir or tmp / "cache"}"\n')
    text += f'\n[data]\nsource = "npz:{tmp / "data.npz"}"\n'
    p = tmp / "agent.toml"
    p.write_text(text)
    return p


def test_bad_password_exits_3(secure_fleet, tmp_path):
    prov, lb = secure_fleet
    bad = _run([str(BIN / "fedmq-agent"), "run", "--config", str(_agent_toml(prov, lb, tmp_path, "wrong")),
                "--max-seconds", "60"])
    assert bad.returncode == EXIT_AUTH, bad.stderr[-3000:]
    assert "refused this device's credentials" in bad.stderr and "Traceback" not in bad.stderr
    # positive control: the same config with the provisioned password connects and runs until told to stop
    ok = _run([str(BIN / "fedmq-agent"), "run", "--config", str(_agent_toml(prov, lb, tmp_path)), "--max-seconds",
               "2"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "refused this device" not in ok.stderr


def test_run_with_an_unwritable_cache_dir_exits_2(tmp_path):
    """A cache_dir that cannot be written (``/`` under ProtectSystem=strict): exit 2 before connecting."""
    np.savez(tmp_path / "data.npz", x=np.zeros((5, 3), np.float32), y=np.zeros(5, np.int32))
    (tmp_path / "afile").write_text("")

    def agent(cache: str) -> subprocess.CompletedProcess:
        p = tmp_path / "agent.toml"
        p.write_text(f'[agent]\nid = "a-1"\ncache_dir = "{cache}"\n[broker]\nport = 1\n'
                     f'[data]\nsource = "npz:{tmp_path / "data.npz"}"\n')
        return _run([str(BIN / "fedmq-agent"), "run", "--config", str(p), "--max-seconds", "1"], cwd=tmp_path)

    bad = agent(str(tmp_path / "afile" / "cache"))
    assert bad.returncode == EXIT_USAGE, bad.stderr[-2000:]
    assert "agent.cache_dir" in bad.stderr and "Traceback" not in bad.stderr
    ok = agent(str(tmp_path / "cache"))  # positive control: writable, runs (broker unreachable: it retries)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "cache" / "models").is_dir()


def test_relative_cache_dir_resolves_against_the_state_directory(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((5, 3), np.float32), y=np.zeros(5, np.int32))
    p = tmp_path / "agent.toml"
    p.write_text(f'[agent]\nid = "a-1"\ncache_dir = "cache"\n[data]\nsource = "npz:{tmp_path / "data.npz"}"\n')
    state, work = tmp_path / "state", tmp_path / "work"
    state.mkdir()
    work.mkdir()
    under_systemd = _run([str(BIN / "fedmq-agent"), "check", "--config", str(p)], cwd=work,
                         STATE_DIRECTORY=str(state))
    assert under_systemd.returncode == 0, under_systemd.stderr
    assert f"cache_dir {state / 'cache'} writable" in under_systemd.stdout and "note:" not in under_systemd.stdout
    by_hand = _run([str(BIN / "fedmq-agent"), "check", "--config", str(p)], cwd=work)
    assert f"cache_dir {work / 'cache'} writable" in by_hand.stdout, by_hand.stdout + by_hand.stderr
    assert "is relative" in by_hand.stdout and "/var/lib/fedmq/cache" in by_hand.stdout
