"""The built wheel, as a new user gets it: one top-level name, LICENSE and data files inside, and
``pip install fedmq`` with NO extras gives three working commands whose missing extras exit 2
with the ``pip install 'fedmq[...]'`` line that fixes them, never a traceback.

Builds the wheel from this checkout (PyPI provides the build backend) and installs it into a fresh
venv (no system site-packages; PyPI provides numpy, paho-mqtt and msgpack). About 25 s here.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"broker": "fedmq/broker", "edge_agent": "fedmq/edge_agent", "aggregator": "fedmq/aggregator"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# the one copy of the version: a literal in broker/__init__.py, which pyproject.toml reads (dynamic)
VERSION = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "broker" / "__init__.py").read_text(), re.M).group(1)


def _run(cmd, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(out.glob("fedmq-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.fixture(scope="module")
def dist_info(wheel, names) -> str:
    (d,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    return d


def test_the_only_top_level_name_is_fedmq(names, dist_info):
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fedmq", dist_info}
    assert dist_info == f"fedmq-{VERSION}.dist-info"
    # fedmq itself is a namespace (no fedmq/__init__.py); its children are the three folders
    assert {n.split("/")[1] for n in names if n.startswith("fedmq/")} == {"broker", "edge_agent", "aggregator"}


def test_every_source_module_is_in_the_wheel(names):
    """A subpackage missing from [tool.setuptools] packages would silently drop out of the wheel."""
    want = set()
    for folder, target in FOLDERS.items():
        for p in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in p.parts:
                want.add(f"{target}/{p.relative_to(ROOT / folder).as_posix()}")
    assert want - set(names) == set()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_license_templates_and_py_typed_are_inside(names, dist_info, wheel):
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = z.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "Apache License" in (ROOT / "LICENSE").read_text()
    for t in (ROOT / "broker" / "ops" / "templates").iterdir():
        assert f"fedmq/broker/ops/templates/{t.name}" in names
    for t in (ROOT / "aggregator" / "dashboard").iterdir():  # the aggregator's static dashboard page
        assert f"fedmq/aggregator/dashboard/{t.name}" in names
    assert "fedmq/aggregator/dashboard/index.html" in names
    for target in FOLDERS.values():
        assert f"{target}/py.typed" in names
    assert "fedmq/edge_agent/data/fedmq-agent.service" in names  # fedmq-agent install-service writes it


def test_entry_points_point_into_fedmq(wheel, dist_info):
    with zipfile.ZipFile(wheel) as z:
        cp = configparser.ConfigParser()
        cp.read_string(z.read(f"{dist_info}/entry_points.txt").decode())
        files = set(z.namelist())
    scripts = dict(cp["console_scripts"])
    assert set(scripts) == {"fedmq-broker", "fedmq-agent", "fedmq-aggregator"}
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert module.startswith("fedmq.") and func == "main", (name, target)
        assert module.replace(".", "/") + ".py" in files, target


def test_metadata_has_no_placeholder_urls(wheel, dist_info):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"{dist_info}/METADATA").decode().split("\n\n", 1)[0]
    for line in meta.splitlines():
        if line.startswith(("Project-URL", "Home-page", "Download-URL")):
            assert not re.search(r"example\.(com|org)|your[-_]?(org|name)|TODO|XXX|<", line), line


# -- installed with no extras, in a fresh venv ------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel and its core dependencies; returns its bin/ directory."""
    venv = tmp_path_factory.mktemp("bare-venv")
    r = _run([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    bin_ = venv / "bin"
    r = _run([str(bin_ / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
             timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return bin_


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FEDMQ_", "VIRTUAL_ENV"))}
    return env


def _cmd(bare: Path, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _run([str(bare / argv[0]), *argv[1:]], timeout=120, env=_env(), cwd=cwd)


def test_bare_venv_has_only_the_core_dependencies(bare):
    r = _run([str(bare / "python"), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"])
    dists = {line.split("==")[0].lower() for line in r.stdout.splitlines() if line}
    assert dists - {"pip", "setuptools", "wheel"} == {"fedmq", "numpy", "paho-mqtt", "msgpack"}
    # the folders never leak out as top-level packages (PyPI's `broker` / `edge-agent` would collide)
    code = ("import importlib.util as u, sys; "
            "sys.exit(any(u.find_spec(m) for m in ('broker', 'edge_agent', 'aggregator')))")
    assert _run([str(bare / "python"), "-c", code], cwd="/", env=_env()).returncode == 0


@pytest.mark.parametrize("command", ["fedmq-agent", "fedmq-broker", "fedmq-aggregator"])
def test_help_and_version_work_without_extras(bare, command):
    r = _cmd(bare, command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and not r.stderr, r.stderr
    r = _cmd(bare, command, "--version")
    assert r.returncode == 0 and r.stdout.split() == [command, "(fedmq)", VERSION], r


def test_the_contract_imports_without_any_extra(bare):
    """A device install reads the wire contract without the certificate-issuing code."""
    code = ("import sys; import fedmq.broker.contract.codec, fedmq.broker.contract.messages, "
            "fedmq.broker.transport.client, fedmq.edge_agent.service; "
            "assert 'cryptography' not in sys.modules; print(fedmq.broker.__version__)")
    r = _run([str(bare / "python"), "-c", code], env=_env(), cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == VERSION


def _assert_missing_extra(r: subprocess.CompletedProcess, extra: str, module: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # before it at most the entry point's log lines
    assert last.startswith("fedmq-") and last.endswith(f"pip install 'fedmq[{extra}]'"), r.stderr
    assert module in last, r.stderr


@pytest.fixture(scope="module")
def agent_config(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("agent")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.normal(size=(20, 4)).astype(np.float32), y=rng.integers(0, 3, 20).astype(np.int32))
    cfg = d / "agent.toml"
    # port 9: nothing listens there; the runtime is checked before any connection is attempted
    cfg.write_text(f'[agent]\nid = "dev-1"\ncache_dir = "{d / "cache"}"\n\n[broker]\nhost = "127.0.0.1"\nport = 9\n\n'
                   f'[data]\nsource = "npz:{d / "data.npz"}"\n')
    return cfg


def test_agent_config_is_valid_where_a_runtime_exists(agent_config):
    """Positive control: the same config passes `check` in the project venv (LiteRT installed), so the
    exit 2 below is the missing runtime and nothing else."""
    r = _run([str(Path(sys.executable).parent / "fedmq-agent"), "check", "--config", str(agent_config)],
             timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert "config ok: agent dev-1, 20 examples" in r.stdout


@pytest.mark.parametrize("sub", ["check", "run"])
def test_agent_without_a_tflite_runtime_exits_2_with_the_fix(bare, agent_config, sub):
    r = _cmd(bare, "fedmq-agent", sub, "--config", str(agent_config))
    _assert_missing_extra(r, "agent", "TFLite runtime")


def test_agent_info_without_a_runtime_exits_2(bare):
    _assert_missing_extra(_cmd(bare, "fedmq-agent", "info"), "agent", "TFLite runtime")


def test_install_service_from_the_wheel(bare):
    """A pip-installed agent writes its systemd unit (shipped in the wheel), pointing at its own script."""
    r = _cmd(bare, "fedmq-agent", "install-service", "--print", "--cores", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"ExecStart={bare / 'fedmq-agent'} run --config /etc/fedmq/agent.toml" in lines
    assert "CPUQuota=300%" in lines and "RestartPreventExitStatus=2 3" in lines and "StateDirectory=fedmq" in lines


def test_provision_without_cryptography_exits_2_with_the_fix(bare, tmp_path):
    r = _cmd(bare, "fedmq-broker", "provision", "--fleet", "f", "--count", "1", "--out", str(tmp_path / "fleet"))
    _assert_missing_extra(r, "broker", "cryptography")
    assert not (tmp_path / "fleet").exists()  # nothing half-written


@pytest.mark.parametrize("argv, module", [
    (["export", "--model", "zoo:mlp", "--out", "m.tflite"], "tensorflow"),
    (["run", "--config", "aggregator.toml"], "prometheus"),
    (["run", "--config", "aggregator.toml", "--check"], "prometheus"),
    (["simulate", "--rounds", "1"], "prometheus"),
])
def test_aggregator_without_its_extra_exits_2_with_the_fix(bare, tmp_path, argv, module):
    _assert_missing_extra(_cmd(bare, "fedmq-aggregator", *argv, cwd=tmp_path), "aggregator", module)
    assert list(tmp_path.iterdir()) == []


def test_aggregator_commands_without_an_extra_still_work(bare, tmp_path):
    """`strategies` needs only the core: it lists and checks presets in a bare install."""
    r = _cmd(bare, "fedmq-aggregator", "strategies")
    assert r.returncode == 0 and "fedavg" in r.stdout, r.stderr
    (tmp_path / "a.toml").write_text('[strategy]\nname = "fedavg"\n')
    r = _cmd(bare, "fedmq-aggregator", "strategies", "--check", str(tmp_path / "a.toml"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("loader, module", [("load_watch", "seglearn"), ("load_digits", "scikit-learn")])
def test_datasets_without_their_extra_name_it(bare, loader, module):
    code = ("import sys\nfrom fedmq.broker.commands.extras import MissingExtra\n"
            "from fedmq.aggregator import datasets\n"
            f"try:\n    datasets.{loader}()\nexcept MissingExtra as e:\n    print(e)\n    sys.exit(3)\n")
    r = _run([str(bare / "python"), "-c", code], env=_env(), cwd="/")
    assert r.returncode == 3, r.stderr
    assert module in r.stdout and "pip install 'fedmq[datasets]'" in r.stdout


def test_one_version_read_from_the_distribution_metadata():
    """broker/__init__.py holds the only copy (no importlib.metadata at import: ~1 MB per process);
    pyproject.toml reads it, so the installed metadata and every --version agree with it."""
    from importlib import metadata

    import fedmq.broker

    version = VERSION
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fedmq.broker.__version__"}
    assert fedmq.broker.__version__ == metadata.version("fedmq") == version
    assignment = re.compile(r"""version_*\s*[=:]\s*["']\d+\.\d+""", re.IGNORECASE)
    hardcoded = []
    for folder in (*FOLDERS, "docker"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".toml", ".yaml", ".yml", ".Dockerfile", ".in") \
                    and p != ROOT / "broker" / "__init__.py":
                text = p.read_text(errors="replace")
                if version in text or assignment.search(text):
                    hardcoded.append(str(p.relative_to(ROOT)))
    assert hardcoded == []
