"""Loading a TFLite interpreter without TensorFlow.

Tries, in order: ``ai_edge_litert`` (LiteRT, the maintained runtime), ``tflite_runtime``
(older images; needs numpy < 2), then ``tf.lite`` when TensorFlow happens to be installed.
Set ``FEDMQ_TFLITE_RUNTIME`` to one of those names to force a choice. None installed is a
missing extra (exit 2 with ``pip install 'fedmq[agent]'``), not a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from fedmq.broker.commands.extras import MissingExtra
from fedmq.broker.errors import ConfigError

log = logging.getLogger(__name__)
RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
EXTRA = {"ai_edge_litert": "agent", "tflite_runtime": "agent-tflite", "tensorflow": "aggregator"}


class RuntimeUnavailable(MissingExtra, ImportError):
    """No TFLite interpreter imports (an ImportError too, for callers that treat it as one)."""


def interpreter_class(name: str | None = None) -> tuple[Any, str]:
    """Return (Interpreter class, "name version") of the first runtime that imports."""
    wanted = name or os.environ.get("FEDMQ_TFLITE_RUNTIME")
    if wanted and wanted not in RUNTIMES:
        raise ConfigError(f"TFLite runtime {wanted!r} (agent.runtime or FEDMQ_TFLITE_RUNTIME) is unknown: "
                          f"use one of {', '.join(RUNTIMES)}")
    order = [wanted] if wanted else list(RUNTIMES)
    errors, broken = [], []  # broken: installed, but failed to import (e.g. tflite-runtime on numpy 2)
    for rt in order:
        try:
            if rt == "ai_edge_litert":
                mod = importlib.import_module("ai_edge_litert.interpreter")
                version = getattr(importlib.import_module("ai_edge_litert"), "__version__", "?")
            elif rt == "tflite_runtime":
                mod = importlib.import_module("tflite_runtime.interpreter")
                version = getattr(importlib.import_module("tflite_runtime"), "__version__", "?")
            else:
                tf = importlib.import_module("tensorflow")
                mod, version = tf.lite, tf.__version__
            return mod.Interpreter, f"{rt} {version}"
        except ImportError as e:
            errors.append(f"{rt}: {e}")
            if not isinstance(e, ModuleNotFoundError):
                broken.append(f"{rt}: {e}")
    log.debug("no TFLite runtime: %s", "; ".join(errors))
    if wanted:
        raise RuntimeUnavailable(f"the TFLite runtime {wanted!r}", wanted, EXTRA[wanted], "; ".join(broken))
    raise RuntimeUnavailable("training on the device", "a TFLite runtime (ai-edge-litert, tflite-runtime or TensorFlow)",
                             "agent", "; ".join(broken))


def load_interpreter(artifact: bytes, runtime: str | None = None, num_threads: int | None = None,
                     xnnpack: bool | None = None) -> tuple[Any, str]:
    """An interpreter with its tensors allocated.

    ``xnnpack=False`` skips the default XNNPACK delegate (saves its packed-weight buffers on
    small devices; see bench/agent_footprint for the speed it costs). ``None``: the
    ``FEDMQ_TFLITE_XNNPACK`` environment variable (0/1), default on.
    """
    cls, name = interpreter_class(runtime)
    kw: dict[str, Any] = {"model_content": bytes(artifact)}
    if num_threads:
        kw["num_threads"] = num_threads
    if xnnpack is None:
        xnnpack = os.environ.get("FEDMQ_TFLITE_XNNPACK", "1") not in ("0", "false", "no")
    if not xnnpack:
        mod = importlib.import_module(cls.__module__)
        resolver = getattr(getattr(mod, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)
        if resolver is not None:
            kw["experimental_op_resolver_type"] = resolver
    interp = cls(**kw)
    interp.allocate_tensors()
    log.debug("loaded artifact with %s", name)
    return interp, name
