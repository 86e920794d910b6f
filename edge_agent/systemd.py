"""The agent's systemd unit: shipped in the package (``data/fedmq-agent.service``), rendered for
this device by ``fedmq-agent install-service``.

Rendering fills in two things the package cannot know:

* ``ExecStart=``: the ``fedmq-agent`` of the environment running the command (a venv's
  ``bin/fedmq-agent``; ``python -m fedmq.edge_agent.cli`` when there is no script), with the
  absolute config path, quoted for systemd;
* ``CPUQuota=``: systemd counts it in percent of ONE core (``80%`` is 0.8 of a core, whatever the
  board has), so "leave one core free" is ``(cores - 1) * 100%``: ``300%`` on a 4-core Pi. On a
  single-core board there is no core to leave: no quota, and ``CPUWeight=``/``Nice=`` make the
  agent yield to the device's own work instead.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import resources
from pathlib import Path

from fedmq.broker.errors import ConfigError

UNIT_NAME = "fedmq-agent.service"
DEFAULT_CONFIG = "/etc/fedmq/agent.toml"
DEFAULT_OUTPUT = f"/etc/systemd/system/{UNIT_NAME}"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def template() -> str:
    """The unit as shipped in the package (with ``@EXEC_START@`` and ``@CPU_QUOTA@`` to fill in)."""
    return resources.files("fedmq.edge_agent").joinpath("data", UNIT_NAME).read_text(encoding="utf-8")


def quote(word: str) -> str:
    """One ExecStart= word: ``%`` doubled (systemd specifiers), quoted when it holds spaces or quotes."""
    if _UNSAFE.search(word):
        raise ConfigError(f"{word!r} contains a control character: it cannot go into a systemd unit")
    word = word.replace("%", "%%")
    if re.search(r"[\s\"'\\;$]", word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def agent_command() -> list[str]:
    """How to start this environment's agent: its ``fedmq-agent`` script, else ``python -m``."""
    script = Path(sys.executable).parent / "fedmq-agent"  # not resolved: a venv's python is a symlink
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "fedmq.edge_agent.cli"]


def cpu_quota(cores: int) -> str:
    """The CPUQuota= line that leaves one core free (a comment on a single-core board)."""
    if cores < 1:
        raise ConfigError(f"--cores must be at least 1, got {cores}")
    if cores == 1:
        return "# CPUQuota= not set: a single core has none to leave free (CPUWeight=/Nice= below make the agent yield)"
    return f"# {cores} cores: one left free (CPUQuota= is in percent of one core)\nCPUQuota={(cores - 1) * 100}%"


def render(config: str | os.PathLike[str] = DEFAULT_CONFIG, cores: int | None = None,
           command: list[str] | None = None) -> str:
    """The unit for this device: ExecStart runs ``command`` (default :func:`agent_command`) with
    ``run --config <absolute config>``; CPUQuota leaves one of ``cores`` (default: this machine's) free."""
    cfg = Path(config).expanduser()
    cfg = cfg if cfg.is_absolute() else Path.cwd() / cfg
    words = [*(command or agent_command()), "run", "--config", str(cfg)]
    text = template()
    text = text.replace("@EXEC_START@", " ".join(quote(w) for w in words))
    text = text.replace("@CPU_QUOTA@", cpu_quota(cores if cores is not None else (os.cpu_count() or 1)))
    return text
