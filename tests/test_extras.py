"""Every third-party module fedmq imports is declared: in the core dependencies or in the extra that the
code's own ``require(...)`` names. Parsed from the source with ast (static, also the lazy imports inside
functions and ``importlib.import_module("...")`` strings), checked against pyproject.toml.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedmq.broker.commands.extras import MissingExtra, install_line, require, require_installed

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

#: module imported by fedmq -> (distribution, where it must be declared: "core" or the extra's name)
MODULES = {
    "numpy": ("numpy", "core"),
    "paho": ("paho-mqtt", "core"),
    "msgpack": ("msgpack", "core"),
    "tomli": ("tomli", "core"),  # Python 3.10 only (tomllib before 3.11)
    "cryptography": ("cryptography", "broker"),
    "amqtt": ("amqtt", "embedded"),
    "ai_edge_litert": ("ai-edge-litert", "agent"),
    "tflite_runtime": ("tflite-runtime", "agent-tflite"),
    "tensorflow": ("tensorflow", "aggregator"),
    "keras": ("keras", "aggregator"),
    "prometheus_client": ("prometheus-client", "aggregator"),
    "tqdm": ("tqdm", "aggregator"),
    "matplotlib": ("matplotlib", "aggregator"),
    "seglearn": ("seglearn", "datasets"),
    "sklearn": ("scikit-learn", "datasets"),
}


def _dist(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    out = {"core": {_dist(r) for r in PROJECT["dependencies"]}}
    out.update({extra: {_dist(r) for r in reqs} for extra, reqs in PROJECT["optional-dependencies"].items()})
    return out


def _sources():
    for folder in ("broker", "edge_agent", "aggregator"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            yield p, ast.parse(p.read_text(), str(p))


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> files that import it (statements, import_module/find_spec strings)."""
    found: dict[str, set[str]] = {}
    for p, tree in _sources():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and _call_name(node) in ("import_module", "find_spec") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
            for n in names:
                top = n.split(".")[0]
                if top != "fedmq" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(p.relative_to(ROOT)))
    return found


def require_calls() -> list[tuple[str, str, str]]:
    """(file, module, extra) of every require/require_installed/MissingExtra call with literal arguments."""
    out = []
    for p, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            name = _call_name(node)
            if name in ("require", "require_installed") and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                out.append((str(p.relative_to(ROOT)), args[0], args[1]))
            elif name == "MissingExtra" and len(args) >= 3 and all(isinstance(a, str) for a in args[1:3]):
                out.append((str(p.relative_to(ROOT)), args[1], args[2]))
            elif name == "_require" and p.name == "cli.py" and p.parent.name == "aggregator":
                out += [(str(p.relative_to(ROOT)), m, "aggregator") for m in args[1:] if isinstance(m, str)]
    return out


def test_the_scan_sees_lazy_and_dynamic_imports():
    """Positive control: imports inside functions and by string are found (else the next test proves nothing)."""
    found = imported_modules()
    assert "aggregator/model_store.py" in found["keras"]  # inside a function
    assert "edge_agent/runtime.py" in found["ai_edge_litert"]  # importlib.import_module("...")
    assert "aggregator/datasets.py" in found["seglearn"]  # importlib.util.find_spec("...")
    assert "broker/contract/codec.py" in found["msgpack"]


def test_every_third_party_import_is_in_the_table():
    unknown = {m: sorted(f) for m, f in imported_modules().items() if m not in MODULES}
    assert unknown == {}, "declare these in pyproject.toml and add them to MODULES"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_is_declared_where_the_table_says(module):
    dist, where = MODULES[module]
    decl = declared()
    assert where in decl, f"no extra {where!r} in pyproject.toml"
    assert dist in decl[where], f"{dist} (imported as {module}) is not in {where}: {sorted(decl[where])}"


def test_every_require_names_an_extra_that_brings_the_module():
    calls = require_calls()
    assert {c[1].split(".")[0] for c in calls} >= {"cryptography", "tensorflow", "keras", "prometheus_client",
                                                   "seglearn", "sklearn"}, calls  # the commands' checks are found
    decl = declared()
    for file, module, extra in calls:
        top = module.split(".")[0]
        assert extra in decl, f"{file}: require({module!r}, {extra!r}): no such extra"
        if top in MODULES:
            assert MODULES[top][0] in decl[extra], f"{file}: extra {extra} does not install {module}"


def test_each_tflite_runtime_names_the_extra_that_installs_it():
    from fedmq.edge_agent.runtime import EXTRA, RUNTIMES

    decl = declared()
    assert set(EXTRA) == set(RUNTIMES)
    for module, extra in EXTRA.items():
        assert MODULES[module][0] in decl[extra], (module, extra)


def test_core_dependencies_are_what_the_contract_needs():
    """pip install fedmq: the wire contract and the transport, nothing heavier."""
    assert {d for d in declared()["core"]} == {"numpy", "paho-mqtt", "msgpack", "tomli"}
    assert not any(_dist(r) == "tensorflow" for r in PROJECT["optional-dependencies"]["agent"])


def test_tensorflow_has_an_upper_bound():
    (tf,) = [r for r in PROJECT["optional-dependencies"]["aggregator"] if _dist(r) == "tensorflow"]
    assert "<" in tf, tf


def test_require_turns_a_missing_module_into_the_fix():
    with pytest.raises(MissingExtra) as e:
        require("fedmq_no_such_module.sub", "broker", "fedmq-broker provision")
    assert str(e.value) == ("fedmq-broker provision needs fedmq_no_such_module, which is not installed: "
                            "pip install 'fedmq[broker]'")
    assert e.value.extra == "broker" and e.value.reason == "missing_extra"
    with pytest.raises(MissingExtra, match=re.escape(install_line("aggregator"))):
        require_installed("fedmq_no_such_module", "aggregator", "fedmq-aggregator export")
    assert require("json", "dev", "x").dumps(1) == "1"  # present: the module itself
    require_installed("numpy", "dev", "x")


def test_missing_extra_is_a_usage_error():
    """Entry points map ConfigError to exit 2: a missing extra is one."""
    from fedmq.broker.errors import ConfigError

    assert issubclass(MissingExtra, ConfigError)
    from fedmq.edge_agent.runtime import RuntimeUnavailable

    assert issubclass(RuntimeUnavailable, MissingExtra) and issubclass(RuntimeUnavailable, ImportError)


def test_broker_cli_exits_2_when_provision_lacks_cryptography(monkeypatch, tmp_path, capsys):
    """In-process, cryptography hidden: exit 2 and the pip line (the bare-venv test does it for real)."""
    import builtins

    from fedmq.broker import cli

    real = builtins.__import__
    hidden = [m for m in list(sys.modules) if m == "cryptography" or m.startswith("cryptography.")
              or m in ("fedmq.broker.ops.certs", "fedmq.broker.ops.provision")]
    for m in hidden:
        monkeypatch.delitem(sys.modules, m)

    def fake(name, *a, **k):
        if name == "cryptography" or name.startswith("cryptography."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    rc = cli.main(["provision", "--fleet", "f", "--count", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().endswith("pip install 'fedmq[broker]'"), err
    assert not (tmp_path / "o").exists()
