"""Optional dependencies: a command that needs one says which ``pip install 'fedmq[extra]'`` fixes it.

``pip install fedmq`` installs only the contract's dependencies (numpy, paho-mqtt, msgpack); each
command imports what its extra brings when it needs it, through :func:`require`. A missing one is a
:class:`MissingExtra` — a :class:`~fedmq.broker.errors.ConfigError`, so every entry point exits 2
with the install line, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from fedmq.broker.errors import ConfigError


def install_line(extra: str) -> str:
    """The command that installs an extra (quoted: the brackets are a glob in most shells)."""
    return f"pip install 'fedmq[{extra}]'"


class MissingExtra(ConfigError):
    """A module that an optional extra provides is not installed; the message is the fix."""

    reason = "missing_extra"

    def __init__(self, purpose: str, module: str, extra: str, detail: str = "") -> None:
        self.purpose, self.module, self.extra = purpose, module, extra
        tail = f" ({detail})" if detail else ""
        super().__init__(f"{purpose} needs {module}, which is not installed{tail}: {install_line(extra)}")


def require(module: str, extra: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``extra``.

    ``purpose`` says what needs it ("fedmq-broker provision", "the watch dataset") and starts the
    message; ``package`` names the distribution when it differs from the module (scikit-learn).
    A module that is installed but misses one of *its* dependencies is reported the same
    way (the extra's install brings it), naming the module that was not found.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        missing = (e.name or top).split(".")[0]
        raise MissingExtra(purpose, package or top, extra,
                           "" if missing == top else f"no module named {missing!r}") from None


def require_installed(module: str, extra: str, purpose: str, package: str | None = None) -> None:
    """Like :func:`require` without importing ``module`` (a top-level name): a cheap early check
    for a heavy module (TensorFlow) that the command may import only later, or not at all."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(purpose, package or module, extra)
