"""Runtime self-test: one training step of the artifact in a child process before a runtime is trusted.

Why: a TFLite runtime can load an artifact, set and read its weights, run inference — and still
crash in the ``train`` signature (ai-edge-litert 2.3.0 under aarch64 emulation segfaulted there,
issue 15) or train to NaN. In the agent's own process that is a crash loop under systemd. So the
step runs in a child (``python -m fedmq.edge_agent.selftest``) with a timeout; the parent checks
that the child was not killed by a signal, that the loss is finite and that the weights moved by
a plausible amount (finite, not unchanged, less than their own size for one SGD step). When a
second runtime is installed, its step from the same weights and batch must agree (logged when it
does not; ``fedmq-agent check`` compares, ``run`` does not). The first runtime that passes, in the order LiteRT → tflite-runtime → TensorFlow (or
only the configured ``agent.runtime``), is used; none passing is :class:`SelfTestFailed`, a
configuration error (exit 2) naming each runtime and what it did.

Results are cached per (artifact sha256, runtime and version) in ``cache_dir/selftest.json``, so
``fedmq-agent run`` tests each artifact once, and ``fedmq-agent check`` tests the cached one.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.broker.errors import ConfigError

from .runtime import EXTRA, RUNTIMES

log = logging.getLogger(__name__)
CACHE_FILE = "selftest.json"
TIMEOUT_S = 180.0
LR = 0.01
#: trained weights of two runtimes agree when max |a - b| <= ATOL + RTOL * max |step|
RTOL, ATOL = 0.05, 1e-5
#: set by ``enable``: TFLiteTrainer(runtime=None) self-tests the artifact (fedmq-agent run)
_enabled_dir: Path | None = None


class SelfTestFailed(ConfigError):
    """No runtime passed the self-test for this artifact (exit 2 with the fix)."""


@dataclass
class SelfTest:
    """What one runtime did with one training step of one artifact."""

    runtime: str  # module name: ai_edge_litert, tflite_runtime, tensorflow
    version: str  # "name version" as the runtime reports it; "" when it never got that far
    ok: bool
    reason: str  # "" when ok, else what went wrong, for the log and the exit message
    loss: float = float("nan")
    step_norm: float = 0.0  # ||w1 - w0|| / ||w0|| of the trained step
    seconds: float = 0.0
    agrees_with: str = ""  # the second runtime compared against, when one is installed
    disagreement: str = ""  # how far the second runtime's step differs, when it does

    def describe(self) -> str:
        what = "ok" if self.ok else self.reason
        return f"{self.version or self.runtime}: {what}"


def installed(name: str) -> bool:
    """Whether runtime ``name`` is installed (found, not imported: the parent stays small)."""
    mod = {"ai_edge_litert": "ai_edge_litert", "tflite_runtime": "tflite_runtime", "tensorflow": "tensorflow"}[name]
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _inputs(batch: int, x_shape: tuple[int, ...], num_classes: int, shapes: list[tuple[int, ...]]):
    """The seeded batch and starting weights every runtime trains from (fan-in scaled normals)."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(batch, *x_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=batch).astype(np.int32)
    w0 = []
    for s in shapes:
        fan_in = int(np.prod(s[:-1])) if len(s) > 1 else 1
        w0.append((rng.normal(size=s) / np.sqrt(max(fan_in, 1))).astype(np.float32))
    return x, y, w0


def child_main(artifact_path: str, runtime: str, out: str, xnnpack: bool | None) -> int:
    """The child: one training step from seeded weights; writes loss, w0 and w1 to ``out`` (.npz)."""
    from .trainer import TFLiteTrainer

    art = Path(artifact_path).read_bytes()
    t = TFLiteTrainer(art, runtime=runtime, xnnpack=xnnpack)
    shapes = [t.weight_shapes[n] for n in t.weight_names]
    x, y, w0 = _inputs(t.batch_size, t.x_shape, t.num_classes, shapes)
    r = t.fit(x, y, epochs=1, lr=LR, weights=w0)  # batch_size examples: exactly one step
    # the verdict's numbers are computed here: the parent (the agent) reads scalars, not model-size arrays
    np.savez(out, loss=np.float64(r.loss), version=np.array(t.runtime), steps=np.int64(r.steps),
             **_stats(w0, r.weights), **{f"w0_{i}": w for i, w in enumerate(w0)},
             **{f"w1_{i}": w for i, w in enumerate(r.weights)})
    return 0


def _stats(w0: list[np.ndarray], w1: list[np.ndarray]) -> dict[str, np.ndarray]:
    """||w1 - w0|| / ||w0||, and whether every trained weight is finite."""
    finite = all(bool(np.all(np.isfinite(w))) for w in w1)
    norm0 = float(np.sqrt(sum(float(np.sum(w.astype(np.float64) ** 2)) for w in w0)))
    step = float(np.sqrt(sum(float(np.sum((b.astype(np.float64) - a) ** 2)) for a, b in zip(w0, w1)))) \
        if finite else float("nan")
    return {"finite": np.bool_(finite), "step": np.float64(step), "rel_step": np.float64(step / max(norm0, 1e-12))}


def _run_child(artifact: Path, runtime: str, workdir: Path, timeout: float,
               xnnpack: bool | None) -> tuple[SelfTest, Any]:
    out = workdir / f"{runtime}.npz"
    cmd = [sys.executable, "-m", "fedmq.edge_agent.selftest", "--artifact", str(artifact), "--runtime", runtime,
           "--out", str(out)]
    if xnnpack is not None:
        cmd.append("--xnnpack" if xnnpack else "--no-xnnpack")
    env = {**os.environ}
    env.pop("FEDMQ_TFLITE_RUNTIME", None)  # the child uses exactly the runtime it is given
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return SelfTest(runtime, "", False, f"no training step within {timeout:.0f}s (hung)",
                        seconds=time.monotonic() - t0), None
    secs = time.monotonic() - t0
    if p.returncode < 0:
        try:
            sig = signal.Signals(-p.returncode).name
        except ValueError:
            sig = f"signal {-p.returncode}"
        return SelfTest(runtime, "", False, f"crashed in a training step ({sig})", seconds=secs), None
    if p.returncode != 0 or not out.exists():
        last = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return SelfTest(runtime, "", False, f"failed a training step (exit {p.returncode}: {last})",
                        seconds=secs), None
    z = np.load(out)  # lazy: the weights are read only to compare two runtimes
    return _judge(runtime, {k: z[k] for k in ("loss", "version", "finite", "step", "rel_step")}, secs), z


def _judge(runtime: str, d, seconds: float) -> SelfTest:
    """Finite loss, finite weights that moved, by less than their own size (one SGD step)."""
    version = str(d["version"])
    loss, rel = float(d["loss"]), float(d["rel_step"])
    if not np.isfinite(loss):
        return SelfTest(runtime, version, False, f"diverged: loss {loss} after one step", loss, 0.0, seconds)
    if not bool(d["finite"]):
        return SelfTest(runtime, version, False, "diverged: non-finite weights after one step", loss, 0.0, seconds)
    if float(d["step"]) == 0.0:
        return SelfTest(runtime, version, False, "did not train: the weights are unchanged after one step", loss,
                        rel, seconds)
    if rel > 1.0:
        return SelfTest(runtime, version, False, f"diverged: one step of lr {LR} moved the weights by {rel:.2g}x "
                        "their size", loss, rel, seconds)
    return SelfTest(runtime, version, True, "", loss, rel, seconds)


def _compare(a, b) -> str:
    """"" when runtime b's step agrees with a's, else how far apart they are (npz files or dicts)."""
    n = sum(1 for k in (a.files if hasattr(a, "files") else a) if k.startswith("w1_"))
    step = max(float(np.max(np.abs(a[f"w1_{i}"] - a[f"w0_{i}"]))) for i in range(n))
    diff = max(float(np.max(np.abs(a[f"w1_{i}"] - b[f"w1_{i}"]))) for i in range(n))
    return "" if diff <= ATOL + RTOL * step else f"max |difference| {diff:.3g} vs largest step {step:.3g}"


def _load_cache(cache_dir: Path | None) -> dict:
    if cache_dir is None:
        return {}
    try:
        d = json.loads((Path(cache_dir) / CACHE_FILE).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache_dir: Path | None, cache: dict) -> None:
    if cache_dir is None:
        return
    from fedmq.broker.storage import atomic_write

    try:
        atomic_write(Path(cache_dir) / CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True).encode())
    except OSError as e:  # an unwritable cache only costs a repeated self-test
        log.warning("self-test result not cached in %s: %s", cache_dir, e)


def _runtime_version(name: str) -> str:
    """The installed distribution's version, without importing the runtime (for the cache key).

    Read from the name of the ``<dist>-<version>.dist-info`` directory beside the package (the
    wheel format's own layout); importlib.metadata only when there is none (it costs the agent ~1 MB)."""
    import importlib.util

    dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime", "tensorflow": "tensorflow"}[name]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "?"  # not installed
    for where in spec.submodule_search_locations or []:
        for d in (dist, "tensorflow-cpu") if name == "tensorflow" else (dist,):
            found = sorted(Path(where).parent.glob(f"{d.replace('-', '_')}-*.dist-info"))
            if len(found) == 1:
                return found[0].name[len(d) + 1 : -len(".dist-info")]
    from importlib.metadata import PackageNotFoundError, version

    for d in (dist, "tensorflow-cpu") if name == "tensorflow" else (dist,):
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return "?"


def choose_runtime(artifact: bytes, preferred: str | None = None, cache_dir: Path | str | None = None,
                   timeout: float = TIMEOUT_S, xnnpack: bool | None = None, compare: bool = False) -> SelfTest:
    """The first installed runtime whose training step of ``artifact`` passes (``preferred`` only, when
    given); raises :class:`SelfTestFailed` naming every runtime tried and the fix. ``compare``: also
    run the step with the next installed runtime and record whether the two agree (``check`` does;
    ``run`` does not, so an agent start costs one child, not a TensorFlow import)."""
    if preferred and preferred not in RUNTIMES:
        raise ConfigError(f"TFLite runtime {preferred!r} is unknown: use one of {', '.join(RUNTIMES)}")
    sha = hashlib.sha256(artifact).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    cache = _load_cache(cache_dir)
    order = [preferred] if preferred else [r for r in RUNTIMES if installed(r)]
    if not order:
        raise SelfTestFailed("no TFLite runtime is installed: pip install 'fedmq[agent]' (ai-edge-litert) or, on "
                             "32-bit ARM and older images, pip install 'fedmq[agent-tflite]'")
    tried: list[SelfTest] = []
    with tempfile.TemporaryDirectory(prefix="fedmq-selftest-") as d:
        art = Path(d) / "model.tflite"
        art.write_bytes(artifact)
        for rt in order:
            key = f"{sha}:{rt}:{_runtime_version(rt)}:{'xnnpack' if xnnpack is not False else 'builtin'}"
            if key in cache and (not compare or cache[key].get("agrees_with") or not cache[key].get("ok")):
                res = SelfTest(**cache[key])
                log.debug("self-test of model %s with %s: cached (%s)", sha[:12], rt, res.describe())
            else:
                res, data = _run_child(art, rt, Path(d), timeout, xnnpack)
                others = [r for r in RUNTIMES if r != rt and installed(r)] if compare and res.ok and data is not None \
                    else []
                if others:  # a second runtime's step from the same weights and batch must agree
                    other, odata = _run_child(art, others[0], Path(d), timeout, xnnpack)
                    res.agrees_with = other.version or other.runtime
                    if other.ok and odata is not None:
                        res.disagreement = _compare(data, odata)
                    else:
                        res.agrees_with = ""
                    if odata is not None:
                        odata.close()
                if data is not None:
                    data.close()
                log.info("self-test of model %s with %s: %s (loss %.4f, step %.2g of the weights, %.1fs)%s",
                         sha[:12], res.version or rt, "ok" if res.ok else res.reason, res.loss, res.step_norm,
                         res.seconds, f"; {res.agrees_with} agrees" if res.agrees_with and not res.disagreement
                         else (f"; differs from {res.agrees_with}: {res.disagreement}" if res.disagreement else ""))
                if res.disagreement:
                    log.warning("runtimes disagree on one training step of model %s: %s vs %s (%s)", sha[:12],
                                res.version, res.agrees_with, res.disagreement)
                cache[key] = asdict(res)
                _save_cache(cache_dir, cache)
            if res.ok:
                if tried:
                    log.warning("using %s for model %s: %s", res.version, sha[:12],
                                "; ".join(t.describe() for t in tried))
                return res
            log.error("TFLite runtime %s failed the self-test of model %s: %s", rt, sha[:12], res.reason)
            tried.append(res)
    raise SelfTestFailed(_fix(tried, preferred))


def _fix(tried: list[SelfTest], preferred: str | None) -> str:
    said = "; ".join(t.describe() for t in tried)
    missing = [r for r in RUNTIMES if not installed(r)]
    hint = (f"agent.runtime = {preferred!r} is forced: remove it (or FEDMQ_TFLITE_RUNTIME) to let the agent use "
            "another runtime" if preferred else "")
    if not hint and "tflite_runtime" in missing:
        hint = f"install another runtime: pip install 'fedmq[{EXTRA['tflite_runtime']}]' (tflite-runtime; needs numpy<2)"
    elif not hint:
        hint = "no installed runtime can train this model on this device: report it with this message"
    return f"no TFLite runtime passed the training self-test ({said}): {hint}"


def check_cached(cfg) -> str:
    """``fedmq-agent check``: self-test the cached model, if any, with the runtime ``run`` would use
    (a one-line summary; :class:`SelfTestFailed` when none passes)."""
    models = sorted((Path(cfg.cache_dir) / "models").glob("*.tflite"), key=lambda p: p.stat().st_mtime)
    if not models:
        return "self-test: no model cached yet (run tests each model it receives)"
    xnnpack = False if cfg.agent.low_memory else True
    res = choose_runtime(models[-1].read_bytes(), cfg.agent.runtime or os.environ.get("FEDMQ_TFLITE_RUNTIME") or None,
                         cfg.cache_dir, xnnpack=xnnpack, compare=True)
    extra = f", agrees with {res.agrees_with}" if res.agrees_with and not res.disagreement else ""
    return f"self-test of model {models[-1].stem[:12]}: {res.version} trains (loss {res.loss:.3f}{extra})"


def enable(cache_dir: Path | str) -> None:
    """Make every ``TFLiteTrainer`` built without a forced runtime self-test its artifact first
    (results cached in ``cache_dir``): ``fedmq-agent run`` calls this at start-up."""
    global _enabled_dir
    _enabled_dir = Path(cache_dir)


def enabled_dir() -> Path | None:
    return _enabled_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one training step of a TFLite artifact (the agent's self-test child)")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--runtime", required=True, choices=RUNTIMES)
    ap.add_argument("--out", required=True)
    x = ap.add_mutually_exclusive_group()
    x.add_argument("--xnnpack", dest="xnnpack", action="store_true", default=None)
    x.add_argument("--no-xnnpack", dest="xnnpack", action="store_false")
    a = ap.parse_args(argv)
    return child_main(a.artifact, a.runtime, a.out, a.xnnpack)


if __name__ == "__main__":
    sys.exit(main())
